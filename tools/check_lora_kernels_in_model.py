"""Drop-in check of the LoRA dispatcher in the whole model, before the model calls it.

Runs teacher-forced logits of a tiny fixture model for several adapters twice: as the model is (the pure-JAX
reference), then with the model's `lora_delta` / `expert_lora_delta` replaced, in this process only, by the
dispatcher on the given backend (default: the TPU kernels in the interpreter). Prints the relative difference
per adapter. Measured on CPU (qwen3-moe-fused, 37 tokens), float32, on 1 device and on pp2_ep2_tp2 (8 CPU
devices): 0 (bit-identical) for every adapter but the rank-16 one, ~5e-7 (its two rank blocks are summed
separately). bfloat16: 1.0-1.3% for every adapter, while the kernels' bf16 deltas match the reference's to ~2e-6
and y + delta differs by at most one ULP: ULP-level differences flip fragile top-k routing in the random tiny
model (docs/architecture/01-model.md, "bfloat16 and routing"), so compare in float32.

    python tools/check_lora_kernels_in_model.py --model qwen3-moe-fused --mesh pp2_ep2_tp2
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", "qwen3-moe-fused", "fixture model under tests/fixtures/models")
flags.DEFINE_string("mesh", None, "named layout (e.g. pp2_ep2_tp2); default one device")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "")
flags.DEFINE_string("backend", "tpu_interpret", "dispatcher backend to compare with the reference")
flags.DEFINE_integer("tokens", 37, "prompt length")


def run(patched: bool) -> dict:
    from infinilora_jax import LLM
    from infinilora_jax.lora import reference
    from infinilora_jax.models import moe, transformer
    from pallas_kernels import dispatch

    if patched:
        dense = lambda *a, **k: dispatch.lora_delta(*a, **k, backend=F.backend)
        expert = lambda *a, **k: dispatch.expert_lora_delta(*a, **k, backend=F.backend)
    else:
        dense, expert = reference.lora_delta, reference.expert_lora_delta
    transformer.lora_delta = moe.lora_delta = dense
    moe.expert_lora_delta = expert
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    adapter_root = os.path.join(fixtures, "adapters", F.model)
    adapters = {n: os.path.join(adapter_root, n) for n in sorted(os.listdir(adapter_root))}
    llm = LLM(os.path.join(fixtures, "models", F.model), adapters=adapters, dtype=F.dtype, mesh=F.mesh,
              progress=False)
    tokens = list(range(3, 3 + F.tokens))
    return {name: np.asarray(llm.logits(tokens, name), np.float64) for name in [None, *adapters]}


def main(argv):
    del argv
    want, got = run(False), run(True)
    for name in want:
        err = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        print(f"{str(name):28s} {err:.3g}")


if __name__ == "__main__":
    app.run(main)
