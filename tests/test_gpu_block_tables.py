"""The GPU LoRA kernels' per-device settings (pallas_kernels/gpu/block_tables.py, tuned_blocks.json) and the
script that regenerates them (tools/tune_gpu_lora_blocks.py), on CPU.

Every setting a tuning run may pick must be correct (Mosaic GPU interpreter against the reference) and lower for
CUDA at real widths; what only a GPU says is which is fastest, and whether it fits in SMEM at run time."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinilora_jax.lora import reference
from pallas_kernels import dispatch
from pallas_kernels.gpu import block_tables
from pallas_kernels.gpu import ops as gpu_ops
from pallas_kernels.gpu.block_tables import GpuBlocks
from pallas_kernels.gpu.expand import column_tile

GPU = dispatch.LoraBackend.GPU_INTERPRET
BF = jnp.bfloat16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def pages(rng, num_slots, d_in, out, rank, experts=None):
    """bf16 pool pages, A rank-major [S, (E,) R, D_in] as the pool keeps it, B [S, (E,) R, out]; slot 0 zero."""
    lead = (num_slots,) if experts is None else (num_slots, experts)
    a = rng.normal(size=(*lead, rank, d_in)).astype(np.float32) / np.sqrt(d_in)
    b = rng.normal(size=(*lead, rank, out)).astype(np.float32)
    a[0], b[0] = 0, 0
    return jnp.asarray(a, BF), jnp.asarray(b, BF)


def test_committed_table_parses_and_covers_the_h200():
    table = block_tables.load_table()
    for key, entry in table.items():
        device, dtype = key.split("/")
        assert dtype in ("bfloat16", "float16"), key
        GpuBlocks(**{k: v for k, v in entry.items() if k in block_tables.FIELDS})  # validates every field
        assert isinstance(entry["measured"], bool) and entry["source"]
    assert block_tables.blocks_for("h200", "bfloat16") == GpuBlocks(**{
        k: v for k, v in table["h200/bfloat16"].items() if k in block_tables.FIELDS})


def test_device_keys():
    assert block_tables.device_key("NVIDIA H200") == "h200"
    assert block_tables.device_key("NVIDIA H100 80GB HBM3") == "h100"
    assert block_tables.device_key("NVIDIA GH200 480GB") == "gh200"
    assert block_tables.device_key("cpu") == "cpu"


def test_missing_entry_falls_back_to_defaults_with_a_warning(caplog):
    block_tables.blocks_for.cache_clear()
    with caplog.at_level("WARNING"):
        assert block_tables.blocks_for("b200", "bfloat16") == block_tables.DEFAULT
    assert "no GPU LoRA kernel settings for b200/bfloat16" in caplog.text


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="stages 7"):
        GpuBlocks(stages=7)
    with pytest.raises(ValueError, match="expand_cols 96"):
        GpuBlocks(expand_cols=96)
    with pytest.raises(ValueError, match="decode_ksplit 3"):
        GpuBlocks(decode_ksplit=3)
    with pytest.raises(ValueError, match="expand_tiles -1"):
        GpuBlocks(expand_tiles=-1)


def test_write_entries_merges(tmp_path):
    path = str(tmp_path / "t.json")
    block_tables.write_entries({"h200/bfloat16": {"stages": 3, "measured": False}}, path)
    block_tables.write_entries({"h200/bfloat16": {"expand_cols": 256}, "h100/bfloat16": {"stages": 2}}, path)
    with open(path) as f:
        table = json.load(f)
    assert table == {"h200/bfloat16": {"stages": 3, "measured": False, "expand_cols": 256},
                     "h100/bfloat16": {"stages": 2}}


def test_expand_column_tiles():
    assert [column_tile(n, 256) for n in (4096, 1536, 192, 64, 96)] == [256, 256, 64, 64, 0]
    assert column_tile(4096, 64) == 64


# Each tunable set to a value other than the default, at shapes where it takes effect: stages above and below 4
# with 8 D_in blocks per CTA; 256- and 64-column expand tiles (192 columns: the 256 tile falls back to 64);
# an 8-way D_in split; decode_rows 0 (the prefill variant at decode sizes).
SETTINGS = [GpuBlocks(stages=2, expand_cols=256), GpuBlocks(stages=6, expand_cols=64),
            GpuBlocks(decode_ksplit=8, stages=3), GpuBlocks(decode_rows=0, stages=5, rank_buckets=True)]


@pytest.mark.parametrize("blocks,expert", [(b, i % 2 == 1) for i, b in enumerate(SETTINGS)]
                         + [(SETTINGS[0], True)],  # the 256 tile at a width it divides
                         ids=lambda v: f"s{v.stages}c{v.expand_cols}k{v.decode_ksplit}r{v.decode_rows}"
                         if isinstance(v, GpuBlocks) else ("expert" if v else "dense"))
def test_every_setting_matches_the_reference(rng, blocks, expert):
    m, num_slots, num_experts, d_in = 70, 4, 3, 512
    out = 192 if blocks.expand_cols == 256 and not expert else 512
    a, b = pages(rng, num_slots, d_in, out, 32, num_experts if expert else None)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    if expert:
        experts = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)
        got = dispatch.expert_lora_delta(x, slots, experts, a, b, a_rank_major=True, backend=GPU, blocks=blocks)
        want = reference.expert_lora_delta(x, slots, experts, a, b, a_rank_major=True)
    else:
        got = dispatch.lora_delta(x, slots, a, b, a_rank_major=True, backend=GPU, blocks=blocks)
        want = reference.lora_delta(x, slots, a, b, a_rank_major=True)
    assert rel_err(got, want) < 1e-5
    assert gpu_ops.pick_ksplit(m, d_in, blocks) == (1 if blocks.decode_rows == 0 else blocks.decode_ksplit)


@pytest.mark.parametrize("stages,cols,ksplit,buckets", [(s, 128, 1, False) for s in block_tables.STAGE_CHOICES]
                         + [(2, 64, 1, False), (6, 256, 1, False)]
                         + [(4, 128, k, False) for k in block_tables.KSPLIT_CHOICES if k > 1]
                         + [(4, 128, 4, True), (2, 256, 1, True)])
def test_every_candidate_lowers_for_cuda(stages, cols, ksplit, buckets):
    """Every value of every setting the tuner may pick (the extremes combined) lowers through Mosaic GPU's dialect
    lowering (TMA boxes, tiling) at the widest rank (128) and H = 4096, per expert."""
    blocks = GpuBlocks(stages=stages, expand_cols=cols, decode_ksplit=ksplit, decode_rows=1 << 20 if ksplit > 1
                       else 0, rank_buckets=buckets)
    sds = jax.ShapeDtypeStruct
    m, h, r, e = 100, 4096, 128, 8
    args = (sds((m, h), BF), sds((m, h), BF), sds((m,), jnp.int32), sds((m,), jnp.int32),
            sds((16, e, r, h), BF), sds((16, e, r, h), BF))
    step = lambda y, x, s, ex, a, b: dispatch.add_expert_lora(y, x, s, ex, a, b, a_rank_major=True,
                                                              backend=dispatch.LoraBackend.GPU, blocks=blocks)
    text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2


@pytest.mark.parametrize("expert", [False, True])
@pytest.mark.parametrize("m", [21, 150])  # decode (D_in split) and prefill variants
def test_rank_buckets_read_only_the_rows_a_slot_needs(rng, expert, m):
    """Mixed ranks (8, 16, 32, 64) in a rank-64 pool. Rows of A and B past each slot's rank bucket (16, 16, 32,
    64) hold NaN: with rank buckets the kernels never read them and match the reference on the zeroed pages;
    without, they read every page at rank 64 and the NaN reaches the output (so the test sees the difference)."""
    ranks, d_in, out, width, num_experts = [0, 8, 16, 32, 64], 256, 128, 64, 3
    bucket_of = {0: 0, 8: 16, 16: 16, 32: 32, 64: 64}
    lead = (len(ranks),) if not expert else (len(ranks), num_experts)
    a = rng.normal(size=(*lead, width, d_in)).astype(np.float32) / np.sqrt(d_in)
    b = rng.normal(size=(*lead, width, out)).astype(np.float32)
    poisoned_a, poisoned_b = a.copy(), b.copy()
    for s, r in enumerate(ranks):
        a[s, ..., r:, :], b[s, ..., r:, :] = 0, 0
        poisoned_a[s, ..., r:, :], poisoned_b[s, ..., r:, :] = 0, 0
        poisoned_a[s, ..., bucket_of[r]:, :], poisoned_b[s, ..., bucket_of[r]:, :] = np.nan, np.nan
    a, b, pa, pb = (jnp.asarray(v, BF) for v in (a, b, poisoned_a, poisoned_b))
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    slots = jnp.asarray(rng.integers(0, len(ranks), size=m), jnp.int32)
    slot_ranks = jnp.asarray(ranks, jnp.int32)
    experts = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)

    def delta(a_, b_, buckets):
        kw = dict(a_rank_major=True, slot_ranks=slot_ranks, backend=GPU, blocks=GpuBlocks(rank_buckets=buckets))
        if expert:
            return dispatch.expert_lora_delta(x, slots, experts, a_, b_, **kw)
        return dispatch.lora_delta(x, slots, a_, b_, **kw)

    want = (reference.expert_lora_delta(x, slots, experts, a, b, a_rank_major=True) if expert
            else reference.lora_delta(x, slots, a, b, a_rank_major=True))
    got = delta(pa, pb, True)
    assert np.all(np.isfinite(np.asarray(got))) and rel_err(got, want) < 1e-5
    assert not np.all(np.isfinite(np.asarray(delta(pa, pb, False))))


def test_settings_reach_the_kernels():
    """Each setting changes the traced kernels (a setting the kernels ignored would fail here). The jaxpr, not
    the lowered text: Mosaic GPU's serialized modules differ between two lowerings of the same kernel."""
    sds = jax.ShapeDtypeStruct
    m, h = 600, 1024  # above the default decode_rows (512): the prefill variant unless decode_rows is raised

    def traced(blocks):
        step = lambda y, x, s, a, b: dispatch.add_lora(y, x, s, a, b, a_rank_major=True,
                                                       backend=dispatch.LoraBackend.GPU, blocks=blocks)
        args = (sds((m, h), BF), sds((m, h), BF), sds((m,), jnp.int32), sds((8, 32, h), BF), sds((8, 32, h), BF))
        return str(jax.make_jaxpr(step)(*args))

    variants = [GpuBlocks(), GpuBlocks(stages=2), GpuBlocks(expand_cols=256), GpuBlocks(decode_rows=1024),
                GpuBlocks(decode_rows=1024, decode_ksplit=2), GpuBlocks(rank_buckets=True)]
    texts = [traced(b) for b in variants]
    assert len(set(texts)) == len(variants)
    assert traced(GpuBlocks(decode_ksplit=2)) == texts[0]  # the prefill variant does not split D_in


def test_dispatch_reads_kernel_min_rows_from_the_table(monkeypatch):
    monkeypatch.setattr(block_tables, "blocks_for", lambda device, dtype: GpuBlocks(kernel_min_rows=64))
    assert dispatch.gpu_kernel_min_rows() == 64
    assert dispatch.select_backend(platform="gpu", rows=64) is dispatch.LoraBackend.GPU
    assert dispatch.select_backend(platform="gpu", rows=63) is dispatch.LoraBackend.REFERENCE
    # the kernels take 16-bit operands only: float32 calls stay on the reference at any size
    assert dispatch.select_backend(platform="gpu", rows=1 << 20, dtype=jnp.float32) is \
        dispatch.LoraBackend.REFERENCE


def test_kernel_min_rows_by_rank(monkeypatch):
    """The crossover falls with the pool rank: a call takes the entry of the largest listed rank <= its own,
    kernel_min_rows below the smallest listed rank and when the rank is unknown."""
    blocks = GpuBlocks(kernel_min_rows=2048, kernel_min_rows_by_rank=[[16, 2048], [32, 512], [64, 128]])
    assert blocks.kernel_min_rows_by_rank == ((16, 2048), (32, 512), (64, 128))
    assert len({blocks, GpuBlocks(**dataclasses.asdict(blocks))}) == 1  # hashable, JSON lists or tuples alike
    assert [blocks.min_rows_for(r) for r in (None, 8, 16, 31, 32, 48, 64, 256)] == \
        [2048, 2048, 2048, 2048, 512, 512, 128, 128]
    for bad in (((32, 1), (16, 2)), ((16, 1), (16, 2)), ((0, 1),), ((16, -1),)):
        with pytest.raises(ValueError, match="kernel_min_rows_by_rank"):
            GpuBlocks(kernel_min_rows_by_rank=bad)
    monkeypatch.setattr(block_tables, "blocks_for", lambda device, dtype: blocks)
    assert dispatch.gpu_kernel_min_rows(rank=64) == 128
    choose = lambda rows, rank: dispatch.select_backend(platform="gpu", rows=rows, rank=rank)
    assert choose(128, 64) is dispatch.LoraBackend.GPU and choose(127, 64) is dispatch.LoraBackend.REFERENCE
    assert choose(512, 32) is dispatch.LoraBackend.GPU and choose(512, 16) is dispatch.LoraBackend.REFERENCE
    assert choose(2047, None) is dispatch.LoraBackend.REFERENCE and choose(2048, None) is dispatch.LoraBackend.GPU


def test_min_rows_override_from_the_environment(monkeypatch):
    """INFINILORA_GPU_KERNEL_MIN_ROWS replaces the table's per-rank crossover (kernel_min_rows stays below the
    first listed rank); a malformed value is an error naming the variable."""
    monkeypatch.setattr(block_tables, "blocks_for", lambda device, dtype: GpuBlocks(
        kernel_min_rows=2048, kernel_min_rows_by_rank=[[16, 2048], [32, 1024]]))
    assert dispatch.gpu_kernel_min_rows(rank=32) == 1024
    monkeypatch.setenv(dispatch.MIN_ROWS_ENV_VAR, "32:256, 64:64")
    assert [dispatch.gpu_kernel_min_rows(rank=r) for r in (16, 32, 128)] == [2048, 256, 64]
    assert dispatch.select_backend(platform="gpu", rows=256, rank=32) is dispatch.LoraBackend.GPU
    for bad in ("32", "32:a", "64:1,32:1", "32:1:2", ","):
        monkeypatch.setenv(dispatch.MIN_ROWS_ENV_VAR, bad)
        with pytest.raises(ValueError, match=dispatch.MIN_ROWS_ENV_VAR):
            dispatch.gpu_kernel_min_rows(rank=32)


def test_dispatch_entry_points_pass_the_pool_rank(monkeypatch, rng):
    """Every entry point asks for a backend with the rank its pool pads pages to (the largest of fused
    targets'; a paged arena's page width), whatever the slots' own ranks."""
    from pallas_kernels.layout import PageTable
    seen = []
    real = dispatch.select_backend
    monkeypatch.setattr(dispatch, "select_backend", lambda *a, **kw: seen.append(kw.get("rank")) or real(*a, **kw))
    x, slots = jnp.ones((4, 64), BF), jnp.ones((4,), jnp.int32)
    a16, b16 = pages(rng, 3, 64, 64, 16)
    a48, b48 = pages(rng, 3, 64, 64, 48)
    dispatch.lora_delta(x, slots, a48, b48, a_rank_major=True, slot_ranks=jnp.array([0, 8, 8]))
    ea, eb = pages(rng, 3, 64, 64, 32, experts=2)
    dispatch.expert_lora_delta(x, slots, jnp.zeros((4,), jnp.int32), ea, eb, a_rank_major=True)
    dispatch.add_lora_fused((jnp.zeros((4, 64), BF),) * 2, x, slots, ((a16, b16), (a48, b48)), a_rank_major=True)
    table = PageTable.padded(3, 1, 64, 16)
    arena = jnp.zeros((3 * 64, 64), BF)
    dispatch.paged_lora_delta(x, slots, None, arena, arena, table)
    assert seen == [48, 32, 48, 64]


def test_blocks_of_the_wrong_platform_are_refused(rng):
    from pallas_kernels.tpu.ops import Blocks
    a, b = pages(rng, 2, 64, 64, 16)
    x, slots = jnp.zeros((4, 64), BF), jnp.ones((4,), jnp.int32)
    with pytest.raises(TypeError, match="takes GpuBlocks"):
        dispatch.lora_delta(x, slots, a, b, a_rank_major=True, backend=GPU, blocks=Blocks())
    with pytest.raises(TypeError, match="takes Blocks"):
        dispatch.lora_delta(x, slots, a, b, a_rank_major=True, backend="tpu_interpret", blocks=GpuBlocks())


def test_tuner_crossover_rule():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from tune_gpu_lora_blocks import winning_from
    counts = (256, 512, 1024, 2048)
    assert winning_from(counts, [False, True, True, True]) == 512
    assert winning_from(counts, [True, False, True, True]) == 1024  # a loss above a win resets it
    assert winning_from(counts, [True] * 4) == 256
    assert winning_from(counts, [True, True, True, False]) == 4096  # lost at the largest: past the probes


def test_tuner_decode_rows_rule():
    """decode_rows: the largest count up to which the decode variant's geometric-mean time ratio stayed <= 1
    (the H200's crossover timings: a 3% loss per expert does not outweigh 29% gained on a dense call)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from tune_gpu_lora_blocks import decode_rows_from
    counts = (128, 256, 512)
    assert decode_rows_from(counts, [[0.71, 1.03], [0.74, 1.04], [0.79, 0.98]]) == 512
    assert decode_rows_from(counts, [[0.9, 1.0], [1.2, 1.1], [0.5, 0.5]]) == 128  # a loss ends it
    assert decode_rows_from(counts, [[1.01, 1.0], [0.5, 0.5], [0.5, 0.5]]) == 0


def test_tuner_merges_ranks_probed_in_separate_calls():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from tune_gpu_lora_blocks import merge_by_rank
    assert merge_by_rank([[16, 2048], [32, 1024], [64, 1024]], [(64, 256), (128, 1024)]) == \
        [(16, 2048), (32, 1024), (64, 256), (128, 1024)]
    assert merge_by_rank((), [(32, 512)]) == [(32, 512)]


def test_tuner_dry_run_rewrites_only_its_entry(tmp_path):
    """The whole flow (every phase) in the interpreter on tiny shapes: it writes a valid interpret entry with each
    phase's fields, keeps the table's other entries, logs a checked timing for every phase, and says the entry
    is not measured."""
    out = tmp_path / "table.json"
    with open(block_tables.TABLE_PATH) as f:
        committed = json.load(f)
    out.write_text(json.dumps(committed))
    log = tmp_path / "log.json"
    subprocess.run([sys.executable, "tools/tune_gpu_lora_blocks.py", "--interpret", f"--out={out}", f"--log={log}"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True)
    table = json.loads(out.read_text())
    assert {k: v for k, v in table.items() if not k.startswith("interpret/bf")} == \
        {k: v for k, v in committed.items() if not k.startswith("interpret/bf")}
    entry = table["interpret/bfloat16"]
    blocks = GpuBlocks(**{k: v for k, v in entry.items() if k in block_tables.FIELDS})
    assert entry["measured"] is False and "dry run" in entry["source"]
    assert blocks.kernel_min_rows >= 1024
    assert [r for r, _ in blocks.kernel_min_rows_by_rank] == [16, 32]
    assert all(rows >= 1024 for _, rows in blocks.kernel_min_rows_by_rank)
    assert [r for r, rows in entry["kernel_crossover_rows_by_rank"] if rows in (80, 160)] == [16, 32]
    timings = json.loads(log.read_text())["timings"]
    tags = {t["tag"].split()[0] for t in timings}
    assert tags == {"prefill", "decode", "expand", "window", "runs", "buckets", "crossover", "dispatch"}
    assert isinstance(entry["rank_buckets"], bool) and entry["expand_tiles"] in (1, 0)
    assert entry["window_unit_rows"] in (0, 64)
    assert entry["run_rows"] in (0, 1 << 20)
    assert all(t["rel_err"] < 1e-3 and t["us"] >= 0 for t in timings)
    assert dataclasses.asdict(blocks)["stages"] in (2, 3)
