"""Greedy tokens of a random-weights model serving adapters, to check an XLA setting changes no output.

Run it once per setting (each in its own process: XLA reads its flags once), then compare. The run itself uses
the engine's defaults (async scheduling, layer-wise adapter loading through fewer slots than adapters), float32
and deterministic XLA ops with GEMM autotuning off, so two settings that compute the same program give the same
tokens bit for bit.

    python3 tools/flag_parity.py --out $OUT/tokens_default.json
    XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP INFINILORA_ADAPTER_STAGING=via_device \\
        python3 tools/flag_parity.py --out $OUT/tokens_skip_temp.json
    python3 tools/flag_parity.py --compare $OUT/tokens_default.json $OUT/tokens_skip_temp.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DETERMINISTIC = "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"


def generate(args) -> dict:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DETERMINISTIC}".strip()
    import numpy as np

    from infinilora_jax import SamplingParams
    from infinilora_jax.bench.replay import benchmark_llm

    llm, names = benchmark_llm(args.model or None, args.adapters, args.rank, args.slots, dtype="float32",
                               num_layers=args.num_layers or None, max_num_seqs=args.requests,
                               max_num_batched_tokens=256, max_model_len=args.prompt_len + args.max_tokens + 1,
                               precompile=False, distinct=args.adapters)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, llm.config.vocab_size, args.prompt_len).tolist() for _ in range(args.requests)]
    adapters = [None if i % 5 == 4 else names[i % len(names)] for i in range(args.requests)]
    out = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True),
                       adapter=adapters)
    return {"xla_flags": os.environ["XLA_FLAGS"], "staging": llm.runner.adapters.staging,
            "async_scheduling": llm.engine.async_scheduling, "tokens": [o.token_ids for o in out]}


def compare(a: dict, b: dict) -> int:
    """Prints how many requests' tokens are equal; returns the number that differ."""
    differ = [i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y]
    print(f"  {len(a['tokens']) - len(differ)} of {len(a['tokens'])} requests give equal tokens "
          f"({a['xla_flags']!r} vs {b['xla_flags']!r})")
    for i in differ[:5]:
        x, y = a["tokens"][i], b["tokens"][i]
        first = next(k for k in range(min(len(x), len(y))) if x[k] != y[k])
        print(f"  request {i}: first differs at token {first}")
    return len(differ)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="configs/models/qwen3-30b-a3b.json", help="'': the bundled tiny model")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--slots", type=int, default=4, help="device adapter slots (fewer than adapters: loads)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=48)
    parser.add_argument("--max_tokens", type=int, default=12)
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        with open(args.compare[0]) as fa, open(args.compare[1]) as fb:
            sys.exit(1 if compare(json.load(fa), json.load(fb)) else 0)
    result = generate(args)
    print(f"  {len(result['tokens'])} requests, staging {result['staging']}, async {result['async_scheduling']}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
