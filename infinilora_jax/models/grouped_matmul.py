"""Grouped GEMM of rows sorted by group (the MoE expert GEMMs), with the implementation chosen at trace time.

Why: `jax.lax.ragged_dot` is computed as a *dense* masked GEMM over all groups. jax 0.11's CPU lowering does
exactly that (`_ragged_dot_general_impl`: lhs masked and broadcast to [M, G*K], rhs transposed to [G*K, N]: G
times the useful FLOPs, plus a transpose of all expert weights per call), and on GPU the default lowering emits
chlo.ragged_dot, which XLA GPU appears to expand the same way: a profile of a Qwen3-30B-A3B-width decode step
(128 experts, top-8, 512 expert rows per layer) showed ~5.4 ms of big cuBLAS GEMMs and ~1.75 ms of
"loop_transpose_fusion" over 8 layers, matching 128x the useful FLOPs. With 128 experts that is catastrophic at
prefill. The implementations:

    auto               the default: mgpu on GPU where it takes the operands (bf16/f16, aligned N and K), else
                       ragged_dot. On one H200 (benchmarks/expert_gemm.py, docs/benchmarks.md) mgpu ran Qwen3-30B-A3B
                       decode-width expert GEMMs 2.5x (gate_up) and 1.8x (down) faster than ragged_dot, at the copy
                       ceiling for gate_up; an 8-layer coupled decode step took 11.0 ms with it (16.3 ms with
                       ragged_dot in an earlier session).
    ragged_dot         jax.lax.ragged_dot (dense over all groups on CPU and GPU; TPU unmeasured)
    mgpu               jax's Mosaic GPU Hopper kernel (ragged_dot_mgpu); GPU only; 16-bit rows and weights of one
                       dtype, else (or for unaligned shapes) lax.ragged_dot with an ExpertGemmFallback warning
    mgpu_interpret     the same kernel run by the Mosaic GPU interpreter on CPU (tests; asked for explicitly)
    capacity           pure JAX, exact, any platform: rows gathered into per-group buckets [G, C, K], one batched
                       einsum with the weights in their natural layout, gathered back; C is the smallest rung of a
                       static ladder that holds the largest group (chosen at run time with lax.switch)

jax's Pallas Triton lowering of ragged_dot (`jax_ragged_dot_use_gpu_pallas_triton_lowering`) is not an option:
the flag is read when the whole program is lowered, and jax 0.11.2's wheel lacks the kernel's module
(jax._src.lax.pallas_lowerings), so lowering fails with it on.

Choose with `implementation=`, or `with use_expert_gemm(name)` around tracing, or $INFINILORA_EXPERT_GEMM; jit
caches keep what they traced. Rows past sum(group_sizes) come out zero in every implementation, as they do
from lax.ragged_dot (its reference lowering masks every row by its group).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from infinilora_jax.trace_choice import TraceTimeChoice

ENV_VAR = "INFINILORA_EXPERT_GEMM"
DEFAULT = "auto"
GPU_ONLY = ("mgpu",)


class ExpertGemmFallback(UserWarning):
    """An implementation could not take these inputs and lax.ragged_dot computed the product instead."""


def use_expert_gemm(name: str):
    """Make every grouped_matmul traced inside the block use implementation `name`."""
    return CHOICE.use(name)


def selected(implementation: str | None = None) -> str:
    """Explicit argument, else the `use_expert_gemm` context, else $INFINILORA_EXPERT_GEMM, else DEFAULT."""
    return CHOICE.selected(implementation)


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=jnp.float32, precision=None,
                   implementation: str | None = None) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N], group_sizes [G] int -> [M, N]: row i of group g is
    rows[i] @ weights[g]; rows past sum(group_sizes) give zeros. In preferred_element_type (None: rows' dtype)."""
    name = selected(implementation)
    platform = jax.default_backend()
    if name in GPU_ONLY and platform != "gpu":
        raise RuntimeError(f"expert GEMM {name!r} runs on GPU only, and this trace is for {platform!r} "
                           f"(choose one of {', '.join(n for n in IMPLEMENTATIONS if n not in GPU_ONLY)})")
    out_dtype = preferred_element_type or rows.dtype
    return IMPLEMENTATIONS[name](rows, weights, group_sizes.astype(jnp.int32), out_dtype=out_dtype,
                                 precision=precision)


def _ragged_dot(rows, weights, group_sizes, *, out_dtype, precision):
    return jax.lax.ragged_dot(rows, weights, group_sizes, precision=precision, preferred_element_type=out_dtype)


# ------------------------------------------------------------------------------------------------- capacity


def capacity_ladder(m: int, smallest: int = 8) -> list[int]:
    """Static bucket capacities for M rows: powers of two and 1.5x powers of two from `smallest` up, below M,
    then M itself (so every group fits in the top rung). The half steps keep the computed rows within 1.5x of
    the largest group's."""
    rungs = {c for p in range(max(m, 1).bit_length() + 1) for c in (2 ** p, 3 * 2 ** p // 2)}
    return sorted(c for c in rungs if smallest <= c < m) + [m]


def _capacity(rows, weights, group_sizes, *, out_dtype, precision):
    m, g = rows.shape[0], weights.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    row_ids = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, row_ids, side="right")  # == g for rows past sum(group_sizes)
    in_group = row_group < g
    row_group = jnp.minimum(row_group, g - 1)
    row_pos = row_ids - starts[row_group]

    def at_capacity(c):
        def run(rows, weights):
            slot = jnp.arange(c, dtype=jnp.int32)
            take = jnp.minimum(starts[:, None] + slot, m - 1)  # [G, C] row of each bucket slot
            buckets = jnp.where((slot < group_sizes[:, None])[..., None], rows[take], 0)  # [G, C, K]
            out = jnp.einsum("gck,gkn->gcn", buckets, weights, precision=precision,
                             preferred_element_type=out_dtype)
            got = out[row_group, jnp.clip(row_pos, 0, c - 1)]
            return jnp.where(in_group[:, None], got, 0).astype(out_dtype)
        return run

    ladder = capacity_ladder(m)
    if len(ladder) == 1:
        return at_capacity(ladder[0])(rows, weights)
    rung = jnp.searchsorted(jnp.asarray(ladder, jnp.int32), jnp.max(group_sizes), side="left")
    return jax.lax.switch(rung, [at_capacity(c) for c in ladder], rows, weights)


# ------------------------------------------------------------------------------------------------- Mosaic GPU


@dataclasses.dataclass(frozen=True)
class MgpuBlocks:
    """Tiling of ragged_dot_mgpu.ragged_dot. SMEM holds `max_concurrent_steps` (lhs, rhs) block pairs and one
    output block; a Hopper SM has 227 KiB of it."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1

    def smem_bytes(self, itemsize: int = 2) -> int:
        m, n, k = self.block_m, self.block_n, self.block_k
        return itemsize * ((m * k + k * n) * self.max_concurrent_steps + m * n)


SMEM_LIMIT = 227 * 1024
# (most rows M, K, N; None matches any) -> blocks; the first matching rule wins. Untuned guesses: decode (few rows
# per expert; each group's rows start a tile of their own) gets the smallest wgmma M, so a tile wastes less.
# Rules measured by benchmarks/expert_gemm.py --mgpu_blocks go above these.
MGPU_BLOCKS: list[tuple[int | None, int | None, int | None, MgpuBlocks]] = [
    (2048, None, None, MgpuBlocks(block_m=64)),
    (None, None, None, MgpuBlocks()),
]


def mgpu_blocks_for(m: int, k: int, n: int) -> MgpuBlocks:
    for most_rows, rule_k, rule_n, blocks in MGPU_BLOCKS:
        if (most_rows is None or m <= most_rows) and rule_k in (None, k) and rule_n in (None, n):
            return blocks
    return MgpuBlocks()


def mgpu_unsupported(rows, weights) -> str | None:
    """Why the Mosaic GPU kernel cannot take these operands (checked by lowering them for CUDA), or None."""
    k, n = weights.shape[1:]
    if rows.dtype != weights.dtype or rows.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it multiplies bf16 or f16 rows and weights of one dtype (wgmma), got {rows.dtype}, {weights.dtype}"
    if n % 64:
        return f"N={n} is not a multiple of 64 (the 128-byte swizzled tile)"
    if k % 16:
        return f"K={k} is not a multiple of 16 (the wgmma K step)"
    return None


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "interpret"))
def mgpu_grouped_matmul(rows, weights, group_sizes, *, out_dtype=jnp.float32, blocks: MgpuBlocks | None = None,
                        interpret: bool = False) -> jax.Array:
    """The Mosaic GPU kernel (bf16/f16; float32 accumulation, one rounding to the rows' dtype, then out_dtype).

    Rows are padded to a multiple of block_m (the kernel's TMA tiles then never leave the array) and rows past
    sum(group_sizes), which the kernel never writes, are zeroed. block_n and block_k shrink to divide N and K.

    A jit of its own, so a step program builds each distinct kernel once: jax lowers a nested jit's function once
    per program and every layer calls it. Inlined, each layer's call was lowered to its own Mosaic module with a
    different hash (jax numbered the modules), and Mosaic GPU compiles each hash apart: ~0.8 s of lowering and
    ~1.5 s of compilation per layer and GEMM on the H200 host (benchmarks/compile_time.py). Across programs the
    module is lowered once and named by its content (pallas_kernels/gpu/), so the process compiles it once.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    from pallas_kernels.gpu import install_kernel_caches

    install_kernel_caches()  # one lowering and one compile per distinct kernel across step programs
    m, k = rows.shape
    n = weights.shape[2]
    blocks = blocks or mgpu_blocks_for(m, k, n)
    block_n = next(b for b in (blocks.block_n, 128, 64) if n % b == 0)
    block_k = next(b for b in (blocks.block_k, 64, 32, 16) if k % b == 0)
    blocks = dataclasses.replace(blocks, block_n=block_n, block_k=block_k)
    if blocks.smem_bytes(rows.dtype.itemsize) > SMEM_LIMIT:
        raise ValueError(f"{blocks} needs {blocks.smem_bytes() // 1024} KiB of SMEM (> {SMEM_LIMIT // 1024})")
    padded = -(-m // blocks.block_m) * blocks.block_m
    lhs = jnp.pad(rows, ((0, padded - m), (0, 0)))
    kernel = lambda: ragged_dot_mgpu.ragged_dot(
        lhs, weights, group_sizes=group_sizes, block_m=blocks.block_m, block_n=blocks.block_n,
        block_k=blocks.block_k, max_concurrent_steps=blocks.max_concurrent_steps, grid_block_n=blocks.grid_block_n)
    if interpret:
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            out = kernel()
    else:
        out = kernel()
    written = jnp.arange(m)[:, None] < jnp.sum(group_sizes)
    return jnp.where(written, out[:m], 0).astype(out_dtype)


def _mgpu(rows, weights, group_sizes, *, out_dtype, precision, interpret=False):
    reason = mgpu_unsupported(rows, weights)
    if reason is not None:
        warnings.warn(f"mgpu expert GEMM: {reason}; using lax.ragged_dot", ExpertGemmFallback, stacklevel=3)
        return _ragged_dot(rows, weights, group_sizes, out_dtype=out_dtype, precision=precision)
    # precision is moot: 16-bit products accumulate in float32 on the tensor cores
    return mgpu_grouped_matmul(rows, weights, group_sizes, out_dtype=out_dtype, interpret=interpret)


def _auto(rows, weights, group_sizes, *, out_dtype, precision):
    """mgpu on GPU when it takes the operands, else ragged_dot (no warning: this is a choice, not a failure)."""
    name = "mgpu" if jax.default_backend() == "gpu" and mgpu_unsupported(rows, weights) is None else "ragged_dot"
    return IMPLEMENTATIONS[name](rows, weights, group_sizes, out_dtype=out_dtype, precision=precision)


IMPLEMENTATIONS = {
    "auto": _auto,
    "ragged_dot": _ragged_dot,
    "mgpu": _mgpu,
    "mgpu_interpret": lambda *a, **kw: _mgpu(*a, **kw, interpret=True),
    "capacity": _capacity,
}
CHOICE = TraceTimeChoice("expert GEMM implementation", ENV_VAR, IMPLEMENTATIONS, DEFAULT, "use_expert_gemm")


__all__ = ["DEFAULT", "ENV_VAR", "ExpertGemmFallback", "IMPLEMENTATIONS", "MgpuBlocks", "capacity_ladder",
           "grouped_matmul", "mgpu_blocks_for", "mgpu_grouped_matmul", "selected", "use_expert_gemm"]
