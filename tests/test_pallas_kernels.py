"""The TPU LoRA kernels (interpreted on CPU) and their dispatcher against the pure-JAX reference.

Every kernel call runs under `pltpu.InterpretParams()`, which simulates TPU memory: blocks move only when their
index changes, and fresh outputs and scratch start as NaN (poisoned), so a read of something never written
shows. Inputs are fresh random values; slot 0 is zero as in the pool. The GPU path has no kernel yet (the
dispatcher sends GPU to the reference), so nothing GPU-specific is tested here.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from infinilora_jax.lora import reference
from pallas_kernels import dispatch
from pallas_kernels.grouping import group_rows
from pallas_kernels.layout import PageTable, a_rows_from_pool, b_rows_from_pool, total_blocks
from pallas_kernels.tpu import block_tables
from pallas_kernels.tpu.expand import ExpandGrid
from pallas_kernels.tpu.ops import Blocks, lora_apply, metadata_bytes
from pallas_kernels.tpu.schedule import build_schedule

INTERPRET = pltpu.InterpretParams()
_build = jax.jit(build_schedule, static_argnames=("num_experts", "tm", "num_rows", "sorted_rows", "arena_blocks"))
_TILES = dict(token_tile=128, col_tile=128, decode_col_tile=128, rank_block=8)
DECODE = Blocks(**_TILES, decode_rows=256)  # always the decode variant here
PREFILL = Blocks(**_TILES, decode_rows=1)  # always the prefill variant
VARIANTS = {"decode": DECODE, "prefill": PREFILL}


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def make_pages(rng, ranks, d_in, out, experts=None, dtype=np.float32):
    """Pool pages (A [S, (E,) D_in, R], B [S, (E,) R, *out]) with each slot zero above its rank; slot 0 zero."""
    r = max(max(ranks), 1)
    lead = (len(ranks),) if experts is None else (len(ranks), experts)
    out = (out,) if isinstance(out, int) else out
    a = rng.normal(size=(*lead, d_in, r)).astype(np.float32) / np.sqrt(d_in)
    b = rng.normal(size=(*lead, r, *out)).astype(np.float32)
    for s, rank in enumerate(ranks):
        a[s, ..., rank:] = 0
        b[(s,) + (slice(None),) * (len(lead) - 1) + (slice(rank, None),)] = 0
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def ranks_of(num_slots, rng, choices=(8, 16, 3, 11)):
    return [0] + [int(rng.choice(choices)) for _ in range(num_slots - 1)]


# ---------------------------------------------------------------------------------------------- grouping


def test_group_rows_matches_numpy(rng):
    m, num_keys = 37, 11
    keys = rng.integers(0, num_keys, size=m).astype(np.int32)
    active = rng.random(m) < 0.7
    g = jax.jit(group_rows, static_argnames="num_keys")(jnp.asarray(keys), jnp.asarray(active), num_keys=num_keys)
    live = np.unique(keys[active])
    n = int(g.num_groups)
    assert n == len(live)
    np.testing.assert_array_equal(np.asarray(g.group_key)[:n], live)
    order, inverse = np.asarray(g.order), np.asarray(g.inverse)
    np.testing.assert_array_equal(order[inverse], np.arange(m))
    sorted_keys = np.where(active, keys, num_keys)[order]
    assert np.all(np.diff(sorted_keys) >= 0)
    for gi, key in enumerate(live):
        rows = np.flatnonzero(active & (keys == key))
        assert np.asarray(g.group_size)[gi] == len(rows)
        start = np.asarray(g.group_start)[gi]
        np.testing.assert_array_equal(np.sort(order[start:start + len(rows)]), rows)
        np.testing.assert_array_equal(np.asarray(g.row_group)[rows], gi)
    assert np.all(np.asarray(g.row_group)[~active] == -1)
    assert np.all(np.asarray(g.group_size)[n:] == 0)


@pytest.mark.parametrize("m,num_keys,share", [(37, 11, 0.7), (64, 200, 0.9), (5, 3, 0.0), (1, 4, 1.0),
                                               (300, 40, 0.5)])
def test_group_rows_comparison_and_search_paths_agree(rng, monkeypatch, m, num_keys, share):
    """Few rows take the all-pairs comparison path (decode), many the scan + binary search path (its searches
    comparing all pairs or unrolled): the same Grouping, unused entries included."""
    import pallas_kernels.grouping as grouping

    keys = jnp.asarray(rng.integers(0, num_keys, size=m).astype(np.int32))
    active = jnp.asarray(rng.random(m) < share)
    run = lambda: jax.tree.map(np.asarray, group_rows(keys, active, num_keys=num_keys))
    monkeypatch.setattr(grouping, "DENSE_MAX", 1 << 30)
    dense = run()
    for dense_max in (0, m * m - 1):  # the search path; its searches unrolled, then (where g < m) all pairs
        monkeypatch.setattr(grouping, "DENSE_MAX", dense_max)
        searched = run()
        for field in ("order", "inverse", "row_group", "group_key", "group_start", "group_size", "num_groups"):
            np.testing.assert_array_equal(getattr(dense, field), getattr(searched, field), err_msg=field)


@pytest.mark.parametrize("m,num_keys,share", [(37, 11, 0.7), (300, 40, 0.5), (1, 4, 1.0), (6, 3, 0.0)])
def test_presorted_rows_group_in_place(rng, monkeypatch, m, num_keys, share):
    """Rows whose active keys come in one run each, inactive rows between the runs (as the MoE layer's rows
    sorted by (expert, slot) come: slot 0 and padding experts have no work): the groups are the runs, in the
    rows' own order (order and inverse the identity), with the keys, sizes and count the sorting path finds;
    both fact paths (all-pairs comparison, scan + search) agree."""
    import pallas_kernels.grouping as grouping

    keys = np.sort(rng.integers(0, num_keys, size=m)).astype(np.int32)
    active = (rng.random(num_keys) < share)[keys]  # whether a row has work depends on its key alone
    run = lambda **kw: jax.tree.map(np.asarray, group_rows(jnp.asarray(keys), jnp.asarray(active),
                                                           num_keys=num_keys, **kw))
    results = []
    for dense_max in (1 << 30, 0):
        monkeypatch.setattr(grouping, "DENSE_MAX", dense_max)
        results.append(run(presorted=True))
        sorted_path = run()
    for field in ("order", "inverse", "row_group", "group_key", "group_start", "group_size", "num_groups"):
        np.testing.assert_array_equal(getattr(results[0], field), getattr(results[1], field), err_msg=field)
    g = results[0]
    np.testing.assert_array_equal(g.order, np.arange(m))
    np.testing.assert_array_equal(g.inverse, np.arange(m))
    for field in ("group_key", "group_size", "num_groups"):
        np.testing.assert_array_equal(getattr(g, field), getattr(sorted_path, field), err_msg=field)
    covered = np.full(m, -1)
    for i in range(int(g.num_groups)):
        start, size = int(g.group_start[i]), int(g.group_size[i])
        rows = np.arange(start, start + size)
        assert np.all(active[rows]) and np.all(keys[rows] == g.group_key[i])
        covered[rows] = i
    np.testing.assert_array_equal(covered, np.where(active, g.row_group, -1))
    np.testing.assert_array_equal(g.row_group >= 0, active)


def test_prefill_grouping_has_no_scatters():
    """XLA on the H200 took ~9 s to compile group_rows' scatters at 4,096 rows (17 s with build_units), every
    prefill-shaped LoRA program paying it; the search path must stay scatter-free (benchmarks/
    lora_kernel_compile.py measures the compile times on a GPU)."""
    from pallas_kernels.gpu.units import build_units

    m, slots = 4096, 17
    keys = jax.ShapeDtypeStruct((m,), jnp.int32)
    table = PageTable.padded(slots, 1, 64, 64)
    fn = lambda k: build_units(group_rows(k, k > 0, num_keys=slots), table, num_experts=1)
    text = jax.jit(fn).trace(keys).lower(lowering_platforms=("cuda",)).as_text()
    assert "sort" in text and "scatter" not in text


@pytest.mark.parametrize("entries,items", [(7, 20), (65, 64), (300, 1000)])
def test_expand_items_methods_agree(rng, monkeypatch, entries, items):
    from pallas_kernels.tpu import schedule

    n = jnp.asarray(rng.integers(0, 4, size=entries).astype(np.int32))
    monkeypatch.setattr(schedule, "COMPARE_ALL_MAX", 1 << 40)
    everything = jax.tree.map(np.asarray, schedule._expand_items(n, items))
    monkeypatch.setattr(schedule, "COMPARE_ALL_MAX", 0)
    unrolled = jax.tree.map(np.asarray, schedule._expand_items(n, items))
    for a, b in zip(everything, unrolled):
        np.testing.assert_array_equal(a, b)
    v, w, ok, count = everything
    want = [(e, i) for e in range(entries) for i in range(int(n[e]))][:items]
    assert int(count) == int(np.sum(n)) and list(zip(v[ok].tolist(), w[ok].tolist())) == want


def test_schedule_work_scales_with_rank_and_skips_slot_zero():
    """Items per visit = rank blocks of the adapter: rank 8 costs one, rank 32 four, slot 0 nothing."""
    tables = (PageTable.padded(4, 1, 32, 8, jnp.asarray([0, 8, 32, 0])),)
    for slots, want in [([1, 1, 1], 1), ([2, 2], 4), ([1, 2, 0, 3], 5), ([0, 0, 3], 0)]:
        keys = jnp.asarray(slots, jnp.int32)
        g = group_rows(keys, keys > 0, num_keys=4)
        sched = _build(g, g.row_group, tables, num_experts=1, tm=len(slots), num_rows=len(slots),
                       sorted_rows=False, arena_blocks=(16,))
        assert int(sched.sh_count) == want and int(sched.ex_count[0]) == want, slots


@pytest.mark.parametrize("sorted_rows", [False, True])
def test_idle_operands_hold_their_blocks(rng, sorted_rows):
    """Simulate the TPU pipeline on the index maps of a fused launch (3 targets: full ranks, some rank 0, all
    rank 0): a block is fetched only when an item of its own target needs it, and every output block that is
    written back (on an index change, or at the end) was computed or passed through, never left unwritten."""
    m, num_slots, tm = 300 if sorted_rows else 60, 6, 128 if sorted_rows else None
    tm = tm or m
    mp = -(-m // tm) * tm
    rank_sets = [[0, 16, 8, 24, 8, 16], [0, 0, 8, 0, 16, 0], [0] * num_slots]
    tables = tuple(PageTable.padded(num_slots, 1, 24, 8, jnp.asarray(r)) for r in rank_sets)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    g = group_rows(slots, slots > 0, num_keys=num_slots)
    row_group = (jnp.pad(g.row_group[g.order], (0, mp - m), constant_values=-1) if sorted_rows else g.row_group)
    sched = jax.tree.map(np.asarray, _build(g, row_group, tables, num_experts=1, tm=tm, num_rows=mp,
                                            sorted_rows=sorted_rows, arena_blocks=(18, 18, 18)))
    # shrink: target i's A block changes only at items of target i
    n, items = int(sched.sh_count), sched.items_shrink
    for i in range(3):
        blocks = sched.sh_block[i * items:i * items + n]
        changed = np.flatnonzero(np.diff(blocks)) + 1
        assert np.all(sched.sh_seg[changed] == i)
    # expand: walk the grid
    counts, items = sched.ex_count, sched.items_expand
    assert counts[2] == 0 and 0 < counts[1] < counts[0]
    grid = ExpandGrid(ntiles=(2, 1, 1), items=items)
    prefetch = tuple(map(jnp.asarray, (counts, sched.ex_tile, sched.ex_group, sched.ex_row, sched.ex_first,
                                       sched.ex_last, sched.ex_block)))
    steps_j, steps_t = (a.ravel() for a in np.meshgrid(np.arange(sum(grid.ntiles)), np.arange(int(counts.max())),
                                                       indexing="ij"))
    evaluate = lambda f: np.stack(jax.vmap(lambda j, t: jnp.stack(f(j, t, *prefetch)))(steps_j, steps_t))
    segs = np.asarray(jax.vmap(grid.seg_of)(steps_j))
    b_idx = [evaluate(grid.b_map(i)) for i in range(3)]
    y_idx = [evaluate(grid.y_map(i)) for i in range(3)]
    b_fetches, y_prev, written = [0] * 3, [None] * 3, [set() for _ in range(3)]
    for step, (j, t) in enumerate(zip(steps_j, steps_t)):
        seg = segs[step]
        for i in range(3):
            b, y = tuple(b_idx[i][step]), tuple(y_idx[i][step])
            if step == 0 or b != tuple(b_idx[i][step - 1]):
                assert step == 0 or (seg == i and t < counts[i]), (i, j, t)
                b_fetches[i] += 1
            if y_prev[i] is not None and y != y_prev[i]:
                assert y_prev[i] in written[i], (i, j, t, y_prev[i])  # write-back of a computed block
            y_prev[i] = y
            k = i * items + t
            if seg == i and ((t < counts[i] and sched.ex_last[k]) or (counts[i] == 0 and t == 0)):
                written[i].add(y)
    assert all(y_prev[i] in written[i] for i in range(3))  # the final write-back
    for i in range(3):  # at most one fetch per item and column tile (plus the first)
        assert b_fetches[i] <= max(int(counts[i]), 1) * grid.ntiles[i] + 1


# --------------------------------------------------------------------------------- kernels vs reference


def _apply(ys, x, slots, pairs, ranks, blocks, experts=None, packed=False, **kwargs):
    """lora_apply on pool pages (padded pool, or repacked into a packed arena)."""
    rb = blocks.rank_block
    num_experts = 1 if experts is None else pairs[0][0].shape[1]
    a_rows, b_rows, tables = [], [], []
    for (a, b), rk in zip(pairs, ranks):
        r = a.shape[-1]
        ar, br = a_rows_from_pool(a, rb), b_rows_from_pool(b, 1 if experts is None else 2, rb)
        rp = ar.shape[0] // (b.shape[0] * num_experts)
        if packed:  # copy each page into a packed arena: rows only up to the slot's rank blocks
            table = PageTable.packed(rk, num_experts, rb, rp)
            pa = np.zeros((total_blocks(table, num_experts) * rb, ar.shape[1]), ar.dtype)
            pb = np.zeros((pa.shape[0], br.shape[1]), br.dtype)
            for s, k in enumerate(rk):
                nb = -(-k // rb)
                for e in range(num_experts):
                    dst = (int(table.start[s]) + e * int(table.stride[s])) * rb
                    src = (s * num_experts + e) * rp
                    pa[dst:dst + nb * rb] = np.asarray(ar[src:src + nb * rb])
                    pb[dst:dst + nb * rb] = np.asarray(br[src:src + nb * rb])
            ar, br = jnp.asarray(pa), jnp.asarray(pb)
        else:
            table = PageTable.padded(b.shape[0], num_experts, rp, rb, jnp.asarray(rk))
        del r
        a_rows.append(ar)
        b_rows.append(br)
        tables.append(table)
    if experts is None:
        keys, active = slots, slots > 0
    else:
        ok = (experts >= 0) & (experts < num_experts)
        keys, active = slots * num_experts + jnp.where(ok, experts, 0), ok & (slots > 0)
    return lora_apply(tuple(ys), x, keys, active, tuple(a_rows), tuple(b_rows), tuple(tables),
                      num_experts=num_experts, blocks=blocks, interpret=INTERPRET, **kwargs)


@pytest.mark.parametrize("variant", ["decode", "prefill"])
@pytest.mark.parametrize("m", [1, 3, 17, 130])
def test_dense_delta_matches_reference(rng, variant, m):
    """Ragged, unaligned token counts; heterogeneous ranks (3, 8, 11, 16) in one batch; f32 tight."""
    num_slots, d_in, out = 6, 40, 24
    ranks = ranks_of(num_slots, rng)
    a, b = make_pages(rng, ranks, d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.float32)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    (got,) = _apply((jnp.zeros((m, out), jnp.float32),), x, slots, [(a, b)], [ranks], VARIANTS[variant])
    want = reference.lora_delta(x, slots, a, b)
    assert rel_err(got, want) < 1e-5 if np.any(np.asarray(want)) else np.all(np.asarray(got) == 0)
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(slots) == 0], 0)


@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_expert_delta_matches_reference(rng, variant):
    """(token, k) rows to experts with adapter slots; padding rows (expert == E); empty (slot, expert) groups."""
    m, num_slots, num_experts, d_in, out = 150, 4, 5, 32, (2, 24)
    ranks = ranks_of(num_slots, rng)
    a, b = make_pages(rng, ranks, d_in, out, experts=num_experts)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.float32)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts + 1, size=m), jnp.int32)  # == E: padding row
    y = jnp.zeros((m, 48), jnp.float32)
    (got,) = _apply((y,), x, slots, [(a, b)], [ranks], VARIANTS[variant], experts=experts)
    want = reference.expert_lora_delta(x, slots, experts, a, b).reshape(m, -1)
    assert rel_err(got, want) < 1e-5
    assert np.all(np.asarray(got)[np.asarray(experts) == num_experts] == 0)


@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_packed_arena_matches_reference(rng, variant):
    """The same kernels on a packed arena (each adapter takes only its rank blocks) and with experts."""
    m, num_slots, num_experts, d_in, out = 70, 5, 3, 16, 32
    ranks = [0, 8, 24, 0, 13]
    a, b = make_pages(rng, ranks, d_in, out, experts=num_experts)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.float32)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)
    (got,) = _apply((jnp.zeros((m, out), jnp.float32),), x, slots, [(a, b)], [ranks], VARIANTS[variant],
                    experts=experts, packed=True)
    assert rel_err(got, reference.expert_lora_delta(x, slots, experts, a, b)) < 1e-5


def test_prefill_split_into_launches_when_work_lists_exceed_smem(rng):
    """300 expert rows, a work-list budget that 384 rows exceed: two launches (256 + 44 rows), same result."""
    m, num_slots, num_experts, d_in, out = 300, 3, 2, 16, 16
    ranks = [0, 16, 5]
    a, b = make_pages(rng, ranks, d_in, out, experts=num_experts)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.float32)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)
    tables = (PageTable.padded(num_slots, num_experts, 16, 8),)
    assert metadata_bytes(256, 128, 6, tables, True) <= 700 < metadata_bytes(384, 128, 6, tables, True)
    (got,) = _apply((jnp.zeros((m, out), jnp.float32),), x, slots, [(a, b)], [ranks], PREFILL, experts=experts,
                    smem_budget=700)
    assert rel_err(got, reference.expert_lora_delta(x, slots, experts, a, b)) < 1e-5


@pytest.mark.parametrize("rank", [1, 8, 9, 16, 24, 32])
def test_every_rank_bucket(rng, rank):
    """One adapter of each rank bucket (rank blocks of 8 in a rank-32 pool), tokens of one adapter and slot 0."""
    m, d_in, out = 20, 24, 16
    ranks = [0, rank, 32]
    a, b = make_pages(rng, ranks, d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.float32)
    slots = jnp.asarray(rng.integers(0, 2, size=m), jnp.int32)
    (got,) = _apply((jnp.zeros((m, out), jnp.float32),), x, slots, [(a, b)], [ranks], DECODE)
    assert rel_err(got, reference.lora_delta(x, slots, a, b)) < 1e-5


@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_all_slot_zero_leaves_y_bit_identical(rng, variant):
    m, d_in = 45, 16
    a, b = make_pages(rng, [0, 8, 16], d_in, 8)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.bfloat16)
    y = jnp.asarray(rng.normal(size=(m, 8)), jnp.bfloat16)
    (got,) = _apply((y,), x, jnp.zeros((m,), jnp.int32), [(a.astype(x.dtype), b.astype(x.dtype))], [[0, 8, 16]],
                    VARIANTS[variant])
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_fused_outputs_in_place(rng, variant):
    """q/k/v-like: three targets of one input, different widths and ranks, one target without LoRA for some
    adapters (rank 0), added into bf16 outputs in place. Slot-0 rows of y are NaN (poisoned) and must stay
    NaN: the kernels never touch them; every other row must equal add_delta(y, reference delta)."""
    m, num_slots, d_in = 140, 5, 32
    widths = (256, 128, 128)
    rank_sets = [[0, 16, 8, 16, 3], [0, 0, 8, 16, 0], [0, 16, 5, 0, 16]]
    pairs = [make_pages(rng, rk, d_in, w, dtype=jnp.bfloat16) for rk, w in zip(rank_sets, widths)]
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.bfloat16)
    slots = rng.integers(0, num_slots, size=m).astype(np.int32)
    ys = [rng.normal(size=(m, w)).astype(np.float32) for w in widths]
    for y in ys:
        y[slots == 0] = np.nan
    ys = tuple(jnp.asarray(y, jnp.bfloat16) for y in ys)
    slots = jnp.asarray(slots)
    got = _apply(ys, x, slots, pairs, rank_sets, VARIANTS[variant])
    zero = np.asarray(slots) == 0
    for g, y, (a, b) in zip(got, ys, pairs):
        g = np.asarray(g, np.float32)
        assert np.all(np.isnan(g[zero])) and np.all(np.isfinite(g[~zero]))
        want = np.asarray(reference.add_delta(y, reference.lora_delta(x, slots, a, b)), np.float32)
        assert rel_err(g[~zero], want[~zero]) < 1e-2


def test_bf16_delta_close_to_float64(rng):
    m, num_slots, d_in, out = 96, 4, 64, 128
    ranks = [0, 16, 16, 8]
    a, b = make_pages(rng, ranks, d_in, out)
    x = rng.normal(size=(m, d_in)).astype(np.float32)
    slots = rng.integers(1, num_slots, size=m).astype(np.int32)
    want = np.stack([x[i].astype(np.float64) @ np.asarray(a[s], np.float64) @ np.asarray(b[s], np.float64)
                     for i, s in enumerate(slots)])
    bf = lambda v: jnp.asarray(v, jnp.bfloat16)
    (got,) = _apply((jnp.zeros((m, out), jnp.float32),), bf(x), jnp.asarray(slots), [(bf(a), bf(b))], [ranks],
                    Blocks(token_tile=128, col_tile=128, decode_col_tile=128, rank_block=16, decode_rows=32))
    assert rel_err(got, want) < 2e-2
    # on the same bf16 inputs, the kernels and the reference differ only in float32 summation order
    assert rel_err(got, reference.lora_delta(bf(x), jnp.asarray(slots), bf(a), bf(b))) < 1e-5


# ------------------------------------------------------------------------------------------ dispatcher


def test_backend_selection():
    assert dispatch.select_backend(platform="cpu") is dispatch.LoraBackend.REFERENCE
    assert dispatch.select_backend(platform="gpu") is dispatch.LoraBackend.REFERENCE  # decode sizes
    assert dispatch.select_backend(platform="tpu") is dispatch.LoraBackend.TPU
    with dispatch.use_backend("tpu_interpret"):
        assert dispatch.select_backend() is dispatch.LoraBackend.TPU_INTERPRET
        assert dispatch.select_backend("reference") is dispatch.LoraBackend.REFERENCE
    assert dispatch.select_backend() is dispatch.LoraBackend.REFERENCE  # this test suite runs on CPU


def test_dispatch_matches_reference_signatures(rng):
    """The reference's signatures and pool layout, jitted, through the interpreted TPU kernels; the rank-major
    A layout gives the same result; slot_ranks only skips zeros."""
    m, num_slots, d_in, out = 24, 4, 32, (2, 16)
    ranks = [0, 4, 16, 9]
    a, b = make_pages(rng, ranks, d_in, out)
    x = jnp.asarray(rng.normal(size=(m, d_in)), jnp.float32)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    want = reference.lora_delta(x, slots, a, b)
    with dispatch.use_backend("tpu_interpret"):
        got = jax.jit(dispatch.lora_delta)(x, slots, a, b)
        got_major = dispatch.lora_delta(x, slots, jnp.swapaxes(a, 1, 2), b, a_rank_major=True,
                                        slot_ranks=jnp.asarray(ranks))
    assert got.shape == want.shape == (m, *out)
    assert rel_err(got, want) < 1e-5 and rel_err(got_major, want) < 1e-5

    num_experts = 3
    ea, eb = make_pages(rng, ranks, d_in, 16, experts=num_experts)
    experts = jnp.asarray(rng.integers(0, num_experts + 1, size=m), jnp.int32)
    y = jnp.asarray(rng.normal(size=(m, 16)), jnp.bfloat16)
    want_e = reference.add_delta(y, reference.expert_lora_delta(x, slots, experts, ea, eb))
    got_e = dispatch.add_expert_lora(y, x, slots, experts, ea, eb, backend="tpu_interpret")
    assert got_e.dtype == jnp.bfloat16 and rel_err(got_e, want_e) < 1e-2
    ref_e = dispatch.add_expert_lora(y, x, slots, experts, ea, eb)  # CPU default: the reference itself
    np.testing.assert_array_equal(np.asarray(ref_e, np.float32), np.asarray(want_e, np.float32))


@pytest.mark.parametrize("m", [40, 300])
def test_kernels_lower_for_tpu(m):
    """The Pallas -> Mosaic lowering (block shapes, index maps, kernel ops) for a real TPU, exported on CPU:
    decode (40 rows) and prefill (300 rows), bf16, fused outputs. Mosaic's own compile runs only on a TPU."""
    num_slots, d_in, rank, widths = 9, 256, 32, (512, 128)
    bf = jnp.bfloat16

    def step(ys, x, slots, pages):
        return dispatch.add_lora_fused(ys, x, slots, pages, backend="tpu",
                                       blocks=Blocks(token_tile=128, col_tile=256, rank_block=16, decode_rows=64))

    spec = jax.ShapeDtypeStruct
    args = (tuple(spec((m, w), bf) for w in widths), spec((m, d_in), bf), spec((m,), jnp.int32),
            tuple((spec((num_slots, d_in, rank), bf), spec((num_slots, rank, w), bf)) for w in widths))
    exported = jax.export.export(jax.jit(step), platforms=["tpu"])(*args)
    assert exported.mlir_module().count("tpu_custom_call") == 2  # shrink + expand
    if m == 40:  # bf16 pages in rank blocks of 8 would cut (16, 128) tiles: refused before lowering
        half = lambda *a: dispatch.add_lora_fused(*a, backend="tpu", blocks=Blocks(rank_block=8))
        with pytest.raises(ValueError, match="multiple of 16"):
            jax.export.export(jax.jit(half), platforms=["tpu"])(*args)


def test_block_tables(caplog):
    entry = block_tables.blocks_for("v6e", jnp.bfloat16, d_in=4096, out_widths=(4096,), max_rank=64)
    assert entry.rank_block == 16 and entry.token_tile % 128 == 0
    wide = block_tables.blocks_for("v5e", jnp.bfloat16, d_in=65536, out_widths=(4096,), max_rank=64)
    assert wide.token_tile == 128 and wide.decode_rows == 128  # the x tile holds all of D_in: it must fit VMEM
    wider = block_tables.blocks_for("v5e", jnp.bfloat16, d_in=131072, out_widths=(4096,), max_rank=64)
    assert wider.decode_rows < 128
    assert block_tables.blocks_for("v5e", jnp.float32, d_in=64, out_widths=(64,), max_rank=24).rank_block == 8
    assert block_tables.blocks_for("v5e", jnp.bfloat16, d_in=64, out_widths=(64,), max_rank=8).rank_block == 16
    with caplog.at_level(logging.WARNING):
        assert block_tables.blocks_for("unknown-tpu", jnp.bfloat16, d_in=64, out_widths=(64,),
                                       max_rank=16) == block_tables.DEFAULT
    assert "no tuned LoRA kernel blocks" in caplog.text
    assert block_tables.device_key("TPU v5 lite") == "v5e"
