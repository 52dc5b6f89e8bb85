"""A server's start-up: LLMEngine.warmup, then the first requests of each prompt length, then the same again.

`warmup` compiles every step program ahead of time (the Mosaic GPU kernels with them); with run_programs (the
GPU default) it also runs each step shape once on its padding batch, since a program's first execution does
one-time setup. This times both sides in one process per setting: warmup's seconds, and each first request's
latency (a prompt of each length in --prompts, greedy, --max_tokens tokens) against the same request once
everything is warm (the second pass). A first request much slower than its second pass waited for something
warmup left undone (a compile would show as seconds).

    OUT=$OUT ./tools/gpu_runbook.sh startup    # both settings, one process each (docs/benchmarks.md)
    python benchmarks/startup.py --smoke     # CPU, the bundled tiny model: checks the script
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights); default: the bundled tiny model")
flags.DEFINE_integer("num_layers", 2, "cut the model to this many layers (0: all)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_integer("rank", 32, "adapter pool rank")
flags.DEFINE_integer("max_num_seqs", 32, "")
flags.DEFINE_integer("max_num_batched_tokens", 512, "step token budget (prefill chunk)")
flags.DEFINE_integer("max_model_len", 1024, "")
flags.DEFINE_integer("workers", 16, "compilations at once")
flags.DEFINE_bool("run_programs", True, "warmup runs each step shape once (LLMEngine.warmup run_programs)")
flags.DEFINE_list("prompts", ["1", "20", "100", "300", "900"], "prompt lengths, one request each, in this order")
flags.DEFINE_integer("max_tokens", 4, "tokens generated per request")
flags.DEFINE_bool("smoke", False, "the bundled tiny model, small shapes (CPU check of the script)")
flags.DEFINE_string("out", None, "write <out>.json")


def main(argv):
    del argv
    import jax
    import numpy as np

    from infinilora_jax import LLM, SamplingParams

    if F.smoke:
        F.model, F.dtype, F.max_num_seqs, F.max_num_batched_tokens, F.max_model_len = None, "float32", 4, 32, 128
        F.prompts, F.workers = ["3", "40"], 2
    kw = {"num_layers": F.num_layers} if F.num_layers else {}
    t0 = time.perf_counter()
    llm = LLM(F.model, dtype=F.dtype, max_lora_rank=F.rank, max_adapters=4, max_num_seqs=F.max_num_seqs,
              max_num_batched_tokens=F.max_num_batched_tokens, max_model_len=F.max_model_len, progress=False,
              **kw)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shapes = llm.engine.warmup(progress=False, workers=F.workers, run_programs=F.run_programs)
    warmup_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=F.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [rng.integers(3, llm.config.vocab_size, int(n)).tolist() for n in F.prompts]
    passes = []
    for _ in range(2):
        times = []
        for prompt in prompts:
            t0 = time.perf_counter()
            out = llm.generate([prompt], params)
            times.append(time.perf_counter() - t0)
            assert len(out[0].token_ids) == F.max_tokens
        passes.append(times)
    device = jax.devices()[0].device_kind
    print(f"== start-up on {device}, jax {jax.__version__}: model {F.model or 'tiny'}, {F.num_layers or 'all'} "
          f"layers, run_programs={F.run_programs}")
    print(f"  engine built in {build_s:.1f} s; warmup {warmup_s:.1f} s for {shapes} step shapes")
    print(f"  {'prompt tokens':>13}  {'first request s':>15}  {'warm request s':>14}")
    for n, first, warm in zip(F.prompts, *passes):
        print(f"  {int(n):13d}  {first:15.2f}  {warm:14.2f}")
    print(f"  first pass {sum(passes[0]):.1f} s, warm pass {sum(passes[1]):.1f} s; "
          f"warmup + first pass {warmup_s + sum(passes[0]):.1f} s")
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump({"device": device, "model": F.model, "num_layers": F.num_layers, "dtype": F.dtype,
                       "run_programs": F.run_programs, "build_s": build_s, "warmup_s": warmup_s, "shapes": shapes,
                       "prompts": [int(n) for n in F.prompts], "first_s": passes[0], "warm_s": passes[1]},
                      f, indent=1)


if __name__ == "__main__":
    app.run(main)
