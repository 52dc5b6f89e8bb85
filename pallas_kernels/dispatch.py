"""One entry point for multi-LoRA math: picks the implementation by platform and shape.

    TPU            -> the Mosaic TPU kernels (pallas_kernels/tpu/); decode or prefill variant by row count
    GPU            -> by row count and pool rank: the Mosaic GPU kernels (pallas_kernels/gpu/) for calls of
                      at least gpu_kernel_min_rows(rank) rows (prefill; the GPU block table's per-device
                      crossover; INFINILORA_GPU_KERNEL_MIN_ROWS=rank:rows,... overrides it), the pure-JAX
                      reference below (decode); backend="gpu" (or INFINILORA_LORA_BACKEND=gpu) forces the kernels
    CPU            -> the pure-JAX reference
    TPU_INTERPRET  -> the TPU kernels run by the Pallas TPU interpreter on CPU (tests; asked for explicitly)
    GPU_INTERPRET  -> the GPU kernels run by the Mosaic GPU interpreter on CPU (tests; asked for explicitly)

The choice is made at trace time: pass `backend=`, or wrap tracing in `with use_backend(...)`, or set the
environment variable INFINILORA_LORA_BACKEND (reference, tpu, gpu, ...), or leave all out for the platform
default. The GPU kernels take 16-bit activations and pages; other dtypes run the reference.

`lora_delta` / `expert_lora_delta` have the reference's signatures and return the float32 delta; `add_lora`,
`add_expert_lora` and `add_lora_fused` return y + delta summed in float32 and rounded once
(`reference.add_delta`), which is what the model does with every delta: on TPU the kernels add it into y in
place, for several outputs of one input in one launch (q/k/v, gate/up).

Pages come in the pool's layout (A [S, (E,) D_in, R], B [S, (E,) R, *out]). The TPU kernels read rank-major A
rows, so A is transposed per call unless `a_rank_major=True` says it is already stored as [S, (E,) R, D_in]
(as the adapter pool stores it, and the models pass; docs/architecture/06-lora-kernels.md). `slot_ranks` ([S] int32, the
true rank of each slot's adapter) lets the kernels skip the zero padding above each adapter's rank; without it
every slot but 0 is taken to use the pool's full rank. `blocks` overrides the kernels' per-device settings:
TPU `Blocks` (tpu/tuned_blocks.json) or GPU `GpuBlocks` (gpu/tuned_blocks.json), for the backend chosen.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from infinilora_jax.lora import reference
from infinilora_jax.trace_choice import TraceTimeChoice
from pallas_kernels.gpu import block_tables as gpu_block_tables
from pallas_kernels.gpu import ops as gpu_ops
from pallas_kernels.gpu.block_tables import GpuBlocks
from pallas_kernels.layout import PageTable, a_rows_from_pool, b_rows_from_pool, padded_rank
from pallas_kernels.tpu.block_tables import blocks_for, device_key
from pallas_kernels.tpu.ops import Blocks, lora_apply


class LoraBackend(enum.Enum):
    REFERENCE = "reference"
    TPU = "tpu"
    TPU_INTERPRET = "tpu_interpret"
    GPU = "gpu"
    GPU_INTERPRET = "gpu_interpret"


ENV_VAR = "INFINILORA_LORA_BACKEND"
_GPU_BACKENDS = (LoraBackend.GPU, LoraBackend.GPU_INTERPRET)


AUTO = "auto"  # by platform and rows (select_backend)
CHOICE = TraceTimeChoice("LoRA backend", ENV_VAR, [AUTO, *(b.value for b in LoraBackend)], AUTO, "use_backend")


def use_backend(backend: LoraBackend | str):
    """Make every LoRA call traced inside the block use `backend` (jit caches keep what they traced)."""
    return CHOICE.use(LoraBackend(backend).value)


def gpu_kernel_min_rows(dtype=jnp.bfloat16, rank: int | None = None) -> int:
    """GPU default: the kernels for calls of at least this many rows (tokens, or token x expert pairs) on a pool
    of rank `rank`, from the GPU block table (pallas_kernels/gpu/tuned_blocks.json, `kernel_min_rows` and
    `kernel_min_rows_by_rank`) of this device.

    The reference gathers each row's whole page (rows x rank x D_in bytes), the kernels read each distinct page
    once, so the crossover falls as the rank grows. H200, device time per call (docs/benchmarks.md, ninth and
    twelfth sessions): rank 16 dense 4096 x 4096 at 1,024 rows reference 37.8 us, kernels 43.3; at 2,048 73.1
    against 66.6; rank 32 per expert (Qwen3 gate_up) at 512 rows 85.0 against 63.8; rank 64 at 256 rows 102.8
    against 36.5 (at 16 rows 7.6 against 15.6); rank 128 at 64 rows 38.1 against 30.4.

    H200 (docs/benchmarks.md, ninth session, device time): from 1,024 rows the kernels' delta is 5.6-14x faster
    than the reference's gather + einsum (2.8x per expert at 8,192 rows). Below, the reference wins small dense
    calls (rank 16 at 1-256 tokens: 1.6-16 us against 9-29 us); the kernels win some decode shapes (per-expert
    decode 1.25-1.9x, rank >= 64 at 64-256 tokens 1.3-2.7x), but every Mosaic GPU kernel instance adds to the
    engine's compile time (with them at decode, a 2-layer Qwen3 engine had not finished compiling after 125 s;
    without, prefill and compile took 38 s), and the whole decode step's gain is not measured yet: the H200
    entry keeps decode on the reference. Twelfth session, the same engine with the kernels for every call
    compiles in 102 s (reference 38 s) and its step is busier (LoRA adds 550 us of device time, the reference
    381 us): the H200 entry floors every rank's crossover at 1,024 rows."""
    on_gpu = jax.default_backend() == "gpu"
    device = gpu_block_tables.current_device_key(interpret=not on_gpu)
    blocks = gpu_block_tables.blocks_for(device, jnp.dtype(dtype).name)
    if override := os.environ.get(MIN_ROWS_ENV_VAR):
        blocks = dataclasses.replace(blocks, kernel_min_rows_by_rank=parse_min_rows_by_rank(override))
    return blocks.min_rows_for(rank)


# "rank:rows,...": replaces the block table's per-rank crossover (kernel_min_rows_by_rank), e.g. by the
# measured, unfloored crossovers (the entry's kernel_crossover_rows_by_rank) for a step-level experiment. Read
# when a program is traced: set it before the process starts.
MIN_ROWS_ENV_VAR = "INFINILORA_GPU_KERNEL_MIN_ROWS"


def parse_min_rows_by_rank(text: str) -> tuple[tuple[int, int], ...]:
    """"16:2048,32:256" -> ((16, 2048), (32, 256)); ValueError naming the variable for anything else."""
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError
        return gpu_block_tables.GpuBlocks(kernel_min_rows_by_rank=pairs).kernel_min_rows_by_rank
    except ValueError:
        raise ValueError(f"{MIN_ROWS_ENV_VAR}={text!r}: rank:rows pairs by rising rank, e.g. 16:2048,32:256") from None


def select_backend(backend: LoraBackend | str | None = None, platform: str | None = None,
                   rows: int | None = None, dtype=jnp.bfloat16, rank: int | None = None) -> LoraBackend:
    """Explicit argument, else the `use_backend` context, else $INFINILORA_LORA_BACKEND, else by platform
    (TPU: kernels; GPU: kernels for 16-bit calls of at least gpu_kernel_min_rows(rank) rows, else reference;
    CPU: reference). `rank`: the pool rank of the call's pages (the largest of its targets')."""
    if backend is not None:
        return LoraBackend(backend)
    name = CHOICE.selected()
    if name != AUTO:
        return LoraBackend(name)
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return LoraBackend.TPU
    if (platform == "gpu" and rows is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and rows >= gpu_kernel_min_rows(dtype, rank)):
        return LoraBackend.GPU
    return LoraBackend.REFERENCE


def _blocks(backend: LoraBackend, x: jax.Array, out_widths, max_rank: int) -> Blocks:
    device = "interpret" if backend is LoraBackend.TPU_INTERPRET else device_key(jax.devices()[0].device_kind)
    return blocks_for(device, x.dtype, d_in=x.shape[-1], out_widths=tuple(out_widths), max_rank=max_rank)


def _kernel_apply(backend, ys, x, slots, experts, pairs, *, num_experts, slot_ranks, a_rank_major, blocks,
                  rows_grouped=False, row_runs=None):
    """ys[i] (flat [M, N_i]) + delta of pair i, through the TPU or GPU kernels. rows_grouped, row_runs: see
    expert_lora_delta and add_lora_fused (the GPU kernels then leave the rows in place; the TPU kernels sort
    them anyway)."""
    ranks = [_pool_rank(b, experts is not None) for _, b in pairs]
    _check_blocks(backend, blocks)
    if backend in _GPU_BACKENDS:
        return _gpu_apply(backend, ys, x, slots, experts, pairs, ranks, num_experts=num_experts,
                          slot_ranks=slot_ranks, a_rank_major=a_rank_major, blocks=blocks,
                          rows_grouped=rows_grouped, row_runs=row_runs)
    if blocks is None:
        blocks = _blocks(backend, x, [y.shape[1] for y in ys], max(ranks))
    rb = blocks.rank_block
    if slot_ranks is None or not isinstance(slot_ranks, (tuple, list)):
        slot_ranks = (slot_ranks,) * len(pairs)
    a_rows, b_rows, tables = [], [], []
    for (a, b), rank, sr in zip(pairs, ranks, slot_ranks):
        a_rows.append(a_rows_from_pool(a, rb, rank_major=a_rank_major))
        b_rows.append(b_rows_from_pool(b, 2 if experts is not None else 1, rb))
        sr = None if sr is None else jnp.minimum(jnp.asarray(sr, jnp.int32), rank)
        tables.append(PageTable.padded(b.shape[0], num_experts, padded_rank(rank, rb), rb, sr))
    keys, active = _group_keys(slots, experts, num_experts)
    interpret = pltpu.InterpretParams() if backend is LoraBackend.TPU_INTERPRET else False
    return lora_apply(tuple(ys), x, keys, active, tuple(a_rows), tuple(b_rows), tuple(tables),
                      num_experts=num_experts, blocks=blocks, interpret=interpret)


def _check_blocks(backend: LoraBackend, blocks) -> None:
    """`blocks=` is the chosen kernels' kind: TPU `Blocks` or GPU `GpuBlocks` (None: the device's table)."""
    want = GpuBlocks if backend in _GPU_BACKENDS else Blocks
    if blocks is not None and not isinstance(blocks, want):
        raise TypeError(f"blocks={blocks!r} given for the {backend.value} backend, which takes {want.__name__}")


def gpu_supports(x: jax.Array, pairs, widths) -> bool:
    """The GPU kernels multiply 16-bit activations by pages of the same dtype (wgmma), in 64-wide blocks of
    D_in and of each (flattened) output width."""
    return (x.dtype in (jnp.bfloat16, jnp.float16) and x.shape[-1] % 64 == 0
            and all(a.dtype == x.dtype and b.dtype == x.dtype for a, b in pairs)
            and all(w % 64 == 0 for w in widths))


def _gpu_apply(backend, ys, x, slots, experts, pairs, ranks, *, num_experts, slot_ranks, a_rank_major, blocks,
               rows_grouped, row_runs):
    """Through the Mosaic GPU kernels: pages of the pool rank padded to 16 (the wgmma K step) in rank blocks of
    16, so `slot_ranks` tells each slot's rank rows: the kernels skip empty slots, mask the rest, and with
    GpuBlocks.rank_buckets read only the rows a slot's rank needs."""
    if not gpu_supports(x, pairs, [y.shape[1] for y in ys]):
        return tuple(reference.add_delta(y, delta) for y, delta in zip(
            ys, _reference_deltas(x, slots, experts, pairs, a_rank_major)))
    if slot_ranks is None or not isinstance(slot_ranks, (tuple, list)):
        slot_ranks = (slot_ranks,) * len(pairs)
    a_rows, b_rows, tables = [], [], []
    for (a, b), rank, sr in zip(pairs, ranks, slot_ranks):
        rb = padded_rank(rank, 16)
        a_rows.append(a_rows_from_pool(a, rb, rank_major=a_rank_major))
        b_rows.append(b_rows_from_pool(b, 2 if experts is not None else 1, rb))
        sr = None if sr is None else jnp.minimum(jnp.asarray(sr, jnp.int32), rank)
        tables.append(PageTable.padded(b.shape[0], num_experts, rb, 16, sr))
    keys, active = _group_keys(slots, experts, num_experts)
    interpret = plgpu.InterpretGPUParams() if backend is LoraBackend.GPU_INTERPRET else None
    return gpu_ops.lora_apply(tuple(ys), x, keys, active, tuple(a_rows), tuple(b_rows), tuple(tables),
                              num_experts=num_experts, interpret=interpret, blocks=blocks,
                              rows_grouped=rows_grouped, row_runs=row_runs)


def _reference_deltas(x, slots, experts, pairs, a_rank_major):
    return [reference.expert_lora_delta(x, slots, experts, a, b, a_rank_major=a_rank_major) if experts is not None
            else reference.lora_delta(x, slots, a, b, a_rank_major=a_rank_major) for a, b in pairs]


def _group_keys(slots, experts, num_experts: int):
    """(group key per row: its slot, or slot * E + expert; whether the row has any LoRA work)."""
    if experts is None:
        return slots.astype(jnp.int32), slots > 0
    valid = (experts >= 0) & (experts < num_experts)
    keys = slots.astype(jnp.int32) * num_experts + jnp.where(valid, experts, 0).astype(jnp.int32)
    return keys, valid & (slots > 0)


def _pool_rank(lora_b: jax.Array, expert: bool) -> int:
    """The rank the pool pads a target's pages to (B [S, (E,) R, *out])."""
    return lora_b.shape[2 if expert else 1]


def _out_shape(lora_b: jax.Array, expert: bool) -> tuple[int, ...]:
    return lora_b.shape[3:] if expert else lora_b.shape[2:]


def lora_delta(x: jax.Array, slots: jax.Array, lora_a: jax.Array, lora_b: jax.Array, *, slot_ranks=None,
               a_rank_major: bool = False, backend=None, blocks: Blocks | GpuBlocks | None = None,
               row_runs: int | None = None) -> jax.Array:
    """[N, *out] float32 delta of a dense projection, one slot per token (reference.lora_delta); row_runs: see
    add_lora_fused."""
    chosen = select_backend(backend, rows=x.shape[0], dtype=x.dtype, rank=_pool_rank(lora_b, False))
    if chosen is LoraBackend.REFERENCE:
        return reference.lora_delta(x, slots, lora_a, lora_b, a_rank_major=a_rank_major)
    out = _out_shape(lora_b, False)
    zeros = jnp.zeros((x.shape[0], math.prod(out)), jnp.float32)
    (delta,) = _kernel_apply(chosen, (zeros,), x, slots, None, ((lora_a, lora_b),), num_experts=1,
                             slot_ranks=slot_ranks, a_rank_major=a_rank_major, blocks=blocks, row_runs=row_runs)
    return delta.reshape(x.shape[0], *out)


def expert_lora_delta(x: jax.Array, slots: jax.Array, experts: jax.Array, lora_a: jax.Array, lora_b: jax.Array, *,
                      slot_ranks=None, a_rank_major: bool = False, backend=None,
                      blocks: Blocks | GpuBlocks | None = None, rows_grouped: bool = False) -> jax.Array:
    """[M, *out] float32 per-expert delta; rows with an out-of-range expert get zero
    (reference.expert_lora_delta). rows_grouped: the caller guarantees that the rows of each (slot, expert)
    pair with work are contiguous (rows sorted by (expert, slot), as the MoE layer sorts them); the GPU kernels
    then neither sort x nor gather the delta back. Other rows (slot 0, padding experts) may lie anywhere."""
    chosen = select_backend(backend, rows=x.shape[0], dtype=x.dtype, rank=_pool_rank(lora_b, True))
    if chosen is LoraBackend.REFERENCE:
        return reference.expert_lora_delta(x, slots, experts, lora_a, lora_b, a_rank_major=a_rank_major)
    out = _out_shape(lora_b, True)
    zeros = jnp.zeros((x.shape[0], math.prod(out)), jnp.float32)
    (delta,) = _kernel_apply(chosen, (zeros,), x, slots, experts, ((lora_a, lora_b),),
                             num_experts=lora_a.shape[1], slot_ranks=slot_ranks, a_rank_major=a_rank_major,
                             blocks=blocks, rows_grouped=rows_grouped)
    return delta.reshape(x.shape[0], *out)


def paged_lora_delta(x: jax.Array, slots: jax.Array, experts: jax.Array | None, a_rows: jax.Array,
                     b_rows: jax.Array, table: PageTable, *, num_experts: int = 1, b_table: PageTable | None = None,
                     backend=None, blocks: Blocks | GpuBlocks | None = None, row_runs: int | None = None) -> jax.Array:
    """[M, D_out] float32 delta with pages in row arenas addressed by a PageTable (reference.paged_lora_delta):
    the form the disaggregated LoRA server keeps its pages in (arenas are whole-array views of role buffers).
    The kernels read the arenas directly. `b_table` (B pages placed at other rows than A's, same strides and
    block counts): the GPU kernels take it; the TPU kernels address A and B with one table, so there it runs on
    the reference. row_runs: as add_lora_fused's (the GPU kernels take the rows in place)."""
    width = table.max_blocks * table.rank_block
    chosen = select_backend(backend, rows=x.shape[0], dtype=x.dtype, rank=width)
    # the GPU kernels read arena rows in 8-row SMEM tiles (layout.py rank blocks are multiples of 8)
    gpu_ok = (gpu_supports(x, [(a_rows, b_rows)], [b_rows.shape[1]]) and width % 16 == 0
              and a_rows.shape[0] % 8 == 0 and b_rows.shape[0] % 8 == 0)
    if chosen is LoraBackend.REFERENCE or (chosen in _GPU_BACKENDS and not gpu_ok):
        return reference.paged_lora_delta(x, slots, experts, a_rows, b_rows, table, num_experts, b_table)
    if b_table is not None and chosen not in _GPU_BACKENDS:
        return reference.paged_lora_delta(x, slots, experts, a_rows, b_rows, table, num_experts, b_table)
    _check_blocks(chosen, blocks)
    if blocks is None and chosen not in _GPU_BACKENDS:
        blocks = _blocks(chosen, x, [b_rows.shape[1]], width)
        blocks = dataclasses.replace(blocks, rank_block=table.rank_block)
    keys, active = _group_keys(slots, experts, num_experts)
    zeros = jnp.zeros((x.shape[0], b_rows.shape[1]), jnp.float32)
    if chosen in _GPU_BACKENDS:  # pages of `width` rows; columns past a page's own blocks are masked
        interpret = plgpu.InterpretGPUParams() if chosen is LoraBackend.GPU_INTERPRET else None
        (delta,) = gpu_ops.lora_apply((zeros,), x, keys, active, (a_rows,), (b_rows,), (table,),
                                      num_experts=num_experts, interpret=interpret, b_tables=(b_table,),
                                      blocks=blocks, row_runs=row_runs)
        return delta
    interpret = pltpu.InterpretParams() if chosen is LoraBackend.TPU_INTERPRET else False
    (delta,) = lora_apply((zeros,), x, keys, active, (a_rows,), (b_rows,), (table,), num_experts=num_experts,
                          blocks=blocks, interpret=interpret)
    return delta


def add_lora_fused(ys: tuple[jax.Array, ...], x: jax.Array, slots: jax.Array, pairs, *, experts=None,
                   slot_ranks=None, a_rank_major: bool = False, backend=None,
                   blocks: Blocks | GpuBlocks | None = None, row_runs: int | None = None) -> tuple[jax.Array, ...]:
    """ys[i] + delta of pairs[i] = (A_i, B_i) for targets that share the input x, in one launch on TPU.

    ys[i]: [M, *out_i] in any float dtype (the result has it); pairs: pool pages as in `lora_delta` (or
    `expert_lora_delta` when `experts` [M] is given); slot_ranks: None, one [S] array, or one per pair.
    row_runs: the caller guarantees that the rows with work form at most this many runs of one slot (or
    (slot, expert)) each, a slot possibly in several runs: a step's tokens, where each sequence's tokens are
    one run, so its sequence count bounds them. The GPU kernels then take the rows in place (no sort, no
    gather of x, none of the delta back); the reference and the TPU kernels ignore it.
    """
    expert = experts is not None
    chosen = select_backend(backend, rows=x.shape[0], dtype=x.dtype,
                            rank=max(_pool_rank(b, expert) for _, b in pairs))
    if chosen is LoraBackend.REFERENCE:
        return tuple(reference.add_delta(y, delta) for y, delta in zip(
            ys, _reference_deltas(x, slots, experts, pairs, a_rank_major)))
    flat = tuple(y.reshape(y.shape[0], -1) for y in ys)
    res = _kernel_apply(chosen, flat, x, slots, experts, tuple(pairs),
                        num_experts=pairs[0][0].shape[1] if expert else 1, slot_ranks=slot_ranks,
                        a_rank_major=a_rank_major, blocks=blocks, row_runs=row_runs)
    return tuple(r.reshape(y.shape) for r, y in zip(res, ys))


def add_lora(y: jax.Array, x: jax.Array, slots: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
             **kwargs) -> jax.Array:
    """y + lora_delta(...), summed in float32 and rounded once to y.dtype (reference.add_delta)."""
    return add_lora_fused((y,), x, slots, ((lora_a, lora_b),), **kwargs)[0]


def add_expert_lora(y: jax.Array, x: jax.Array, slots: jax.Array, experts: jax.Array, lora_a: jax.Array,
                    lora_b: jax.Array, **kwargs) -> jax.Array:
    """y + expert_lora_delta(...), summed in float32 and rounded once to y.dtype."""
    return add_lora_fused((y,), x, slots, ((lora_a, lora_b),), experts=experts, **kwargs)[0]



