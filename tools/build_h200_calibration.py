"""Write configs/calibration/h200.json: step-time models from the H200 numbers recorded in docs/benchmarks.md.

Measured (docs/benchmarks.md, 2026-11-30, one NVIDIA H200, jax 0.11.2, bf16, random weights, rank-16 adapters on
q/k/v/o, router and both expert projections):
  decode_step.py   Mixtral-8x7B widths, 8 layers, 64 decode rows over 32 adapters: 13.48 ms; no adapters 11.40 ms
                   Qwen3-30B-A3B widths, 4 layers, same: 9.21 ms; no adapters 7.37 ms
  hf_baseline.py   Mixtral, 8 layers: 64 requests (32-token prompts, 64 new tokens, 32 adapters) in 4,096 tokens /
                   3,815.8 tokens/s = 1,073.4 ms of engine steps (max_num_batched_tokens 512, 8 prefill rows)
The decode points fix the adapter term and (const + 64 * tokens_coef); the hf_baseline run, whose step sequence
follows from the scheduler (enumerated below), fixes tokens_coef for Mixtral. For Qwen3 no run separates the
token term: its tokens_coef is Mixtral's scaled by active parameters per token per layer (extrapolated, marked).
host_ms (the per-step host work that does not grow with depth) is not measured on the GPU host; the value used
is the CPU machine's: the median time outside the runner's jitted call of 64-row steps (docs/benchmarks.md,
step-time calibration: calibrate_step_time.py --max_num_seqs 64 ..., 1.07 ms).

    python tools/build_h200_calibration.py --host_ms 1.07
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from infinilora_jax.bench import calibration, model_shapes  # noqa: E402
from infinilora_jax.lora.targets import ALL_TARGETS  # noqa: E402

F = flags.FLAGS
flags.DEFINE_float("host_ms", 1.07, "per-step host time (not scaled with depth)")
flags.DEFINE_string("out", "configs/calibration/h200.json", "")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MACHINE = "one NVIDIA H200 (141 GB), jax 0.11.2, bf16"
DECODE_CMD = ("PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 benchmarks/decode_step.py --model "
              "configs/models/{m}.json --num_layers {l} --requests 64 --adapters 32 --rank 16 --prompt_len 32 "
              "--steps 16")
HF_CMD = ("PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/hf_baseline.py all --model "
          "configs/models/mixtral-8x7b.json --num_layers 8 --requests 64 --adapters 32 --rank 16 --prompt_len 32 "
          "--new_tokens 64")


def hf_baseline_steps(requests=64, prompt=32, new=64, adapters=32, prefill_rows=8) -> list[tuple[int, int]]:
    """(tokens, distinct adapters) of every step of the hf_baseline engine run: groups of `prefill_rows`
    prompts are prefilled one group per step (each step's budget of 512 tokens holds a group's 256 plus the
    decodes of earlier groups), each request then decodes new - 1 tokens, request i uses adapter i % adapters."""
    groups = requests // prefill_rows
    admitted = [(g * prefill_rows, (g + 1) * prefill_rows) for g in range(groups)]
    steps = []
    for s in range(groups + new - 1):  # step s: groups <= s are running, group s is prefilling
        rows = [i for g, (lo, hi) in enumerate(admitted) if g <= s < g + new for i in range(lo, hi)]
        tokens = sum(prompt if s == i // prefill_rows else 1 for i in rows)
        steps.append((tokens, len({i % adapters for i in rows})))
    return steps


def main(argv):
    del argv
    h = F.host_ms
    provenance = {"date": "2026-11-30", "machine": MACHINE,
                  "host_ms": f"{h} ms, measured on the CPU machine (not on the GPU host)"}
    # Mixtral: a + 64 b = 11.40, c = (13.48 - 11.40) / 32, sum over the hf_baseline steps of (a + b T + c A) = 1073.4
    steps = hf_baseline_steps()
    c = (13.48 - 11.40) / 32
    n, tokens, adapters = len(steps), sum(t for t, _ in steps), sum(a for _, a in steps)
    wall = 4096 / 3815.8 * 1e3
    b = (wall - n * 11.40 - c * adapters) / (tokens - 64 * n)
    a = 11.40 - 64 * b
    mixtral = calibration.StepTimeModel(
        "mixtral-8x7b", 8, (a - h) / 8, b / 8, c / 8, h, 16, ALL_TARGETS, "configs/models/mixtral-8x7b.json", False,
        {**provenance, "command": [DECODE_CMD.format(m="mixtral-8x7b", l=8), HF_CMD],
         "derivation": f"decode points fix c and a + 64 b; the hf_baseline run ({n} steps, {tokens} tokens, "
                       f"{adapters} adapter-steps, {wall:.1f} ms) fixes b"},
        ({"tokens": 64, "adapters": 32, "rows": 64, "layers": 8, "ms": 13.48},
         {"tokens": 64, "adapters": 0, "rows": 64, "layers": 8, "ms": 11.40},
         {"tokens": tokens, "adapters": adapters, "rows": n, "layers": 8, "ms": round(wall, 1)}))
    shapes = {m: model_shapes.load(os.path.join(ROOT, "configs", "models", f"{m}.json"))
              for m in ("mixtral-8x7b", "qwen3-30b-a3b")}

    def active(shape):
        return float(np.mean([shape.active_layer_params(i) for i in range(shape.num_layers)]))

    q_tokens = mixtral.tokens_coef * active(shapes["qwen3-30b-a3b"]) / active(shapes["mixtral-8x7b"])
    qwen = calibration.StepTimeModel(
        "qwen3-30b-a3b", 4, (7.37 - h) / 4 - 64 * q_tokens, q_tokens, (9.21 - 7.37) / 32 / 4, h, 16, ALL_TARGETS,
        "configs/models/qwen3-30b-a3b.json", False,
        {**provenance, "command": [DECODE_CMD.format(m="qwen3-30b-a3b", l=4)],
         "derivation": "decode points fix the adapter term and const + 64 tokens_coef; tokens_coef is EXTRAPOLATED "
                       "(Mixtral's, scaled by active parameters per token per layer)"},
        ({"tokens": 64, "adapters": 32, "rows": 64, "layers": 4, "ms": 9.21},
         {"tokens": 64, "adapters": 0, "rows": 64, "layers": 4, "ms": 7.37}))
    calibration.save(F.out, {"mixtral-8x7b": mixtral, "qwen3-30b-a3b": qwen},
                     note="Step-time models (per layer) from the H200 runs in docs/benchmarks.md; written by "
                          "tools/build_h200_calibration.py")
    for m in (mixtral, qwen):
        print(f"  {m.name:<15} {m.layers} layers: host {m.host_ms} ms, per layer const {m.const:.4f} ms, "
              f"{m.tokens_coef * 1e3:.3f} us/token, {m.adapters_coef * 1e3:.3f} us/adapter")


if __name__ == "__main__":
    app.run(main)
