"""The device-initiated push (infinilora_jax/disagg/push.py) against XLA's ppermute, on 8 CPU devices.

  * numerics: the TPU kernel (`pltpu.make_async_remote_copy` + barrier semaphore) runs in the Pallas TPU
    interpreter, which simulates every device's buffers, the remote DMAs and the semaphores; under shard_map its
    output equals `jax.lax.ppermute`'s, bit for bit, for one-directional pushes (devices that neither send nor
    receive get zeros), swaps, cycles, and to_lora / to_base's fan-in / fan-out over (role, dp);
  * GPU: the Mosaic GPU kernel (TMA stores into `plgpu.remote_ref` of the peer's output + `semaphore_signal`)
    is lowered for CUDA on CPU (Pallas -> Mosaic GPU); jax has no interpreter for its peer-memory refs, so its
    numerics, and the symmetric-memory allocation, need a GPU;
  * selection: INFINILORA_EXCHANGE / exchange_impl_override, ppermute by default.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from infinilora_jax.disagg import exchange
from infinilora_jax.disagg import push as push_mod
from infinilora_jax.disagg.push import exchange_impl, exchange_impl_override, push
from meshes.axes import DP, ROLE, ROLE_AXES
from meshes.layouts import ROLE_LAYOUTS, make_role_mesh

GRID = ("a", "b")


def _grid_mesh():
    return jax.make_mesh((2, 4), GRID, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _both(mesh, axes, pairs, x, kernel="tpu_interpret"):
    """(push, ppermute) of each device's block of x (leading dim: one block per device) inside shard_map."""
    all_axes = tuple(mesh.axis_names)

    def local(xb):
        return (push(xb[0], pairs, axes, kernel=kernel)[None],
                jax.lax.ppermute(xb[0], axes, perm=pairs)[None])

    fn = jax.shard_map(local, mesh=mesh, in_specs=P(all_axes), out_specs=(P(all_axes), P(all_axes)),
                       check_vma=False)
    return jax.jit(fn)(x)


def _random(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("axes,pairs", [
    ("b", [(0, 3)]),                                # one push: devices 1, 2 neither send nor receive
    ("b", [(1, 2), (2, 1)]),                        # swap
    ("b", [(0, 1), (1, 2), (2, 3), (3, 0)]),        # cycle
    (GRID, [(0, 5), (6, 1), (3, 3)]),               # over both axes, one device to itself
], ids=["one_way", "swap", "cycle", "both_axes"])
def test_push_equals_ppermute_grid(axes, pairs, dtype):
    mesh = _grid_mesh()
    for seed in range(2):
        x = _random(seed, (8, 16, 128), dtype)
        got, want = _both(mesh, axes, pairs, x)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.abs(np.asarray(want, np.float32)).sum() > 0


def test_push_has_no_races_in_the_interpreter():
    """jax's happens-before race detector over the simulated buffers, DMAs and semaphores finds no race, for
    a swap plus a one-way push plus a device sending to itself (sender and receiver roles on one device)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interp

    mesh = _grid_mesh()
    pairs = [(0, 5), (5, 0), (6, 1), (3, 3)]

    def local(xb):
        return push(xb[0], pairs, GRID, kernel="tpu_interpret",
                    interpret_params=pltpu.InterpretParams(detect_races=True))[None]

    x = _random(0, (8, 16, 128), jnp.float32)
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(GRID), out_specs=P(GRID), check_vma=False))
    got = fn(x)
    assert tpu_interp.races is not None and not tpu_interp.races.races_found
    want = np.zeros_like(np.asarray(x))
    for s, d in pairs:
        want[d] = np.asarray(x)[s]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_push_equals_ppermute_role_mesh(dtype):
    """The disaggregated 4+4 mesh (role 2 x dp 2 x pp 1 x ep 2 x tp 1): to_lora's fan-in (base instance d ->
    LoRA stage s, one push per instance) and to_base's reply, over (role, dp) at every ep coordinate."""
    mesh = make_role_mesh(ROLE_LAYOUTS["4+4"])
    dp = 2
    patterns = [[(d, dp + s)] for s in range(dp) for d in range(dp)]  # to_lora
    patterns += [[(dp + s, d)] for s in range(dp) for d in range(dp)]  # to_base
    patterns.append([(0, 2), (1, 3), (2, 0), (3, 1)])  # both instances with their stage, both ways
    for i, pairs in enumerate(patterns):
        x = _random(i, (8, 8, 256), dtype)
        got, want = _both(mesh, (ROLE, DP), pairs, x)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=str(pairs))


def test_exchange_to_lora_to_base_with_push():
    """exchange.to_lora / to_base on a pytree of two dtypes: push_interpret gives what ppermute gives."""
    mesh = make_role_mesh(ROLE_LAYOUTS["4+4"])
    dp, stage = 2, 1
    spec = P(ROLE_AXES)

    def local(h, g):
        tree = {"h": h[0], "g": g[0]}
        inst = jax.lax.axis_index(DP)
        got = exchange.to_lora(tree, stage, dp)
        back = exchange.to_base(jax.tree.map(lambda a: a * 2, got), stage, dp, inst)
        return jax.tree.map(lambda a: a[None], (got, back))

    # the implementation is read at trace time: each function below is traced afresh (jit caches by function)
    sm = lambda: jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    h, g = _random(0, (8, 4, 128), jnp.float32), _random(1, (8, 4, 128), jnp.bfloat16)
    want = jax.jit(sm())(h, g)
    default_jaxpr = str(jax.make_jaxpr(sm())(h, g))
    with exchange_impl_override("push_interpret"):
        push_jaxpr = str(jax.make_jaxpr(sm())(h, g))
        got = jax.jit(sm())(h, g)
    assert "pallas_call" in push_jaxpr and "ppermute" not in push_jaxpr
    assert "ppermute" in default_jaxpr and "pallas_call" not in default_jaxpr
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.abs(np.asarray(want[0]["h"])).sum() > 0 and np.abs(np.asarray(want[1]["h"])).sum() > 0


def test_default_exchange_lowers_as_plain_ppermute(monkeypatch):
    """By default to_lora / to_base lower to exactly the program of the tree ppermutes they were before push.py
    (same StableHLO text as the formulas written out here)."""
    monkeypatch.delenv(push_mod.ENV_VAR, raising=False)
    mesh = make_role_mesh(ROLE_LAYOUTS["4+4"])
    dp, stage, spec = 2, 0, P(ROLE_AXES)

    def ours(h, g):
        tree = {"h": h[0], "g": g[0]}
        got = exchange.to_lora(tree, stage, dp)
        back = exchange.to_base(got, stage, dp, jax.lax.axis_index(DP))
        return jax.tree.map(lambda a: a[None], (got, back))

    def plain(h, g):
        tree = {"h": h[0], "g": g[0]}
        got = [jax.lax.ppermute(tree, (ROLE, DP), perm=[(d, dp + stage)]) for d in range(dp)]
        got = jax.tree.map(lambda *xs: jnp.stack(xs), *got)
        inst = jax.lax.axis_index(DP)
        back = [jax.lax.ppermute(jax.tree.map(lambda a, d=d: a[d], got), (ROLE, DP), perm=[(dp + stage, d)])
                for d in range(dp)]
        back = jax.tree.map(lambda *xs: jnp.stack(xs)[inst], *back)
        return jax.tree.map(lambda a: a[None], (got, back))

    args = (jax.ShapeDtypeStruct((8, 4, 128), jnp.float32), jax.ShapeDtypeStruct((8, 4, 128), jnp.bfloat16))

    def text(local):
        fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
        return jax.jit(fn).trace(*args).lower().as_text().split("\n", 1)[1]  # minus the module name line

    assert text(ours) == text(plain)


def _lower_gpu_push(shape, dtype, pairs=((0, 2), (1, 3))):
    mesh = make_role_mesh(ROLE_LAYOUTS["4+4"])
    spec = P(ROLE_AXES)

    def local(x):
        return push(x[0], list(pairs), (ROLE, DP), kernel="gpu")[None]

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    return fn.trace(jax.ShapeDtypeStruct((8, *shape), dtype)).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape,dtype", [
    ((64, 256), jnp.float32), ((64, 4096), jnp.bfloat16),  # row tiles x 256-column tiles (TMA box <= 256)
    ((37, 256), jnp.bfloat16), ((1, 512), jnp.float32), ((3, 5, 128), jnp.bfloat16), ((256,), jnp.int32),
    ((5, 6), jnp.bfloat16), ((2, 3), jnp.float32),  # rows of 12 bytes: flattened and padded (16-byte strides)
])
def test_gpu_push_lowers_for_cuda(shape, dtype):
    """Pallas -> Mosaic GPU lowering of the GPU push on the role mesh (one mosaic_gpu custom call per push).
    Before tiling columns and padding, this failed with "Async copies only support copying <=256 elements
    along each dimension" and "async_copy requires all GMEM strides except the last one to be a multiple of 16
    bytes". PTX compilation, symmetric memory and the run itself need GPUs."""
    assert _lower_gpu_push(shape, dtype).count("custom_call @mosaic_gpu") == 1


def test_selection(monkeypatch):
    monkeypatch.delenv(push_mod.ENV_VAR, raising=False)
    assert exchange_impl() == "ppermute"
    monkeypatch.setenv(push_mod.ENV_VAR, "push_interpret")
    assert exchange_impl() == "push_interpret"
    with exchange_impl_override("ppermute"):
        assert exchange_impl() == "ppermute"
        with exchange_impl_override("push"):
            assert exchange_impl() == "push"
        assert exchange_impl() == "ppermute"
    assert exchange_impl() == "push_interpret"
    monkeypatch.setenv(push_mod.ENV_VAR, "nccl")
    with pytest.raises(ValueError, match="unknown exchange implementation 'nccl'.*ppermute, push, push_interpret"):
        exchange_impl()
    with pytest.raises(ValueError, match="unknown exchange implementation 'rdma'"):
        with exchange_impl_override("rdma"):
            pass
    with pytest.raises(ValueError, match="distinct sources"):
        push_mod._check_pairs([(0, 1), (0, 2)], 4)
    with pytest.raises(ValueError, match="out of range"):
        push_mod._check_pairs([(0, 4)], 4)


def test_push_on_cpu_backend_needs_interpret():
    """"push" picks the kernel of the backend; CPU has none: a clear error naming the alternatives."""
    mesh = _grid_mesh()
    with pytest.raises(ValueError, match="no kernel for backend 'cpu'.*push_interpret"):
        _both(mesh, "b", [(0, 1)], jnp.zeros((8, 8, 128)), kernel=None)


def test_disaggregated_llm_logits_identical_with_push(monkeypatch):
    """End to end, 4+4 (two base instances of ep2 | a LoRA server of pp2 x ep2): every per-layer exchange of
    the jitted step through the interpreted push gives float32 logits identical to the ppermute step's; and the
    GPU push lowers for CUDA at every (shape, dtype) the step exchanges."""
    from conftest import adapter_dirs, model_dir, reference

    from infinilora_jax import LLM

    model = "qwen3-moe-fused"
    prompt, adapter = reference(model)["prompt_0"].tolist(), "all-linear-r4"
    calls = []
    real_push = push_mod.push

    def counting_push(x, *a, **k):
        calls.append((k.get("kernel"), x.shape, jnp.dtype(x.dtype).name))
        return real_push(x, *a, **k)

    monkeypatch.setattr(push_mod, "push", counting_push)

    def logits():
        llm = LLM(model_dir(model), adapters=adapter_dirs(model), dtype="float32", mesh="4+4",
                  mode="disaggregated", max_model_len=32, max_num_seqs=2, num_pages=64, progress=False)
        return np.asarray(llm.logits(prompt, adapter))

    monkeypatch.delenv(push_mod.ENV_VAR, raising=False)
    want = logits()
    assert not calls
    monkeypatch.setenv(push_mod.ENV_VAR, "push_interpret")
    got = logits()
    assert calls and {kernel for kernel, _, _ in calls} == {"tpu_interpret"}
    assert got.dtype == np.float32 and np.abs(want).sum() > 0
    np.testing.assert_array_equal(got, want)
    for shape, dtype in sorted({(shape, dtype) for _, shape, dtype in calls}):  # what the step exchanges
        assert _lower_gpu_push(shape, jnp.dtype(dtype)).count("custom_call @mosaic_gpu") == 1, (shape, dtype)
