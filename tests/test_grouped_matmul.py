"""Expert GEMM implementations (models/grouped_matmul.py) against jax.lax.ragged_dot, the selection API, and the
tiny MoE model's logits with the "capacity" implementation. The Mosaic GPU kernel is checked here through the
Mosaic GPU interpreter ("mgpu_interpret") and by lowering it for CUDA; benchmarks/expert_gemm.py checks and
times it on the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import model_dir, reference, rel_err

from infinilora_jax.models import grouped_matmul as gm

HIGHEST = jax.lax.Precision.HIGHEST
BF16 = jnp.bfloat16


def _sizes(rng, m: int, g: int, zeros=(), total=None) -> np.ndarray:
    """Random group sizes summing to `total` (default m), with the groups in `zeros` empty."""
    p = rng.dirichlet(np.ones(g))
    p[list(zeros)] = 0
    return rng.multinomial(m if total is None else total, p / p.sum()).astype(np.int32)


def _operands(rng, m, k, n, g, dtype=jnp.float32):
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), dtype)
    return x, w


def _ragged(x, w, sizes, **kw):
    return np.asarray(jax.lax.ragged_dot(x, w, jnp.asarray(sizes), preferred_element_type=jnp.float32, **kw))


SIZE_CASES = {  # name -> (M, G, sizes(rng)): M is a multiple of nothing useful where it can be
    "random_with_empty": (77, 6, lambda r: _sizes(r, 77, 6, zeros=(1, 4))),
    "all_rows_one_group": (53, 5, lambda r: np.array([0, 0, 53, 0, 0], np.int32)),
    "last_group_empty": (91, 4, lambda r: _sizes(r, 91, 4, zeros=(3,))),
    "empty_groups_first": (67, 7, lambda r: _sizes(r, 67, 7, zeros=(0, 1, 2))),
    "one_row": (1, 3, lambda r: np.array([0, 1, 0], np.int32)),
    "rows_past_sum": (45, 4, lambda r: _sizes(r, 45, 4, total=31)),  # 14 padding rows, outside every group
}


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_capacity_equals_ragged_dot_float32(rng, case):
    m, g, make = SIZE_CASES[case]
    sizes = make(rng)
    x, w = _operands(rng, m, 40, 24, g)
    got = np.asarray(gm.grouped_matmul(x, w, jnp.asarray(sizes), precision=HIGHEST, implementation="capacity"))
    want = _ragged(x, w, sizes, precision=HIGHEST)
    assert got.dtype == np.float32 and got.shape == (m, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    total = int(sizes.sum())
    assert np.all(got[total:] == 0) and np.all(want[total:] == 0)  # both give zeros past sum(group_sizes)


def test_capacity_bfloat16_within_rounding(rng):
    m, g = 150, 9
    sizes = _sizes(rng, m, g, zeros=(0, 5))
    x, w = _operands(rng, m, 64, 48, g, jnp.bfloat16)
    exact = _ragged(x.astype(jnp.float32), w.astype(jnp.float32), sizes, precision=HIGHEST)
    # float32 output: bf16 products are exact in float32, so only the summation order differs
    got32 = np.asarray(gm.grouped_matmul(x, w, jnp.asarray(sizes), implementation="capacity"))
    np.testing.assert_allclose(got32, exact, rtol=1e-5, atol=1e-5)
    # bf16 output (as the model casts it): one rounding, within half a bf16 ulp (2^-9 relative) of the exact
    got16 = gm.grouped_matmul(x, w, jnp.asarray(sizes), preferred_element_type=None, implementation="capacity")
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16, np.float32), exact, rtol=2.0 ** -8, atol=1e-6)


def test_capacity_under_jit_chooses_rung_at_run_time(rng):
    """One compiled program, group sizes whose largest group sits at, just above and far above ladder rungs
    (up to every row in one group: the top rung M): every result exact."""
    m, g = 100, 5
    x, w = _operands(rng, m, 32, 16, g)
    calls = []

    def f(x, w, sizes):
        calls.append(1)
        return gm.grouped_matmul(x, w, sizes, precision=HIGHEST, implementation="capacity")

    run = jax.jit(f)
    for sizes in ([16, 16, 16, 16, 16], [17, 16, 16, 16, 15], [8, 0, 24, 0, 60], [0, 0, 0, 0, 100],
                  [100, 0, 0, 0, 0], [3, 1, 0, 2, 0], [0, 0, 0, 0, 0]):
        sizes = np.asarray(sizes, np.int32)
        np.testing.assert_allclose(np.asarray(run(x, w, jnp.asarray(sizes))),
                                   _ragged(x, w, sizes, precision=HIGHEST), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


@pytest.mark.parametrize("m", [1, 7, 8, 9, 100, 4096])
def test_capacity_ladder(m):
    ladder = gm.capacity_ladder(m)
    assert ladder[-1] == m and ladder == sorted(set(ladder))
    assert all(b <= 1.5 * a for a, b in zip(ladder, ladder[1:-1]))  # each step at most 1.5x
    assert ladder[0] == min(m, 8)


def test_mgpu_kernel_in_interpreter(rng):
    """The Mosaic GPU kernel's wrapper (rows padded to block_m, block_k/block_n shrunk to divide K and N, rows
    past the sum zeroed: the kernel leaves them unwritten, NaN in the interpreter) on unaligned M, empty groups."""
    m, g = 77, 5
    sizes = _sizes(rng, m, g, zeros=(0, 3), total=70)
    x, w = _operands(rng, m, 48, 192, g, jnp.bfloat16)
    got = np.asarray(jax.jit(lambda x, w, s: gm.grouped_matmul(x, w, s, implementation="mgpu_interpret"))(
        x, w, jnp.asarray(sizes)))
    exact = _ragged(x.astype(jnp.float32), w.astype(jnp.float32), sizes, precision=HIGHEST)
    assert np.all(got[70:] == 0)
    # the kernel rounds its float32 accumulator to bf16 once
    np.testing.assert_allclose(got, exact, rtol=2.0 ** -8, atol=1e-6)


@pytest.mark.parametrize("m,k,n,g", [(512, 2048, 1536, 128), (65536, 768, 2048, 128),  # Qwen3-30B-A3B
                                     (128, 4096, 28672, 8), (16384, 14336, 4096, 8),  # Mixtral-8x7B
                                     (77, 96, 192, 16)])  # rows padded to the tile, K = 768 / tp 8
def test_mgpu_kernel_lowers_for_cuda(m, k, n, g):
    """The benchmark's shapes pass Pallas -> Mosaic GPU lowering (tiling, TMA strides and boxes); only SMEM
    sizes and PTX are left to the GPU."""
    args = (jax.ShapeDtypeStruct((m, k), BF16), jax.ShapeDtypeStruct((g, k, n), BF16),
            jax.ShapeDtypeStruct((g,), jnp.int32))
    text = jax.jit(gm.mgpu_grouped_matmul).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_mgpu_kernel_built_once_per_program_whatever_the_depth():
    """Every layer's expert GEMM of one shape reaches the program as one Mosaic GPU kernel: inlined, each call
    was a module of its own (jax numbers them, so their hashes differ) and Mosaic GPU lowered and compiled each
    one apart, which made start-up grow with depth (benchmarks/compile_time.py)."""
    def layers(n):
        def step(x, w, sizes):
            for _ in range(n):
                x = x + gm.IMPLEMENTATIONS["mgpu"](x, w, sizes, out_dtype=BF16, precision=None)  # GPU-only
            return x
        return step

    args = (jax.ShapeDtypeStruct((256, 128), BF16), jax.ShapeDtypeStruct((8, 128, 128), BF16),
            jax.ShapeDtypeStruct((8,), jnp.int32))
    for depth in (1, 4):
        text = jax.jit(layers(depth)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @mosaic_gpu_v2") == 1, depth
        assert text.count(" = call @mgpu_grouped_matmul(") == depth


def test_mgpu_falls_back_on_float32_with_a_warning(rng):
    sizes = _sizes(rng, 20, 3)
    x, w = _operands(rng, 20, 16, 64, 3)
    with pytest.warns(gm.ExpertGemmFallback, match="bf16 or f16"):
        got = gm.grouped_matmul(x, w, jnp.asarray(sizes), precision=HIGHEST, implementation="mgpu_interpret")
    np.testing.assert_array_equal(np.asarray(got), _ragged(x, w, sizes, precision=HIGHEST))


# ------------------------------------------------------------------------------------------------- selection


def _spy(monkeypatch, name):
    calls = []
    real = gm.IMPLEMENTATIONS[name]
    monkeypatch.setitem(gm.IMPLEMENTATIONS, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    return calls


def test_default_is_auto_which_is_ragged_dot_off_gpu(monkeypatch):
    monkeypatch.delenv(gm.ENV_VAR, raising=False)
    calls = _spy(monkeypatch, "ragged_dot")
    gm.grouped_matmul(jnp.ones((4, 64), BF16), jnp.ones((2, 64, 64), BF16), jnp.asarray([2, 2]))
    assert gm.selected() == "auto" and calls == ["ragged_dot"]


def test_auto_takes_mgpu_on_gpu_where_it_fits(monkeypatch, recwarn):
    """On a GPU backend, auto picks the Mosaic GPU kernel for aligned 16-bit operands and ragged_dot, silently,
    for the rest (float32 parity runs, unaligned widths)."""
    monkeypatch.delenv(gm.ENV_VAR, raising=False)
    calls = []
    for name in ("mgpu", "ragged_dot"):
        monkeypatch.setitem(gm.IMPLEMENTATIONS, name, lambda r, w, s, *, out_dtype, precision, name=name:
                            calls.append(name) or jnp.zeros((r.shape[0], w.shape[2]), out_dtype))
    monkeypatch.setattr(gm.jax, "default_backend", lambda: "gpu")
    sizes = jnp.asarray([2, 2])
    gm.grouped_matmul(jnp.ones((4, 64), BF16), jnp.ones((2, 64, 128), BF16), sizes)
    gm.grouped_matmul(jnp.ones((4, 64), jnp.float32), jnp.ones((2, 64, 128), jnp.float32), sizes)
    gm.grouped_matmul(jnp.ones((4, 64), BF16), jnp.ones((2, 64, 96), BF16), sizes)  # N not a multiple of 64
    assert calls == ["mgpu", "ragged_dot", "ragged_dot"]
    assert not [w for w in recwarn if issubclass(w.category, gm.ExpertGemmFallback)]


def test_context_manager_env_var_and_argument_precedence(monkeypatch):
    monkeypatch.delenv(gm.ENV_VAR, raising=False)
    calls = _spy(monkeypatch, "capacity")
    with gm.use_expert_gemm("capacity"):
        gm.grouped_matmul(jnp.ones((4, 8)), jnp.ones((2, 8, 8)), jnp.asarray([2, 2]))
        with gm.use_expert_gemm("ragged_dot"):
            assert gm.selected() == "ragged_dot"
        assert gm.selected() == "capacity"
        assert gm.selected("ragged_dot") == "ragged_dot"  # an explicit argument wins
    assert calls == ["capacity"] and gm.selected() == "auto"
    monkeypatch.setenv(gm.ENV_VAR, "capacity")
    assert gm.selected() == "capacity"
    with gm.use_expert_gemm("ragged_dot"):  # the context wins over the environment
        assert gm.selected() == "ragged_dot"


def test_unknown_names_raise_listing_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="valid: auto, ragged_dot, mgpu, mgpu_interpret, capacity"):
        with gm.use_expert_gemm("dense"):
            pass
    monkeypatch.setenv(gm.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="'cutlass'"):
        gm.grouped_matmul(jnp.ones((4, 8)), jnp.ones((2, 8, 8)), jnp.asarray([2, 2]))


@pytest.mark.parametrize("name", gm.GPU_ONLY)
def test_gpu_only_implementations_raise_on_cpu_at_trace_time(monkeypatch, name):
    monkeypatch.delenv(gm.ENV_VAR, raising=False)
    with gm.use_expert_gemm(name), pytest.raises(RuntimeError, match=f"'{name}' runs on GPU only"):
        jax.jit(gm.grouped_matmul).trace(jnp.ones((4, 8), jnp.bfloat16), jnp.ones((2, 8, 64), jnp.bfloat16),
                                         jnp.asarray([2, 2]))


# ------------------------------------------------------------------------------------------------- model


def test_tiny_moe_model_logits_with_capacity(monkeypatch):
    """The bundled tiny Qwen3-MoE gives the same float32 logits with "capacity" as with the default (and the
    re-traced program really used it)."""
    from infinilora_jax import LLM

    monkeypatch.delenv(gm.ENV_VAR, raising=False)
    model = "qwen3-moe-fused"
    tokens = np.concatenate([reference(model)[f"prompt_{i}"] for i in range(3)]).tolist()
    prompts = [tokens[:16], tokens[-32:]]  # whole chunks: no padding rows, so every expert row is a real one
    llm = LLM(model_dir(model), dtype="float32", progress=False)
    default = [llm.logits(p) for p in prompts]
    calls = _spy(monkeypatch, "capacity")
    jax.clear_caches()  # the step programs were traced with the default; trace them again
    with gm.use_expert_gemm("capacity"):
        ours = [llm.logits(p) for p in prompts]
    assert calls, "the capacity implementation was not traced"
    for got, want in zip(ours, default):
        assert rel_err(got, want) < 1e-5
