"""Drop-in check of the LoRA dispatcher in the whole model, before the model calls it.

Runs teacher-forced logits of a tiny fixture model for several adapters twice: with every LoRA call of the model
on the pure-JAX reference, then on the given dispatcher backend (default: the TPU kernels in the interpreter;
`gpu_interpret` for the Mosaic GPU kernels, which need --dtype bfloat16). Prints the relative difference
per adapter. Measured on CPU (qwen3-moe-fused, 37 tokens, float32, one device, 2026-12-01; the kernels skip the
rank blocks above each slot's page rank, passed from the pool): 4.7-5.3e-7 for every
adapter and 4.9e-7 without one. The no-adapter row differs because XLA's CPU dot rounds differently when its
output feeds the kernels' interpreter rather than the reference's add (the kernels leave y bit-identical where
there is no work: tests/test_pallas_kernels.py); before the model fused q/k/v and gate/up into one call it was
0. (Earlier runs of this tool, which swapped the model's functions instead of tracing under use_backend,
reported 0 for every adapter: the second LLM reused the first one's traced layer program, so they compared the
reference with itself.) bfloat16: ~1% for every adapter, while the kernels' bf16 deltas match the reference's
to ~2e-6 and y + delta differs by at most one ULP: ULP-level differences flip fragile top-k routing in the
random tiny model (docs/architecture/01-model.md, "bfloat16 and routing"), so compare in float32.

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


def run(backend: str) -> dict:
    """Logits per adapter with every LoRA call of the model traced on `backend` (the dispatcher's use_backend:
    jit caches that outlive one LLM key on it, so the two runs do not share traces)."""
    from infinilora_jax import LLM
    from pallas_kernels import dispatch

    fixtures = os.path.join(ROOT, "tests", "fixtures")
    adapter_root = os.path.join(fixtures, "adapters", F.model)
    adapters = {n: os.path.join(adapter_root, n) for n in sorted(os.listdir(adapter_root))}
    with dispatch.use_backend(backend):
        llm = LLM(os.path.join(fixtures, "models", F.model), adapters=adapters, dtype=F.dtype, mesh=F.mesh,
                  progress=False)
        tokens = list(range(3, 3 + F.tokens))
        return {name: np.asarray(llm.logits(tokens, name), np.float64) for name in [None, *adapters]}


def main(argv):
    del argv
    want, got = run("reference"), run(F.backend)
    for name in want:
        err = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        print(f"{str(name):28s} {err:.3g}")


if __name__ == "__main__":
    app.run(main)
