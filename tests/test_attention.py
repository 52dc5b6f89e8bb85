"""Attention backends against the reference on random paged caches, the kernels' metadata, and one engine run.

Each case packs a random mix of decode rows and prefill chunks (ragged lengths, chunks cut into several 16-query
tiles, pages drawn at random so tables are non-contiguous and skip pages, GQA, padding rows and padding tokens)
with build_step_batch, fills every page of the cache with random values (so anything read by mistake shows) and
writes the step's new K/V through each backend's own layout and writer.

What runs where on CPU:
  - GPU_INTERPRET runs jax's Pallas paged decode kernel itself (the Triton kernel, by the Pallas interpreter).
  - The TPU kernel (jax's ragged paged attention) cannot run on CPU with jax 0.11.2: its TPU interpreter fails
    inside the kernel (test_tpu_kernel_interpret says so and skips). So TPU_EMULATED runs the TPU backend (layout,
    metadata, padding, output masking) with the kernel replaced by its contract in plain JAX (models/attention/
    ragged.py), that contract is held to jax's own `ref_ragged_paged_attention`, and the real kernel is lowered
    for a TPU (Mosaic) to show the path compiles that far.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import adapter_dirs, model_dir, reference

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.models.attention import AttentionBackend, layout, paged_attention, write_kv
from infinilora_jax.models.attention import ragged as ragged_contract
from infinilora_jax.models.attention.gpu import kernel_splits
from infinilora_jax.models.attention.metadata import ragged_rows
from infinilora_jax.models.batch import RowSpec, ShapePolicy, build_step_batch, padding_batch

PAGE, NUM_PAGES = 4, 48
# (start, new tokens): decode rows at several context lengths, chunks of 7 / 20 / 33 tokens (1-3 tiles of 16),
# one chunk continuing a sequence (start > 0)
ROWS = [(5, 1), (0, 7), (13, 1), (3, 20), (0, 1), (30, 1), (10, 33), (22, 1)]
POLICY = ShapePolicy(PAGE, NUM_PAGES, max_rows=8, max_prefill_rows=4, max_pages=16, max_tokens=128)


def _step(rng, rows=ROWS, heads=4, kv_heads=2, hd=16, dtype=jnp.float32, policy=POLICY):
    """A StepBatch for `rows`, with q, the new K/V and a random cache in the 'pages' layout."""
    free = list(rng.permutation(np.arange(1, NUM_PAGES)))
    specs = []
    for start, k in rows:
        pages = [int(free.pop()) for _ in range(-(-(start + k) // PAGE))]
        specs.append(RowSpec(list(range(1, k + 1)), start, 1, pages))
    batch, _ = build_step_batch(specs, PAGE, NUM_PAGES, policy)
    n = batch.num_tokens
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    return (jax.tree.map(jnp.asarray, batch), rand(n, heads, hd), rand(n, kv_heads, hd), rand(n, kv_heads, hd),
            rand(NUM_PAGES, PAGE, kv_heads, hd), rand(NUM_PAGES, PAGE, kv_heads, hd))


@functools.cache
def _step_fn(backend: AttentionBackend, sliding_window):
    """Write the step's K/V, then attend (one jitted function per backend, reused across cases)."""
    def f(batch, q, k, v, kv):
        kv = write_kv(backend, kv, k, v, batch.cache_slots)
        return paged_attention(backend, q, kv, batch, sliding_window)

    return jax.jit(f)


def _run(backend, batch, q, k, v, k_pages, v_pages, sliding_window=None):
    backend = AttentionBackend(backend)
    kv = layout.from_pages(backend.layout, k_pages, v_pages)
    return np.asarray(_step_fn(backend, sliding_window)(batch, q, k, v, kv), np.float32)


def _close(got, want, dtype):
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2)], ids=["group2", "group4"])
@pytest.mark.parametrize("backend", ["tpu_emulated", "gpu_interpret"])
def test_backend_matches_reference(backend, heads, kv_heads, dtype):
    inputs = _step(np.random.default_rng(heads), heads=heads, kv_heads=kv_heads, dtype=dtype)
    want = _run("reference", *inputs)
    got = _run(backend, *inputs)
    assert sum(k for _, k in ROWS) < inputs[0].num_tokens  # padding tokens exist: their outputs are zeros
    assert not np.any(want[-1]) and not np.any(got[-1])
    _close(got, want, dtype)


@pytest.mark.parametrize("backend", ["tpu_emulated", "gpu_interpret"])
def test_sliding_window(backend):
    """TPU: the kernel masks the window itself; GPU: decode rows fall back to the reference (no window in the
    kernel)."""
    inputs = _step(np.random.default_rng(7))
    want = _run("reference", *inputs, sliding_window=6)
    assert not np.allclose(want, _run("reference", *inputs))  # the window matters for these rows
    _close(_run(backend, *inputs, sliding_window=6), want, jnp.float32)


def test_decode_only_and_empty_steps():
    """Decode rows without a prefill block, and a warm-up padding batch (no rows at all)."""
    rng = np.random.default_rng(3)
    inputs = _step(rng, rows=[(5, 1), (17, 1), (0, 1)])
    assert inputs[0].prefill.index.shape[0] == 0
    for backend in ("tpu_emulated", "gpu_interpret"):
        _close(_run(backend, *inputs), _run("reference", *inputs), jnp.float32)
    empty = jax.tree.map(jnp.asarray, padding_batch(POLICY, 32, 8, prefill=True))
    q, k, v = (jnp.ones((32, h, 16)) for h in (4, 2, 2))
    for backend in ("reference", "tpu_emulated", "gpu_interpret"):
        assert not np.any(_run(backend, empty, q, k, v, *inputs[4:]))


def test_ragged_metadata():
    """One sequence per row in token order (a chunk's tiles merged), kv length = last position + 1."""
    batch = _step(np.random.default_rng(0))[0]
    rows = jax.jit(ragged_rows)(batch)
    q_lens = [k for _, k in ROWS]
    num = int(rows.num_seqs[0])
    assert num == len(ROWS)
    np.testing.assert_array_equal(rows.cu_q_lens[: num + 1], np.cumsum([0, *q_lens]))
    np.testing.assert_array_equal(rows.kv_lens[:num], [s + k for s, k in ROWS])
    assert int(rows.num_tokens) == sum(q_lens)
    empty = ragged_rows(jax.tree.map(jnp.asarray, padding_batch(POLICY, 16, 4, prefill=False)))
    assert (int(empty.num_seqs[0]), int(empty.num_tokens), int(empty.cu_q_lens[1])) == (1, 0, 1)


def test_ragged_contract_matches_jax_reference():
    """The step's ragged metadata fed to jax's own reference for its TPU kernel equals the reference backend, and
    so does the plain-JAX contract (ragged.py) the TPU_EMULATED backend runs."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    # few rows: jax's reference runs eagerly, one sequence at a time
    batch, q, k, v, k_pages, v_pages = _step(np.random.default_rng(1), rows=[(5, 1), (10, 33)], heads=8, kv_heads=2)
    (kv,) = write_kv(AttentionBackend.TPU_EMULATED, layout.from_pages("combined", k_pages, v_pages), k, v,
                     batch.cache_slots)
    rows = ragged_rows(batch)
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, kv.shape[-1] - q.shape[-1])))
    args = (qp, kv, rows.kv_lens, rows.page_indices, rows.cu_q_lens, rows.num_seqs)
    n = int(rows.num_tokens)
    for window in (None, 5):
        want = _run("reference", batch, q, k, v, k_pages, v_pages, sliding_window=window)
        jax_ref = np.asarray(ref_ragged_paged_attention(*args, sm_scale=16 ** -0.5, sliding_window=window))
        ours = np.asarray(ragged_contract.ragged_paged_attention(*args, sm_scale=16 ** -0.5, sliding_window=window))
        _close(jax_ref[:n, :, :16], want[:n], jnp.float32)
        _close(ours[:n, :, :16], jax_ref[:n, :, :16], jnp.float32)
        assert not np.any(ours[n:])


def test_tpu_kernel_interpreter_still_cannot_run_it():
    """The real TPU kernel cannot run under jax 0.11.2's Pallas TPU interpreter (it does not implement the ref
    reshape the kernel applies to its K/V buffer), which is why the TPU path is checked through the emulated
    stand-in and by lowering for a TPU. This pins that limit: when a jax upgrade lifts it, this fails, and the
    kernel should then be compared with the reference here."""
    inputs = _step(np.random.default_rng(2), rows=[(5, 1), (0, 7)], hd=128)
    with pytest.raises(Exception, match="ReshapeTransform"):
        _run("tpu_interpret", *inputs)


def _abstract_mesh(kind: str, platform: str):
    from jax._src import mesh as mesh_lib  # AbstractDevice: not exported yet in jax 0.11.2

    device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=1 if platform == "tpu" else None, platform=platform)
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def _lowered(backend, platform, kind, heads, kv_heads, hd, dtype=jnp.bfloat16, tokens=64, pages=64):
    policy = ShapePolicy(16, 1024, max_rows=32, max_prefill_rows=4, max_pages=pages, max_tokens=tokens)
    batch = padding_batch(policy, tokens, pages, prefill=True)
    backend = AttentionBackend(backend)
    shape, _ = layout.array_shape(backend.layout, 1024, 16, kv_heads, hd)
    kv = tuple(jax.ShapeDtypeStruct(shape, dtype) for _ in range(layout.num_arrays(backend.layout)))
    s = jax.ShapeDtypeStruct
    f = jax.jit(lambda b, q, k, v, kv: paged_attention(backend, q, write_kv(backend, kv, k, v, b.cache_slots), b,
                                                       None))
    with jax.sharding.use_abstract_mesh(_abstract_mesh(kind, platform)):
        traced = f.trace(jax.tree.map(lambda x: s(x.shape, x.dtype), batch), s((tokens, heads, hd), dtype),
                         s((tokens, kv_heads, hd), dtype), s((tokens, kv_heads, hd), dtype), kv)
        return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("heads,kv_heads,hd", [(32, 8, 128), (8, 1, 64), (4, 2, 16)],
                         ids=["mixtral", "hd64_tp8", "tiny"])
def test_tpu_path_lowers_for_tpu(heads, kv_heads, hd):
    """Metadata + the Mosaic kernel lower for a TPU (v5e) from this CPU machine (head_dim < 128 padded)."""
    assert "tpu_custom_call" in _lowered("tpu", "tpu", "TPU v5 lite", heads, kv_heads, hd)


def test_gpu_path_lowers_for_gpu():
    """The decode kernel lowers through Triton for an H200 (not run: no GPU here)."""
    assert "__gpu$xla.gpu.triton" in _lowered("gpu", "cuda", "NVIDIA H200", 32, 8, 128)


def test_kernel_splits_divide_pages():
    for pages in (4, 8, 12, 64, 1024, 100):
        splits, per_block = kernel_splits(pages)
        assert pages % (splits * per_block) == 0 and per_block & (per_block - 1) == 0, pages


MODEL = "qwen3-moe-fused"


@pytest.mark.parametrize("backend,mesh", [("tpu_emulated", "tp2"), ("gpu_interpret", None)])
def test_engine_greedy_matches_reference(backend, mesh):
    """Greedy tokens through the engine with a kernel backend equal the reference backend's (the recorded HF
    tokens, which the reference reproduces: tests/test_parity_hf.py). Several pages per sequence, a prompt longer
    than the 16-token step prefilled in two chunks, mixed adapters; the TPU layout split over TP."""
    from infinilora_jax.models.attention import use_backend

    ref, names = reference(MODEL), list(adapter_dirs(MODEL))
    with use_backend(backend):
        llm = LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", mesh=mesh,
                  max_num_batched_tokens=16, max_num_seqs=4, page_size=8, progress=False)
    assert llm.runner.model.attention is AttentionBackend(backend)
    jobs = [(0, "base"), (1, names[0]), (2, "base")]
    outs = llm.generate([ref[f"prompt_{i}"].tolist() for i, _ in jobs],
                        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                        adapter=[None if v == "base" else v for _, v in jobs])
    for (i, v), out in zip(jobs, outs):
        assert out.token_ids == ref[f"greedy__{v}__{i}"].tolist()[:5], (backend, i, v)


def test_backend_selection(monkeypatch):
    from infinilora_jax.models.attention import select_backend, use_backend
    from infinilora_jax.models.attention.gpu import unsupported_shape

    monkeypatch.delenv("INFINILORA_ATTENTION", raising=False)
    assert select_backend(platform="tpu") is AttentionBackend.TPU
    assert select_backend(platform="gpu") is AttentionBackend.GPU
    assert select_backend(platform="cpu") is AttentionBackend.REFERENCE
    assert select_backend() is AttentionBackend.REFERENCE  # CPU
    monkeypatch.setenv("INFINILORA_ATTENTION", "gpu")
    assert select_backend(platform="gpu") is AttentionBackend.GPU
    with use_backend("tpu_emulated"):
        assert select_backend(platform="gpu") is AttentionBackend.TPU_EMULATED
        assert select_backend("gpu") is AttentionBackend.GPU
    assert unsupported_shape(128, 16, 64) is None
    assert unsupported_shape(96, 16, 64) and unsupported_shape(128, 4, 4) is None and unsupported_shape(128, 2, 4)
