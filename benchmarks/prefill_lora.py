"""Prefill with adapters: the platform's LoRA dispatch (GPU: the Mosaic GPU kernels from GPU_KERNEL_MIN_ROWS rows)
against the pure-JAX reference, in the whole model.

Builds the same random-weight model twice (one per LoRA backend; the backend is fixed when a step is traced),
registers R random adapters, and times teacher-forced scoring of one P-token prompt per adapter (prefill chunks of
--chunk tokens, so every projection sees `chunk` rows and every expert projection chunk x top-k rows). Prints the
median time per prompt and the relative difference of the logits between the backends, then greedy-decodes a few
tokens with the default backends to show the engine runs end to end.

    PYTHONPATH=. python3 benchmarks/prefill_lora.py --model configs/models/qwen3-30b-a3b.json --num_layers 2 \\
        --out $OUT/prefill_lora
    python benchmarks/prefill_lora.py --smoke          # CPU: the bundled tiny model (both runs use the reference)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def run(args, backend: str | None) -> dict:
    from infinilora_jax import LLM, SamplingParams
    from infinilora_jax.lora.random_adapter import random_adapter
    from infinilora_jax.lora.targets import ALL_TARGETS
    from pallas_kernels import dispatch

    llm = LLM(args.model, dtype=args.dtype, num_layers=args.num_layers, max_lora_rank=args.rank,
              max_adapters=args.adapters, max_num_seqs=8, max_num_batched_tokens=args.chunk,
              max_model_len=args.prompt_len + 64, progress=False)
    names = [f"a{k}" for k in range(args.adapters)]
    for k, name in enumerate(names):
        llm.runner.adapters.register_weights(random_adapter(llm.config, name, args.rank, tuple(ALL_TARGETS), seed=k,
                                                            dtype=llm.runner.dtype))
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, llm.config.vocab_size, args.prompt_len).tolist()
    with dispatch.use_backend(backend) if backend else contextlib.nullcontext():
        t = time.perf_counter()
        for name in names:  # traces and compiles; loads every adapter (slots = adapters: all stay resident)
            llm.logits(prompt, name)
        compile_s = time.perf_counter() - t
        # Timed: one prefill and one sampled token per prompt (the logits stay on the device); llm.logits would
        # copy [P, vocab] float32 to the host, 1.2 GB at Qwen3's vocabulary, which dominated the first run.
        one_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        llm.generate([prompt], one_token, adapter=names[0])  # compiles the sampling step
        times = []
        for name in names * args.repeats:
            t = time.perf_counter()
            llm.generate([prompt], one_token, adapter=name)
            times.append(time.perf_counter() - t)
        logits = {name: llm.logits(prompt, name) for name in names}  # untimed: the backends' agreement
        tokens = None
        if backend is None:
            out = llm.generate([prompt[:64]] * 2, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                               adapter=names[:2])
            tokens = [o.token_ids for o in out]
    return {"backend": backend or "default", "compile_s": compile_s, "ms_per_prompt": 1e3 * float(np.median(times)),
            "logits": logits, "tokens": tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num_layers", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens: rows per prefill step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="out/prefill_lora")
    args = parser.parse_args()
    if args.smoke:
        args.dtype, args.rank, args.adapters, args.prompt_len, args.chunk, args.repeats = "float32", 8, 2, 40, 32, 1
    import jax

    from pallas_kernels import dispatch

    print(f"platform {jax.default_backend()}, default LoRA backend at {args.chunk} rows, rank {args.rank}: "
          f"{dispatch.select_backend(rows=args.chunk, rank=args.rank).value}", flush=True)
    default, reference = run(args, None), run(args, "reference")
    errs = [float(np.linalg.norm(default["logits"][n] - reference["logits"][n]) /
                  np.linalg.norm(reference["logits"][n])) for n in reference["logits"]]
    print(f"  {'LoRA backend':14} {'ms/prompt':>10} {'compile s':>10}")
    for r in (default, reference):
        print(f"  {r['backend']:14} {r['ms_per_prompt']:10.2f} {r['compile_s']:10.1f}")
    print(f"  speedup {reference['ms_per_prompt'] / default['ms_per_prompt']:.2f}x; logits rel. difference "
          f"max {max(errs):.2e}; greedy tokens (default backends): {default['tokens']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": [{k: v for k, v in r.items() if k != "logits"}
                                                for r in (default, reference)], "logits_rel_err": errs}, f, indent=1)


if __name__ == "__main__":
    main()
