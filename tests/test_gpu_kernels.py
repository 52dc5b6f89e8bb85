"""The Mosaic GPU LoRA kernels (pallas_kernels/gpu/), on CPU.

Two checks, since no GPU is here:
  * numerics: every kernel runs in jax's Mosaic GPU interpreter (`plgpu.InterpretGPUParams`: simulated GMEM and
    SMEM, TMA copies, barriers and wgmma; fresh buffers are NaN, out-of-bounds reads raise), through the
    dispatcher's GPU_INTERPRET backend, against the pure-JAX reference on fresh random inputs;
  * lowering: the same kernels lowered for CUDA (`lower(lowering_platforms=("cuda",))`), which runs Pallas ->
    Mosaic GPU lowering, layout inference and the dialect lowering that builds the TMA copies (gmem tiling,
    strides, boxes), at T not a multiple of 8 too.
    What only a GPU checks: PTX compilation, SMEM addresses of dynamic slices (common.py asserts them at trace
    time), timing, real hardware races. tools/gpu_lora_kernel_check.py does.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from infinilora_jax.lora import reference
from pallas_kernels import dispatch
from pallas_kernels.gpu import ops as gpu_ops
from pallas_kernels.gpu.block_tables import GpuBlocks
from pallas_kernels.gpu.units import TILE_ROWS, UNIT_ROWS, build_units, per_row_units
from pallas_kernels.grouping import group_rows
from pallas_kernels.layout import PageTable, a_rows_from_pool, b_rows_from_pool, total_blocks

GPU = dispatch.LoraBackend.GPU_INTERPRET
BF = jnp.bfloat16


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def make_pages(rng, ranks, d_in, out, experts=None):
    """bf16 pool pages (A [S, (E,) D_in, R], B [S, (E,) R, out]), zero above each slot's rank; slot 0 zero."""
    r = max(ranks)
    lead = (len(ranks),) if experts is None else (len(ranks), experts)
    a = rng.normal(size=(*lead, d_in, r)).astype(np.float32) / np.sqrt(d_in)
    b = rng.normal(size=(*lead, r, out)).astype(np.float32)
    for s, rank in enumerate(ranks):
        a[s, ..., rank:] = 0
        b[s, ..., rank:, :] = 0
    return jnp.asarray(a, BF), jnp.asarray(b, BF)


@pytest.mark.parametrize("long_rows", [64, UNIT_ROWS + 5, 2 * TILE_ROWS + 3])
def test_units_cover_each_group_in_chunks(long_rows):
    """Every active row is in exactly one unit of its group, inside the unit's 64-row window; slot-0 and rank-0
    groups have none; a group of n rows at window offset o takes the fewest units, ceil((o + n) / 64)."""
    slots = jnp.asarray([3, 0, 3, 1] + [2] * 5 + [1] * long_rows + [3] * 2 + [0], jnp.int32)
    table = PageTable.padded(4, 1, 16, 16, jnp.asarray([0, 16, 0, 16]))  # slot 2: rank 0
    grouping = group_rows(slots, slots > 0, num_keys=4)
    units = build_units(grouping, table, num_experts=1)
    count = int(units.count[0])
    assert count <= units.bound
    covered = np.zeros(slots.shape[0], int)
    per_page = {}
    for u in range(count):
        r0, size = int(units.row0[u]), int(units.size[u])
        assert 1 <= size and r0 % 8 + size <= TILE_ROWS  # the rows fit the window the kernels read
        covered[np.asarray(grouping.order)[r0:r0 + size]] += 1
        page = int(units.page_row[u])
        assert page in (16, 48)  # slots 1 and 3 only
        per_page[page] = per_page.get(page, 0) + 1
    want = np.isin(np.asarray(slots), [1, 3]).astype(int)
    np.testing.assert_array_equal(covered, want)
    for slot, page in ((1, 16), (3, 48)):
        g = int(np.flatnonzero(np.asarray(grouping.group_key) == slot)[0])
        start, n = int(grouping.group_start[g]), int(grouping.group_size[g])
        assert per_page[page] == -(-(start % 8 + n) // TILE_ROWS), (slot, start, n)


def test_per_row_units_keep_rows_in_place():
    """One unit per row at its own position: rows with no work (slot 0, a padding expert, a rank-0 slot) have
    size 0; the others point at their (slot, expert) page and the narrowest rank bucket holding it."""
    num_experts = 3
    slots = jnp.asarray([2, 0, 1, 3, 1, 2], jnp.int32)
    experts = jnp.asarray([1, 0, 2, 0, 3, 0], jnp.int32)  # row 4: padding expert
    table = PageTable.padded(4, num_experts, 32, 16, jnp.asarray([0, 16, 32, 0]))  # slot 3: rank 0
    valid = experts < num_experts
    keys = slots * num_experts + jnp.where(valid, experts, 0)
    units = per_row_units(keys, valid & (slots > 0), table, num_experts=num_experts, buckets=(16, 32))
    np.testing.assert_array_equal(units.row0, np.arange(6))
    np.testing.assert_array_equal(units.size, [1, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(units.row_rank, [32, 0, 16, 0, 0, 32])
    np.testing.assert_array_equal(units.bucket, [1, 0, 0, 0, 0, 1])
    page = lambda slot, expert: int((table.start[slot] + expert * table.stride[slot]) * table.rank_block)
    assert [int(units.page_row[i]) for i in (0, 2, 5)] == [page(2, 1), page(1, 2), page(2, 0)]
    assert int(units.count[0]) == 6 and np.all(np.asarray(units.b_page_row) == np.asarray(units.page_row))


PER_ROW = GpuBlocks(per_row_rows=1 << 20)


@pytest.mark.parametrize("ksplit", [1, 2])
def test_per_row_variant_matches_reference_with_poisoned_idle_rows(rng, ksplit):
    """The per-row decode variant (no sort, no gathers): unaligned T, mixed ranks with rank buckets, slot-0 rows
    of y NaN-poisoned and left untouched, an all-slot-0 batch bit-identical, and the grouped variant's result."""
    m, d_in, out = 29, 128, 128
    a, b = make_pages(rng, [0, 32, 16, 32], d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = rng.integers(0, 4, size=m).astype(np.int32)
    idle = slots == 0
    y = jnp.asarray(np.where(idle[:, None], np.nan, rng.normal(size=(m, out))), BF)
    slot_ranks = jnp.asarray([0, 32, 16, 32], jnp.int32)
    blocks = GpuBlocks(per_row_rows=1 << 20, rank_buckets=True, decode_ksplit=ksplit)
    got = np.asarray(dispatch.add_lora(y, x, jnp.asarray(slots), a, b, backend=GPU, blocks=blocks,
                                       slot_ranks=slot_ranks), np.float32)
    assert np.all(np.isnan(got[idle])) and np.all(np.isfinite(got[~idle]))
    want = np.asarray(reference.add_delta(y, reference.lora_delta(x, jnp.asarray(slots), a, b)), np.float32)
    assert rel_err(got[~idle], want[~idle]) < 1e-2
    grouped = np.asarray(dispatch.add_lora(y, x, jnp.asarray(slots), a, b, backend=GPU, slot_ranks=slot_ranks,
                                           blocks=GpuBlocks(rank_buckets=True, decode_ksplit=ksplit)), np.float32)
    np.testing.assert_array_equal(got[~idle], grouped[~idle])
    y0 = jnp.asarray(rng.normal(size=(m, out)), BF)
    same = dispatch.add_lora(y0, x, jnp.zeros((m,), jnp.int32), a, b, backend=GPU, blocks=blocks)
    np.testing.assert_array_equal(np.asarray(same, np.float32), np.asarray(y0, np.float32))


def test_per_row_variant_per_expert_and_fused(rng):
    """Per-expert rows (padding experts, empty (slot, expert) pairs) and two fused targets of different widths
    and ranks in one launch, through the per-row variant."""
    m, num_slots, num_experts, d_in = 40, 3, 4, 64
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts + 1, size=m), jnp.int32)
    a, b = make_pages(rng, [0, 16, 16], d_in, 128, experts=num_experts)
    got = dispatch.expert_lora_delta(x, slots, experts, a, b, backend=GPU, blocks=PER_ROW)
    assert rel_err(got, reference.expert_lora_delta(x, slots, experts, a, b)) < 1e-5
    assert np.all(np.asarray(got)[np.asarray(experts) == num_experts] == 0)
    pairs = [make_pages(rng, [0] + [r] * (num_slots - 1), d_in, w) for w, r in ((256, 32), (64, 16))]
    pairs = [(jnp.swapaxes(pa, -1, -2), pb) for pa, pb in pairs]
    ys = tuple(jnp.zeros((m, w), BF) for w in (256, 64))
    fused = dispatch.add_lora_fused(ys, x, slots, pairs, a_rank_major=True, backend=GPU, blocks=PER_ROW)
    for g, (pa, pb) in zip(fused, pairs):
        want = reference.add_delta(jnp.zeros_like(g), reference.lora_delta(x, slots, pa, pb, a_rank_major=True))
        assert rel_err(np.asarray(g, np.float32), np.asarray(want, np.float32)) < 1e-2


def dense_case(rng, m):
    """A dense call of m rows over a rank-32 pool of 5 slots with mixed ranks (0, 32, 8, 16, 32), 128 -> 192:
    (a, b, x, slots). 130 rows: a group of 100 rows spans several units; 72 rows: the first group, 64 rows of
    slot 1, is one whole 64-row unit."""
    num_slots, d_in, out = 5, 128, 192
    a, b = make_pages(rng, [0, 32, 8, 16, 32], d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = rng.integers(0, num_slots, size=m).astype(np.int32)
    if m == 130:
        slots[:100] = 2
    if m == 72:
        slots[:64], slots[64:] = 1, rng.integers(2, num_slots, size=8)
    return a, b, x, jnp.asarray(slots)


@pytest.mark.parametrize("ksplit", [1, 2])  # prefill (whole D_in per unit) and decode (D_in split)
@pytest.mark.parametrize("m", [1, 17, 72, 130])
def test_dense_delta_matches_reference(rng, m, ksplit):
    """Ragged, unaligned T, groups across units and one whole unit (dense_case); mixed ranks in a rank-32 pool."""
    a, b, x, slots = dense_case(rng, m)
    num_slots, out = a.shape[0], b.shape[-1]
    keys, active = slots, slots > 0
    tables = (PageTable.padded(num_slots, 1, 32, 32),)
    (got,) = gpu_ops.lora_apply((jnp.zeros((m, out), jnp.float32),), x, keys, active,
                                (a_rows_from_pool(a, 32),), (b_rows_from_pool(b, 1, 32),), tables,
                                num_experts=1, ksplit=ksplit, interpret=plgpu.InterpretGPUParams())
    want = reference.lora_delta(x, slots, a, b)
    assert rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(slots) == 0], 0)


def test_expert_delta_matches_reference(rng):
    """(token, k) rows with adapter slots and experts; padding rows (expert == E); empty (slot, expert) groups."""
    m, num_slots, num_experts, d_in, out = 90, 4, 5, 64, 128
    a, b = make_pages(rng, [0, 16, 16, 16], d_in, out, experts=num_experts)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts + 1, size=m), jnp.int32)
    got = dispatch.expert_lora_delta(x, slots, experts, a, b, backend=GPU)
    want = reference.expert_lora_delta(x, slots, experts, a, b)
    assert rel_err(got, want) < 1e-5
    assert np.all(np.asarray(got)[np.asarray(experts) == num_experts] == 0)


def expert_case(rng, m, ranks, d_in, long_rows, rows_grouped):
    """A per-expert call of m rows over len(ranks) slots (slot ranks `ranks`) and 5 experts, d_in -> 128, rows
    of expert 5 padding: (a, b, x, slots, experts, num_experts). The first `long_rows` rows share one (slot 2,
    expert 3) page; rows_grouped: sorted by (expert, slot) as the MoE layer sorts them."""
    num_slots, num_experts = len(ranks), 5
    a, b = make_pages(rng, ranks, d_in, 128, experts=num_experts)
    slots = rng.integers(0, num_slots, size=m)
    experts = rng.integers(0, num_experts + 1, size=m)
    slots[:long_rows], experts[:long_rows] = 2, 3
    if rows_grouped:
        order = np.argsort(experts * num_slots + slots, kind="stable")
        slots, experts = slots[order], experts[order]
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    return a, b, x, jnp.asarray(slots, jnp.int32), jnp.asarray(experts, jnp.int32), num_experts


@pytest.mark.parametrize("m", [90, 300])  # the all-pairs and the scan + search grouping paths
def test_expert_delta_on_rows_grouped_in_place(rng, m):
    """Rows sorted by (expert, slot) as the MoE layer sorts them (slot-0 rows first in each expert, padding
    experts last, one (slot, expert) pair 70 rows long: several units): with rows_grouped the kernels take them
    in place and give the reference's delta, the sorting path's to float32 rounding (the interpreter's matmuls
    may round a row differently at another position in its window: seen on AMD EPYC hosts), zero on rows with no
    work."""
    a, b, x, slots, experts, num_experts = expert_case(rng, m, [0, 16, 16, 8], 64, 70, rows_grouped=True)
    got = dispatch.expert_lora_delta(x, slots, experts, a, b, backend=GPU, rows_grouped=True)
    want = reference.expert_lora_delta(x, slots, experts, a, b)
    assert rel_err(got, want) < 1e-5
    idle = np.asarray((slots == 0) | (experts == num_experts))
    assert np.all(np.asarray(got)[idle] == 0)
    assert rel_err(got, dispatch.expert_lora_delta(x, slots, experts, a, b, backend=GPU)) < 1e-6


def token_runs(rng, m, num_slots):
    """Slots of m tokens in runs, as a step's sequences lay them out (each sequence's tokens one run of its slot):
    runs of 1-40 tokens, every slot in several runs, slot 0 (no adapter, or padding) between. (slots, runs)."""
    lengths = []
    while sum(lengths) < m:
        lengths.append(int(rng.integers(1, 41)))
    lengths[-1] -= sum(lengths) - m
    run_slots = np.arange(len(lengths)) % num_slots  # each slot in several runs, none adjacent to its own
    slots = np.repeat(run_slots, lengths).astype(np.int32)
    return jnp.asarray(slots), int(np.sum(run_slots > 0))


@pytest.mark.parametrize("m,runs_form", [(72, True), (130, False), (300, False)])  # run units, both grouping paths
def test_dense_rows_in_runs_taken_in_place(rng, m, runs_form):
    """Tokens in runs (a step's sequences: one slot may have several runs) with row_runs: the kernels take them
    in place (no sort, no gather of x) and give the reference's delta; fused targets into NaN-poisoned y keep
    slot-0 rows' NaN. A row_runs bound is rejected where the rows would be sorted anyway (grouping needs it
    in place)."""
    num_slots, d_in, out = 5, 128, 192
    a, b = make_pages(rng, [0, 32, 8, 16, 32], d_in, out)
    blocks = RUNS if runs_form else None
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots, runs = token_runs(rng, m, num_slots)
    call = lambda x: dispatch.lora_delta(x, slots, a, b, backend=GPU, blocks=blocks, row_runs=runs)  # noqa: E731
    got = call(x)
    assert rel_err(got, reference.lora_delta(x, slots, a, b)) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(slots) == 0], 0)
    glue = glue_ops(jax.make_jaxpr(call)(x))
    assert "sort" not in {name for name, _ in glue}
    # no gather of x's rows or of the delta's: both stay in place
    assert not [shape for name, shape in glue if name == "gather" and shape[-1:] in ((d_in,), (out,))]
    with pytest.raises(ValueError, match="presorted"):
        group_rows(slots, slots > 0, num_keys=num_slots, max_groups=runs)


@pytest.mark.parametrize("rank", [8, 16, 64, 128])
def test_every_rank(rng, rank):
    """Rank 8 is zero-padded to 16 (the wgmma K step of 16-bit operands); up to 128."""
    m, d_in, out = 20, 64, 128
    a, b = make_pages(rng, [0, rank], d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, 2, size=m), jnp.int32)
    got = dispatch.lora_delta(x, slots, a, b, backend=GPU)
    assert rel_err(got, reference.lora_delta(x, slots, a, b)) < 1e-5


def test_all_slot_zero_and_poisoned_rows_untouched(rng):
    """All-slot-0 batch: y bit-identical. Mixed batch: NaN-poisoned slot-0 rows of y stay NaN, the others get
    add_delta(y, reference delta) (bf16, one rounding)."""
    m, d_in, out = 45, 64, 128
    a, b = make_pages(rng, [0, 16, 16], d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    y = jnp.asarray(rng.normal(size=(m, out)), BF)
    got = dispatch.add_lora(y, x, jnp.zeros((m,), jnp.int32), a, b, backend=GPU)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(y, np.float32))
    slots = rng.integers(0, 3, size=m).astype(np.int32)
    y = np.asarray(y, np.float32)
    y[slots == 0] = np.nan
    y, slots = jnp.asarray(y, BF), jnp.asarray(slots)
    got = np.asarray(dispatch.add_lora(y, x, slots, a, b, backend=GPU), np.float32)
    zero = np.asarray(slots) == 0
    assert np.all(np.isnan(got[zero])) and np.all(np.isfinite(got[~zero]))
    want = np.asarray(reference.add_delta(y, reference.lora_delta(x, slots, a, b)), np.float32)
    assert rel_err(got[~zero], want[~zero]) < 1e-2


@pytest.mark.parametrize("buckets", [False, True])
def test_packed_arena_through_paged_delta(rng, buckets):
    """A packed arena (each page only its own rank rows, ranks 16/32/48 in 16-row blocks): the kernels read
    max-rank windows (or, with rank buckets, 16- and 48-row windows) and mask the columns past each page's
    blocks."""
    m, d_in, out, num_experts = 60, 64, 64, 2
    ranks = [0, 16, 48, 32]
    table = PageTable.packed(ranks, num_experts, 16, 48)
    rows = total_blocks(table, num_experts) * 16 + 48  # + one page of slack: windows stay inside the arena
    a_rows = jnp.asarray(rng.normal(size=(rows, d_in)) / np.sqrt(d_in), BF)
    b_rows = jnp.asarray(rng.normal(size=(rows, out)), BF)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, len(ranks), size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)
    got = dispatch.paged_lora_delta(x, slots, experts, a_rows, b_rows, table, num_experts=num_experts,
                                    backend=GPU, blocks=GpuBlocks(rank_buckets=buckets))
    want = reference.paged_lora_delta(x, slots, experts, a_rows, b_rows, table, num_experts)
    assert rel_err(got, want) < 1e-5


def test_paged_delta_on_instances_tokens_in_place(rng):
    """The disaggregated LoRA server's dense rows: two instances' tokens end to end, each in runs of its sequences
    (a slot in runs of both), through paged_lora_delta with row_runs = their runs exactly (a short bound would
    drop rows), B's pages apart from A's: the reference's delta, nothing sorted."""
    d_in, out, ranks = 64, 128, [0, 16, 32, 16]
    table = PageTable.packed(ranks, 1, 16, 32)
    b_table = dataclasses.replace(table, start=table.start + 5)
    rows = total_blocks(table, 1) * 16 + 5 * 16 + 32  # B's pages 5 blocks on, and a page of slack
    a_rows = jnp.asarray(rng.normal(size=(rows, d_in)) / np.sqrt(d_in), BF)
    b_rows = jnp.asarray(rng.normal(size=(rows, out)), BF)
    (first, runs1), (second, runs2) = token_runs(rng, 150, len(ranks)), token_runs(rng, 150, len(ranks))
    slots = jnp.concatenate([first, second])
    x = jnp.asarray(rng.normal(size=(300, d_in)), BF)
    call = lambda x: dispatch.paged_lora_delta(x, slots, None, a_rows, b_rows, table, b_table=b_table,  # noqa: E731
                                               backend=GPU, row_runs=runs1 + runs2)
    want = reference.paged_lora_delta(x, slots, None, a_rows, b_rows, table, 1, b_table)
    assert rel_err(call(x), want) < 1e-5
    assert "sort" not in {name for name, _ in glue_ops(jax.make_jaxpr(call)(x))}


def test_paged_expert_delta_on_instances_rows_in_place(rng):
    """The LoRA server's expert rows: two instances' (token, expert) rows end to end, each sorted by (expert,
    slot) as disagg/model.py sorts them before the push (so a page has at most two runs), through
    paged_lora_delta with row_runs = 2 x slots x experts: the reference's delta, nothing sorted."""
    parts = [expert_case(rng, 90, [0, 16, 16, 8], 64, 20, rows_grouped=True) for _ in range(2)]
    a, b, _, _, _, num_experts = parts[0]
    x, slots, experts = (jnp.concatenate([part[i] for part in parts]) for i in (2, 3, 4))
    table = PageTable.padded(4, num_experts, 16, 16, jnp.asarray([0, 16, 16, 8], jnp.int32))
    a_rows, b_rows = a_rows_from_pool(a, 16), b_rows_from_pool(b, 2, 16)
    call = lambda x: dispatch.paged_lora_delta(x, slots, experts, a_rows, b_rows, table,  # noqa: E731
                                               num_experts=num_experts, backend=GPU, row_runs=2 * 4 * num_experts)
    want = reference.expert_lora_delta(x, slots, experts, a, b)
    assert rel_err(call(x), want) < 1e-5
    assert "sort" not in {name for name, _ in glue_ops(jax.make_jaxpr(call)(x))}


@pytest.mark.parametrize("runs", [False, True])
def test_b_pages_placed_apart_from_a_pages(rng, runs):
    """The disaggregated LoRA server may place a target's B pages at other arena rows than its A pages (a second
    page table): the GPU kernels address each arena with its own table (grouped units, and run units)."""
    m, d_in, out, num_experts, rank, slots_n = 40, 64, 128, 2, 16, 4
    a_off, b_off = 16, 56  # rows before each arena's first page (other targets' pages live there)

    def table(offset):
        start = [0] + [(offset + (s - 1) * num_experts * rank) // rank for s in range(1, slots_n)]
        return PageTable(jnp.asarray(start, jnp.int32), jnp.full((slots_n,), 1, jnp.int32),
                         jnp.asarray([0] + [1] * (slots_n - 1), jnp.int32), rank, 1)

    pages = (slots_n - 1) * num_experts * rank
    a_rows = jnp.asarray(rng.normal(size=(a_off + pages + 64, d_in)) / np.sqrt(d_in), BF)
    b_rows = jnp.asarray(rng.normal(size=(b_off + pages + 64, out)), BF)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, slots_n, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts + 1, size=m), jnp.int32)  # expert 2: padding rows
    got = dispatch.paged_lora_delta(x, slots, experts, a_rows, b_rows, table(a_off), num_experts=num_experts,
                                    b_table=table(b_off), backend=GPU, blocks=RUNS if runs else None)
    want = reference.paged_lora_delta(x, slots, experts, a_rows, b_rows, table(a_off), num_experts, table(b_off))
    assert float(jnp.abs(want).max()) > 0
    assert rel_err(got, want) < 1e-5
    # the same table for both arenas reads other rows of B: the test would catch B addressed through A's table
    wrong = reference.paged_lora_delta(x, slots, experts, a_rows, b_rows, table(a_off), num_experts)
    assert rel_err(wrong, want) > 0.1


def test_backend_choice(monkeypatch):
    # GPU default by row count: the reference at decode sizes, the kernels at prefill sizes (H200 timings)
    assert dispatch.select_backend(platform="gpu") is dispatch.LoraBackend.REFERENCE
    assert dispatch.select_backend(platform="gpu", rows=dispatch.gpu_kernel_min_rows() - 1) is \
        dispatch.LoraBackend.REFERENCE
    assert dispatch.select_backend(platform="gpu", rows=dispatch.gpu_kernel_min_rows()) is dispatch.LoraBackend.GPU
    assert dispatch.select_backend(platform="cpu", rows=1 << 20) is dispatch.LoraBackend.REFERENCE
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    assert dispatch.select_backend(platform="gpu") is dispatch.LoraBackend.GPU
    monkeypatch.setenv(dispatch.ENV_VAR, "GPU")  # the variable's value is read in any case, as it always was
    assert dispatch.select_backend(platform="cpu") is dispatch.LoraBackend.GPU
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    assert dispatch.select_backend("reference") is dispatch.LoraBackend.REFERENCE


def test_float32_falls_back_to_reference(rng):
    a, b = make_pages(rng, [0, 16], 64, 64)
    x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
    slots = jnp.asarray([0, 1, 1, 0, 1], jnp.int32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    got = dispatch.lora_delta(x, slots, a, b, backend=dispatch.LoraBackend.GPU)
    np.testing.assert_allclose(got, reference.lora_delta(x, slots, a, b), rtol=1e-6)


@pytest.mark.parametrize("variant,m,r", [("decode", 37, 8), ("decode", 256, 64), ("prefill", 1500, 16),
                                         ("prefill", 4096, 64), ("per_row", 37, 32), ("expand_tiles", 512, 32),
                                         ("expand_tiles", 1500, 128), ("window", 37, 8), ("window", 512, 32),
                                         ("window", 256, 128), ("runs", 37, 16),
                                         ("runs", 512, 32), ("in_place", 1500, 16)])
@pytest.mark.parametrize("expert", [False, True])
def test_kernels_lower_for_cuda(variant, m, r, expert):
    """Pallas -> Mosaic GPU lowering on CPU, down to Mosaic GPU's dialect lowering (`lower_mgpu_dialect`, which
    builds the TMA copies and checks gmem tiling, strides and boxes: the same code the H200 runs before PTX),
    H = 4096, bf16; T = 37 and 1500 (not multiples of 8: the H200 run failed there, "dimension 0 must have size
    smaller or a multiple of its tiling 8"), ranks 8 / 16 (shrink rows staged as 32 float32 columns) and 64;
    decode splits D_in (ksplit 4), prefill does not; the expand's pipelined tiles (all of a target's per CTA, up
    to the SMEM that rank 128 leaves); rows taken in place (row_runs). Two Mosaic GPU kernels per target (shrink,
    expand)."""
    num_slots, num_experts, h = 64, (8 if expert else None), 4096
    lead = (num_slots,) if not expert else (num_slots, num_experts)
    sds = jax.ShapeDtypeStruct
    x, y = sds((m, h), BF), sds((m, h), BF)
    a, b = sds((*lead, h, r), BF), sds((*lead, r, h), BF)
    slots, experts = sds((m,), jnp.int32), sds((m,), jnp.int32)
    blocks = {"per_row": PER_ROW, "expand_tiles": GpuBlocks(expand_tiles=0, stages=6),
              "window": GpuBlocks(window_unit_rows=1 << 20, stages=6),
              "runs": GpuBlocks(run_rows=1 << 20, stages=6)}.get(variant)
    kw = {"backend": dispatch.LoraBackend.GPU, "blocks": blocks}
    if variant == "in_place":  # every key's rows in one run at most
        kw["row_runs"] = num_slots * (num_experts or 1)
    if expert:
        step = lambda y, x, s, e, a, b: dispatch.add_expert_lora(y, x, s, e, a, b, **kw)
        args = (y, x, slots, experts, a, b)
    else:
        step = lambda y, x, s, a, b: dispatch.add_lora(y, x, s, a, b, **kw)
        args = (y, x, slots, a, b)
    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
    assert gpu_ops.pick_ksplit(m, h, blocks or GpuBlocks()) == (1 if m > 512 else 4)
    # the per-row and in-place variants sort nothing (the grouped and run variants argsort the rows' keys)
    assert ("stablehlo.sort" in text) is (variant not in ("per_row", "in_place"))


def test_unaligned_rows_hit_the_mosaic_gpu_tiling_check_on_cpu():
    """The check that failed on the H200 runs on CPU too: a gmem operand whose row count is not a multiple of 8,
    read into tiled SMEM, fails in Mosaic GPU's dialect lowering; our trace-time check names it first."""
    from pallas_kernels.gpu import shrink as gpu_shrink
    from pallas_kernels.gpu.units import Units
    u = 4
    units = Units(*(jax.ShapeDtypeStruct((u,), jnp.int32) for _ in range(4)), jax.ShapeDtypeStruct((1,), jnp.int32),
                  jax.ShapeDtypeStruct((101,), jnp.int32), jax.ShapeDtypeStruct((u,), jnp.int32))
    sds = jax.ShapeDtypeStruct
    with pytest.raises(ValueError, match="x \\(sorted rows\\).*multiple of 8"):
        gpu_shrink.shrink.trace(sds((101, 256), BF), (sds((64, 256), BF),), (units,), ranks=(16,)).lower(
            lowering_platforms=("cuda",))
    with pytest.raises(ValueError, match="A arena.*multiple of 8"):
        gpu_shrink.shrink.trace(sds((104, 256), BF), (sds((60, 256), BF),), (units,), ranks=(16,)).lower(
            lowering_platforms=("cuda",))


def test_tma_alignment_rules():
    """Rows staged in SMEM and stored by TMA from a dynamic row are 128-byte multiples (rank 8/16 shrink rows:
    32 float32 columns); sorted-row buffers are padded to a multiple of 8, at least one 64-row window."""
    from pallas_kernels.gpu import common
    assert [common.out_width(r, jnp.float32) for r in (8, 16, 32, 48, 64, 128)] == [32, 32, 32, 64, 64, 128]
    assert common.out_width(128, jnp.float32) == 128
    assert [common.padded_rows(m) for m in (1, 37, 64, 200, 1500, 4096)] == [64, 64, 64, 200, 1504, 4096]
    with pytest.raises(ValueError, match="row of 20 bytes"):
        common.check_tma_array("k", "B", (64, 10), BF, 10)


def test_unaligned_arena_falls_back(rng):
    """An arena view whose row count is not a multiple of 8 runs the reference, not the kernels."""
    m, d_in, out, num_experts = 20, 64, 64, 1
    table = PageTable.packed([0, 16, 16], num_experts, 16, 16)
    rows = total_blocks(table, num_experts) * 16 + 4
    a_rows = jnp.asarray(rng.normal(size=(rows, d_in)), BF)
    b_rows = jnp.asarray(rng.normal(size=(rows, out)), BF)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, 3, size=m), jnp.int32)
    got = dispatch.paged_lora_delta(x, slots, None, a_rows, b_rows, table, backend=dispatch.LoraBackend.GPU)
    want = reference.paged_lora_delta(x, slots, None, a_rows, b_rows, table, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_shrink_alone_matches_gather_einsum(rng):
    """gpu_ops.lora_shrink (what the H200 script times against ragged_dot) in original row order."""
    m, d_in, rank = 30, 128, 16
    a, _ = make_pages(rng, [0, rank, rank], d_in, 64)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, 3, size=m), jnp.int32)
    got = gpu_ops.lora_shrink(x, slots, slots > 0, a_rows_from_pool(a, rank), PageTable.padded(3, 1, rank, rank),
                              num_experts=1, interpret=plgpu.InterpretGPUParams())
    want = jnp.einsum("ni,nir->nr", x, a[slots], preferred_element_type=jnp.float32)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_hi_lo_split_keeps_sixteen_bits_and_survives_convert_folding(rng, dtype):
    """The expand's float32 input is carried as hi + lo in 16 bits. hi must be exact in the 16-bit type and
    hi + lo within ~2^-16 of s; and the split must not contain a float32 -> 16-bit -> float32 convert pair,
    which XLA's GPU compiler folds away (xla_allow_excess_precision), zeroing lo: that happened on the H200
    (float32 deltas 1.7e-3 off) while this CPU backend, which keeps the pair, showed nothing."""
    from pallas_kernels.gpu.expand import split_hi_lo

    # magnitudes over a wide range; for f16 within the range where lo (~2^-11 s) stays a normal f16
    low, high = (-4, 4) if dtype == jnp.bfloat16 else (0, 3)
    s = jnp.asarray(np.sign(rng.normal(size=(64, 32))) * np.exp(rng.uniform(low, high, size=(64, 32))),
                    jnp.float32)
    hi, lo = jax.jit(split_hi_lo, static_argnums=1)(s, dtype)
    assert hi.dtype == lo.dtype == dtype
    hi32, lo32 = np.asarray(hi, np.float32), np.asarray(lo, np.float32)
    err = np.abs(hi32.astype(np.float64) + lo32 - np.asarray(s, np.float64)) / np.abs(np.asarray(s, np.float64))
    assert err.max() < 2.0 ** -15 and np.abs(lo32).max() > 0
    # hi is s truncated to the 16-bit mantissa: a 16-bit lo alone could not make up a coarser hi
    assert np.all(np.abs(hi32) <= np.abs(np.asarray(s))) and np.all(np.abs(lo32) <= np.abs(hi32) * 2.0 ** -6)

    jaxpr = jax.make_jaxpr(split_hi_lo, static_argnums=1)(s, dtype).jaxpr
    to_16 = {id(e.outvars[0]) for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
             and e.invars[0].aval.dtype == jnp.float32 and e.outvars[0].aval.dtype == dtype}
    back = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type" and id(e.invars[0]) in to_16]
    assert not back, "a float32 -> 16-bit -> float32 convert pair: XLA GPU folds it and lo becomes 0"


def test_fused_targets_of_three_widths(rng):
    """q/k/v as the model calls them (models/transformer.py: one add_lora_fused call): outputs of three widths and
    two ranks sharing x, added into bf16 y, with slot-0 rows NaN-poisoned and left untouched."""
    m, d_in, num_slots = 45, 128, 4
    widths, ranks = (256, 64, 64), (16, 32, 16)
    pairs = [make_pages(rng, [0] + [r] * (num_slots - 1), d_in, w) for w, r in zip(widths, ranks)]
    pairs = [(jnp.swapaxes(a, -1, -2), b) for a, b in pairs]  # the pool's rank-major A
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    idle = np.asarray(slots) == 0
    ys = tuple(jnp.asarray(np.where(idle[:, None], np.nan, rng.normal(size=(m, w))), BF) for w in widths)
    got = dispatch.add_lora_fused(ys, x, slots, pairs, a_rank_major=True, backend=GPU)
    for y, g, (a, b) in zip(ys, got, pairs):
        want = reference.add_delta(y, reference.lora_delta(x, slots, a, b, a_rank_major=True))
        assert g.dtype == BF and g.shape == y.shape
        np.testing.assert_array_equal(np.isnan(np.asarray(g, np.float32)), np.isnan(np.asarray(y, np.float32)))
        live = ~idle
        np.testing.assert_allclose(np.asarray(g, np.float32)[live], np.asarray(want, np.float32)[live],
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("expert,tiles,stages", [(False, 2, 2), (True, 0, 4), (False, 3, 6)])
def test_expand_tiles_per_cta_match_one_tile_per_cta(rng, expert, tiles, stages):
    """The expand with several column tiles per CTA (a pipeline over B blocks; 0: all of a target's), for fused
    targets of 4, 1 and 3 tiles (64 columns each), mixed ranks read at their buckets, dense and per expert: the
    float32 deltas bit-identical to one tile per CTA and equal to the reference."""
    m, d_in, num_slots, num_experts = 75, 128, 4, (3 if expert else None)
    widths, ranks = (256, 64, 192), (32, 16, 32)
    pairs = [make_pages(rng, [0, r, max(8, r // 2), r], d_in, w, experts=num_experts) for w, r in zip(widths, ranks)]
    pairs = [(jnp.swapaxes(a, -1, -2), b) for a, b in pairs]  # the pool's rank-major A
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts + 1, size=m), jnp.int32) if expert else None
    slot_ranks = [jnp.asarray([0, r, max(8, r // 2), r], jnp.int32) for r in ranks]
    zeros = tuple(jnp.zeros((m, w), jnp.float32) for w in widths)

    def deltas(expand_tiles):
        blocks = GpuBlocks(expand_cols=64, expand_tiles=expand_tiles, stages=stages, rank_buckets=True)
        return [np.asarray(d) for d in dispatch.add_lora_fused(zeros, x, slots, pairs, experts=experts,
                                                               slot_ranks=slot_ranks, a_rank_major=True,
                                                               backend=GPU, blocks=blocks)]

    one, many = deltas(1), deltas(tiles)
    for d1, dk, (a, b) in zip(one, many, pairs):
        np.testing.assert_array_equal(dk, d1)
        want = (reference.expert_lora_delta(x, slots, experts, a, b, a_rank_major=True) if expert
                else reference.lora_delta(x, slots, a, b, a_rank_major=True))
        assert rel_err(dk, want) < 1e-5


@pytest.mark.parametrize("buckets", [False, True])
def test_fused_targets_share_one_launch_with_their_own_ranks(rng, buckets):
    """Three targets in one shrink and one expand launch (grid: targets x units): per-target column tiles (256 /
    64 / 128 columns), pool ranks (32 / 16 / 32) and slot ranks, one target rank 0 for every slot (its rows stay
    bit-identical, NaN-poisoned here), rank buckets on and off; and the lowered program has those two launches."""
    m, d_in, num_slots = 70, 128, 4
    widths, ranks = (256, 64, 128), (32, 16, 32)
    slot_ranks = ((0, 16, 32, 32), (0, 0, 0, 0), (0, 32, 16, 32))
    # pages at each slot's rank; the rank-0 target still has data, which its zero slot ranks must keep unread
    pairs = [make_pages(rng, sr if any(sr) else [0] + [r] * (num_slots - 1), d_in, w)
             for w, r, sr in zip(widths, ranks, slot_ranks)]
    pairs = [(jnp.swapaxes(a, -1, -2), b) for a, b in pairs]
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    idle = [np.asarray(sr)[np.asarray(slots)] == 0 for sr in slot_ranks]
    ys = tuple(jnp.asarray(np.where(i[:, None], np.nan, rng.normal(size=(m, w))), BF) for i, w in zip(idle, widths))
    sr = tuple(jnp.asarray(r, jnp.int32) for r in slot_ranks)
    blocks = GpuBlocks(rank_buckets=buckets)
    got = dispatch.add_lora_fused(ys, x, slots, pairs, a_rank_major=True, backend=GPU, slot_ranks=sr, blocks=blocks)
    for y, g, (a, b), i in zip(ys, got, pairs, idle):
        want = np.asarray(reference.add_delta(y, reference.lora_delta(x, slots, a, b, a_rank_major=True)), np.float32)
        g = np.asarray(g, np.float32)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(np.asarray(y, np.float32)))
        if (~i).any():
            assert rel_err(g[~i], want[~i]) < 1e-2
    step = lambda x, ys: dispatch.add_lora_fused(ys, x, slots, pairs, a_rank_major=True, backend="gpu",
                                                 slot_ranks=sr, blocks=blocks)
    text = jax.jit(step).trace(x, ys).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2


WINDOW = GpuBlocks(window_unit_rows=1 << 20, window_cols=64)


def window_pairs_model(units, mx):
    """What window_pairs must give, by a loop: per 8-row window, its rows' units in row order."""
    owner = np.full(mx, -1)
    for u in range(int(units.count[0])):
        r0, n = int(units.row0[u]), int(units.size[u])
        assert np.all(owner[r0:r0 + n] == -1), "units overlap"
        owner[r0:r0 + n] = u
    pairs = []
    for w in range(mx // 8):
        seen = []
        for j in range(8):
            u = owner[w * 8 + j]
            if u >= 0 and (not seen or seen[-1] != u):
                seen.append(u)
        pairs.append(seen)
    return owner, pairs


@pytest.mark.parametrize("case", ["sorted", "grouped_in_place", "per_row"])
def test_window_pairs_give_each_window_its_rows_pages(rng, case):
    """Per 8-row window: its rows' units in row order (count, B page of each) and which rows each pair owns, for
    units listed in row order (sorted rows), out of row order (rows grouped in place by (expert, slot), units
    listed by key) and one per row (rows with no work have size 0)."""
    from pallas_kernels.gpu.window_expand import window_pairs
    m, num_slots, num_experts = 83, 4, 5
    slots = rng.integers(0, num_slots, size=m)
    experts = rng.integers(0, num_experts + 1, size=m)
    slots[10:40], experts[10:40] = 2, 3  # 30 rows of one page: four windows
    slots[45:51], experts[45:51] = 1, 4  # 6 rows, inside one window or across two
    if case == "grouped_in_place":
        order = np.argsort(experts * num_slots + slots, kind="stable")
        slots, experts = slots[order], experts[order]
    slots, experts = jnp.asarray(slots, jnp.int32), jnp.asarray(experts, jnp.int32)
    valid = experts < num_experts
    keys = slots * num_experts + jnp.where(valid, experts, 0)
    active = valid & (slots > 0)
    table = PageTable.padded(num_slots, num_experts, 16, 16)
    if case == "per_row":
        units = per_row_units(keys, active, table, num_experts=num_experts)
    else:
        grouping = group_rows(keys, active, num_keys=num_slots * num_experts, presorted=case != "sorted")
        units = build_units(grouping, table, num_experts=num_experts)
    mx = 88
    got = window_pairs(units, mx)
    owner, pairs = window_pairs_model(units, mx)
    assert max(len(p) for p in pairs) > 1  # windows with rows of several pages
    np.testing.assert_array_equal(got.count, [len(p) for p in pairs])
    for w, p in enumerate(pairs):
        np.testing.assert_array_equal(np.asarray(got.page)[w * 8:w * 8 + len(p)],
                                      [int(units.b_page_row[u]) for u in p])
        for i in range(8):
            rows = [j for j in range(8) if i < len(p) and owner[w * 8 + j] == p[i]]
            np.testing.assert_array_equal(np.flatnonzero(np.asarray(got.owner[w, i])), rows)


@pytest.mark.parametrize("m", [1, 17, 72, 130])
def test_window_expand_matches_unit_expand_dense(rng, m):
    """The window-major expand (window_expand.py) through the dispatcher, dense, mixed ranks in a rank-32 pool,
    ragged T, a 100-row group spanning 13 windows, a 64-row group (dense_case): float32 deltas equal to the
    unit-major expand's up to the order of the float32 sums (the products are taken transposed) and to the
    reference; slot-0 rows exactly 0."""
    a, b, x, slots = dense_case(rng, m)
    got = dispatch.lora_delta(x, slots, a, b, backend=GPU, blocks=WINDOW)
    assert rel_err(got, dispatch.lora_delta(x, slots, a, b, backend=GPU)) < 1e-6
    assert rel_err(got, reference.lora_delta(x, slots, a, b)) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(slots) == 0], 0)


@pytest.mark.parametrize("rows_grouped", [False, True])
def test_window_expand_per_expert_in_place_and_per_row(rng, rows_grouped):
    """Per expert, rows sorted by the kernels or grouped in place (units out of row order), padding experts and
    empty pairs; also on per-row units: the reference's delta, zero on rows with no work."""
    a, b, x, slots, experts, num_experts = expert_case(rng, 90, [0, 16, 16, 8], 64, 20, rows_grouped)
    want = reference.expert_lora_delta(x, slots, experts, a, b)
    idle = np.asarray((slots == 0) | (experts == num_experts))
    for blocks in (WINDOW, GpuBlocks(window_unit_rows=1 << 20, per_row_rows=1 << 20)):
        got = dispatch.expert_lora_delta(x, slots, experts, a, b, backend=GPU, blocks=blocks,
                                         rows_grouped=rows_grouped)
        assert rel_err(got, want) < 1e-5
        assert np.all(np.asarray(got)[idle] == 0)


def test_window_expand_fused_targets_into_poisoned_y(rng):
    """Three fused targets (widths 256 / 64 / 192: several column tiles, one, three at 64 columns; ranks 32 /
    16 / 32 read at full rank with buckets on) in one launch, added into bf16 y whose slot-0 rows are NaN and
    stay NaN, the others equal to the unit-major expand's (up to one bf16 rounding step: the float32 sums differ
    in order)."""
    m, d_in, num_slots = 45, 128, 4
    widths, ranks = (256, 64, 192), (32, 16, 32)
    pairs = [make_pages(rng, [0, r, max(8, r // 2), r], d_in, w) for w, r in zip(widths, ranks)]
    pairs = [(jnp.swapaxes(a, -1, -2), b) for a, b in pairs]
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    idle = np.asarray(slots) == 0
    ys = tuple(jnp.asarray(np.where(idle[:, None], np.nan, rng.normal(size=(m, w))), BF) for w in widths)
    slot_ranks = [jnp.asarray([0, r, max(8, r // 2), r], jnp.int32) for r in ranks]

    def run(blocks):
        return [np.asarray(g, np.float32) for g in dispatch.add_lora_fused(
            ys, x, slots, pairs, slot_ranks=slot_ranks, a_rank_major=True, backend=GPU, blocks=blocks)]

    window = run(GpuBlocks(window_unit_rows=1 << 20, window_cols=64, rank_buckets=True))
    unit = run(GpuBlocks(rank_buckets=True))
    for g, u, y in zip(window, unit, ys):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(np.asarray(y, np.float32)))
        live = ~np.isnan(g)
        np.testing.assert_allclose(g[live], u[live], rtol=8e-3, atol=1e-6)
        assert np.mean(g[live] != u[live]) < 1e-2  # a rare rounding step, not a different result


@pytest.mark.parametrize("unit_rows,window", [(0, False), (64, True)])
def test_window_expand_switch_and_its_override(rng, monkeypatch, unit_rows, window):
    """window_unit_rows 0 keeps the unit-major expand, 64 (or more) takes the window-major one for every unit,
    values in between (the removed mixed launch) are refused; $INFINILORA_GPU_WINDOW_UNIT_ROWS overrides the
    table's value and rejects what is not a row count."""
    num_experts, d_in, out, m = 4, 64, 128, 32
    a, b = make_pages(rng, [0, 16], d_in, out, experts=num_experts)
    x = jnp.zeros((m, d_in), BF)
    slots, experts = jnp.ones((m,), jnp.int32), jnp.zeros((m,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda x: dispatch.expert_lora_delta(
        x, slots, experts, a, b, backend=GPU, blocks=GpuBlocks(window_unit_rows=unit_rows)))(x)
    assert ("cummax" in str(jaxpr)) is window  # window_pairs finds each row's unit with a cummax
    monkeypatch.setenv(gpu_ops.WINDOW_UNIT_ROWS_ENV_VAR, str(unit_rows))
    assert gpu_ops.device_blocks(BF, plgpu.InterpretGPUParams()).window_unit_rows == unit_rows
    monkeypatch.setenv(gpu_ops.WINDOW_UNIT_ROWS_ENV_VAR, "many")
    with pytest.raises(ValueError, match="INFINILORA_GPU_WINDOW_UNIT_ROWS='many'"):
        gpu_ops.device_blocks(BF, plgpu.InterpretGPUParams())
    monkeypatch.setenv(gpu_ops.WINDOW_UNIT_ROWS_ENV_VAR, "4")
    with pytest.raises(ValueError, match="mixed launch was removed"):
        gpu_ops.device_blocks(BF, plgpu.InterpretGPUParams())


RUNS = GpuBlocks(run_rows=1 << 20, window_cols=64)


def runs_model(keys, work, mx):
    """What run_units must give, by a loop: per 8-row window, its runs (first row, rows) in row order: maximal
    stretches of rows with work and one key."""
    keys = list(np.asarray(keys)) + [-1] * (mx - len(keys))
    work = list(np.asarray(work)) + [False] * (mx - len(work))
    windows = []
    for w in range(mx // 8):
        runs = []
        for r in range(w * 8, w * 8 + 8):
            if not work[r]:
                continue
            if runs and runs[-1][0] + runs[-1][1] == r and keys[r - 1] == keys[r]:
                runs[-1][1] += 1
            else:
                runs.append([r, 1])
        windows.append(runs)
    return windows


@pytest.mark.parametrize("case", ["dense_in_token_order", "expert_grouped_in_place"])
def test_run_units_are_each_windows_runs_of_one_page(rng, case):
    """Run units straight from the rows' keys: per 8-row window its runs in row order (a run ends at a row with
    no work, another key or the window's end), each run's first row, rows, A and B page rows and rank bucket;
    the window pairs over the same runs (count, B page, owned rows); row_rank per row, 0 for
    rows with no work (slot 0, padding experts, a rank-0 slot). 83 rows padded to 88."""
    from pallas_kernels.gpu.runs import run_units
    m, mx, num_slots = 83, 88, 5
    num_experts = 1 if case == "dense_in_token_order" else 4
    slots = rng.integers(0, num_slots, size=m)
    experts = rng.integers(0, num_experts + (num_experts > 1), size=m)
    slots[10:40], experts[10:40] = 2, 0  # 30 rows of one page: runs cut at window ends
    slots[50:53] = 4  # slot 4 has rank 0: no work
    if case == "expert_grouped_in_place":
        order = np.argsort(experts * num_slots + slots, kind="stable")
        slots, experts = slots[order], experts[order]
    slots, experts = jnp.asarray(slots, jnp.int32), jnp.asarray(experts, jnp.int32)
    valid = experts < num_experts
    keys = slots * num_experts + jnp.where(valid, experts, 0)
    slot_ranks = jnp.asarray([0, 32, 16, 32, 0], jnp.int32)
    table = PageTable.padded(num_slots, num_experts, 32, 16, slot_ranks)
    b_table = dataclasses.replace(table, start=table.start + 7)  # B's pages 7 blocks further on
    units, pairs = run_units(keys, valid & (slots > 0), table, num_experts=num_experts, mx=mx,
                             b_table=b_table, buckets=(16, 32))
    nb = np.asarray(table.nblocks)[np.asarray(slots)] * np.asarray(valid)
    work = nb > 0
    windows = runs_model(keys, work, mx)
    assert max(len(r) for r in windows) > 2 and any(len(r) == 1 and r[0][1] == 8 for r in windows)
    np.testing.assert_array_equal(units.row_rank, nb * 16)
    np.testing.assert_array_equal(pairs.count, [len(r) for r in windows])
    assert int(units.count[0]) == mx
    for w, runs in enumerate(windows):
        for i in range(8):
            u = w * 8 + i
            if i >= len(runs):
                assert int(units.size[u]) == 0 and not np.any(np.asarray(pairs.owner[w, i]))
                continue
            r0, n = runs[i]
            key = int(keys[r0])
            slot, expert = key // num_experts, key % num_experts
            page = (int(table.start[slot]) + expert * int(table.stride[slot])) * 16
            b_page = page + 7 * 16
            assert (int(units.row0[u]), int(units.size[u])) == (r0, n)
            assert (int(units.page_row[u]), int(units.b_page_row[u]), int(pairs.page[u])) == (page, b_page, b_page)
            assert int(units.bucket[u]) == (0 if int(nb[r0]) * 16 <= 16 else 1)
            np.testing.assert_array_equal(np.flatnonzero(np.asarray(pairs.owner[w, i])), np.arange(r0, r0 + n) - w * 8)


@pytest.mark.parametrize("m", [1, 17, 72, 130])
def test_run_units_dense_delta(rng, m):
    """Run units for both kernels, dense rows in token order (dense_case: ragged T, mixed ranks in a rank-32 pool,
    a 100-row and a 64-row group read once per 8-row window): the reference's and the grouped units' delta,
    slot-0 rows exactly 0; the rows sorted by one argsort, nothing scanned on the way (no group facts)."""
    a, b, x, slots = dense_case(rng, m)
    got = dispatch.lora_delta(x, slots, a, b, backend=GPU, blocks=RUNS)
    assert rel_err(got, dispatch.lora_delta(x, slots, a, b, backend=GPU)) < 1e-6
    assert rel_err(got, reference.lora_delta(x, slots, a, b)) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(slots) == 0], 0)
    glue = glue_ops(jax.make_jaxpr(lambda x: dispatch.lora_delta(x, slots, a, b, backend=GPU, blocks=RUNS))(x))
    assert not {"cumsum", "cummax", "while"} & {name for name, _ in glue}
    assert [name for name, _ in glue].count("sort") == 1
    # scatters: PageTable.padded zeroing slot 0's rank (over the slots), the sorted order's inverse (the rows)
    assert sorted(shape for name, shape in glue if name == "scatter") == sorted([(a.shape[0],), (m,)])
    grouped = glue_ops(jax.make_jaxpr(lambda x: dispatch.lora_delta(x, slots, a, b, backend=GPU))(x))
    assert {"sort", "cumsum"} <= {name for name, _ in grouped}


def glue_ops(closed_jaxpr) -> list[tuple[str, tuple[int, ...]]]:
    """(primitive, first operand's shape) of every equation outside the kernels (pallas calls), through nested
    jits: the XLA work around the kernels."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue
            shape = tuple(getattr(eqn.invars[0].aval, "shape", ())) if eqn.invars else ()
            found.append((eqn.primitive.name, shape))
            if "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"]
                walk(getattr(inner, "jaxpr", inner))

    walk(closed_jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("rows_grouped", [False, True])
@pytest.mark.parametrize("ksplit", [1, 2])
def test_run_units_per_expert_delta(rng, rows_grouped, ksplit):
    """Per expert, rows grouped in place by (expert, slot) as the MoE layer sorts them or in arbitrary order
    (runs need neither), padding experts, a 20-row page, mixed ranks, rank buckets on, D_in split or not: the
    reference's delta, zero on rows with no work."""
    a, b, x, slots, experts, num_experts = expert_case(rng, 90, [0, 16, 32, 8], 128, 20, rows_grouped)
    blocks = dataclasses.replace(RUNS, rank_buckets=True, decode_ksplit=ksplit)
    got = dispatch.expert_lora_delta(x, slots, experts, a, b, backend=GPU, blocks=blocks, rows_grouped=rows_grouped,
                                     slot_ranks=jnp.asarray([0, 16, 32, 8], jnp.int32))
    assert rel_err(got, reference.expert_lora_delta(x, slots, experts, a, b)) < 1e-5
    np.testing.assert_array_equal(np.asarray(got)[np.asarray((slots == 0) | (experts == num_experts))], 0)


def test_run_units_fused_targets_into_poisoned_y(rng):
    """Three fused targets (widths 256 / 64 / 192, ranks 32 / 16 / 32 with rank buckets) on run units in one
    shrink and one expand launch, added into bf16 y: slot-0 rows' NaN stays NaN, the rest within one bf16
    rounding of the reference's sum."""
    m, d_in, num_slots = 45, 128, 4
    widths, ranks = (256, 64, 192), (32, 16, 32)
    pairs = [make_pages(rng, [0, r, max(8, r // 2), r], d_in, w) for w, r in zip(widths, ranks)]
    pairs = [(jnp.swapaxes(a, -1, -2), b) for a, b in pairs]
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    idle = np.asarray(slots) == 0
    ys = tuple(jnp.asarray(np.where(idle[:, None], np.nan, rng.normal(size=(m, w))), BF) for w in widths)
    slot_ranks = [jnp.asarray([0, r, max(8, r // 2), r], jnp.int32) for r in ranks]
    got = dispatch.add_lora_fused(ys, x, slots, pairs, slot_ranks=slot_ranks, a_rank_major=True, backend=GPU,
                                  blocks=dataclasses.replace(RUNS, rank_buckets=True))
    for g, y, (pa, pb) in zip(got, ys, pairs):
        g, y = np.asarray(g, np.float32), np.asarray(y, np.float32)
        np.testing.assert_array_equal(np.isnan(g), idle[:, None] & np.ones_like(g, bool))
        want = y + np.asarray(reference.lora_delta(x, slots, pa, pb, a_rank_major=True))
        np.testing.assert_allclose(g[~idle], want[~idle], rtol=1e-2, atol=1e-2 * np.abs(want[~idle]).max())


@pytest.mark.parametrize("run_rows,runs", [(0, False), (32, True), (31, False)])
def test_run_units_switch_and_its_override(rng, monkeypatch, run_rows, runs):
    """run_rows: calls of up to that many rows take run units (no group facts or units: no cumsum), larger
    ones group; rows grouped in place are sorted by neither; $INFINILORA_GPU_RUN_ROWS overrides the table's
    value and rejects what is not a row count."""
    num_experts, d_in, out, m = 4, 64, 128, 32
    a, b = make_pages(rng, [0, 16], d_in, out, experts=num_experts)
    x = jnp.zeros((m, d_in), BF)
    slots, experts = jnp.ones((m,), jnp.int32), jnp.zeros((m,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda x: dispatch.expert_lora_delta(
        x, slots, experts, a, b, backend=GPU, blocks=GpuBlocks(run_rows=run_rows), rows_grouped=True))(x)
    names = {name for name, _ in glue_ops(jaxpr)}
    assert "sort" not in names and ("cumsum" in names) is not runs
    monkeypatch.setenv(gpu_ops.RUN_ROWS_ENV_VAR, str(run_rows))
    assert gpu_ops.device_blocks(BF, plgpu.InterpretGPUParams()).run_rows == run_rows
    monkeypatch.setenv(gpu_ops.RUN_ROWS_ENV_VAR, "all")
    with pytest.raises(ValueError, match="INFINILORA_GPU_RUN_ROWS='all'"):
        gpu_ops.device_blocks(BF, plgpu.InterpretGPUParams())
