"""Which attention implementation a model uses, and the KV cache layout that goes with it.

    REFERENCE      gather each row's pages + einsum (models/attention/reference.py): every platform, CPU default
    TPU            jax's Mosaic TPU ragged paged attention kernel over every row at once (tpu.py): TPU default
    GPU            jax's Pallas (Triton) paged decode kernel for decode rows, the reference for prefill tiles
                   (gpu.py): GPU default
    TPU_INTERPRET  the TPU kernel under the Pallas TPU interpreter (CPU tests; jax 0.11.2's interpreter cannot
                   run it, see tests/test_attention.py)
    TPU_EMULATED   the TPU backend (its cache layout, metadata and output handling) with the kernel replaced by a
                   pure-JAX implementation of the kernel's contract (ragged.py): how CPU tests run the TPU path
    GPU_INTERPRET  the GPU backend with the Triton kernel run by the Pallas interpreter (CPU tests)

The backend is fixed when the model is built (`CausalLM(..., attention_backend=...)`): explicit argument, else
the `use_backend` context active then, else the environment variable INFINILORA_ATTENTION (a backend name; e.g.
`reference` to leave the kernels out of a run), else the platform default. It is fixed there, not per trace,
because the KV cache layout is chosen with it when the cache is allocated (models/step.py) and jit caches would
not see a change of context.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import os

import jax

ENV_VAR = "INFINILORA_ATTENTION"


class AttentionBackend(enum.Enum):
    REFERENCE = "reference"
    TPU = "tpu"
    TPU_INTERPRET = "tpu_interpret"
    TPU_EMULATED = "tpu_emulated"
    GPU = "gpu"
    GPU_INTERPRET = "gpu_interpret"

    @property
    def layout(self) -> str:
        """'pages' (K and V [num_pages, page, kv_heads, hd]), 'combined' (one [num_pages, page, 2 * kv_heads,
        hd_pad] array, K and V interleaved on heads) or 'head_major' (K and V [kv_heads, num_pages, page, hd])."""
        if self in (AttentionBackend.TPU, AttentionBackend.TPU_INTERPRET, AttentionBackend.TPU_EMULATED):
            return "combined"
        if self in (AttentionBackend.GPU, AttentionBackend.GPU_INTERPRET):
            return "head_major"
        return "pages"


_BACKEND: contextvars.ContextVar[AttentionBackend | None] = contextvars.ContextVar("attention_backend",
                                                                                   default=None)


@contextlib.contextmanager
def use_backend(backend: AttentionBackend | str):
    """Models built inside the block use `backend` (unless given one explicitly)."""
    token = _BACKEND.set(AttentionBackend(backend))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def select_backend(backend: AttentionBackend | str | None = None, platform: str | None = None) -> AttentionBackend:
    """Explicit argument, else the `use_backend` context, else $INFINILORA_ATTENTION, else by platform (tpu: TPU,
    gpu: GPU, else REFERENCE). On an H200 the GPU kernel took 0.52-0.65x the reference's time for 64 decode rows
    at 512-8192 tokens of context, and its bf16 decode logprobs are as close to float32 as the reference's in
    bf16 (docs/benchmarks.md); INFINILORA_ATTENTION=reference leaves it out."""
    if backend is not None:
        return AttentionBackend(backend)
    if _BACKEND.get() is not None:
        return _BACKEND.get()
    if os.environ.get(ENV_VAR):
        return AttentionBackend(os.environ[ENV_VAR])
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return AttentionBackend.TPU
    if platform == "gpu":
        return AttentionBackend.GPU
    return AttentionBackend.REFERENCE
