"""Expert-parallel MoE (all-to-all dispatch, capacity packing, TP partial sums, per-expert LoRA) against a dense
numpy reference, for several EP x TP splits, token counts that do not divide by EP, and skewed routing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infinilora_jax.models.moe import moe_block
from meshes.axes import EP, TP
from meshes.layouts import MeshLayout, make_mesh

H, E, I, S, R = 16, 8, 12, 3, 4  # noqa: E741  (hidden, experts, intermediate, slots, rank)


def _reference(x, slots, router, w_gu, w_down, lora, top_k, normalize):
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    (a_gu, b_gu), (a_d, b_d) = lora["gate_up"], lora["down"]
    for n in range(x.shape[0]):
        top = np.argsort(-probs[n], kind="stable")[:top_k]
        w = probs[n, top] / (probs[n, top].sum() if normalize else 1.0)
        s = slots[n]
        for e, we in zip(top, w):
            lora_gu = x[n] @ a_gu[s, e].T @ b_gu[s, e].reshape(R, -1)  # A pages rank-major, as the pool keeps them
            gu = np.einsum("h,hgi->gi", x[n], w_gu[e]) + lora_gu.reshape(2, I)
            act = gu[0] / (1 + np.exp(-gu[0])) * gu[1]
            out[n] += we * (act @ w_down[e] + act @ a_d[s, e].T @ b_d[s, e])
    return out


@pytest.mark.parametrize("ep,tp,n", [(1, 1, 5), (2, 1, 7), (4, 2, 9), (8, 1, 3), (2, 2, 16)])
@pytest.mark.parametrize("top_k,normalize", [(2, True), (3, False)])
def test_moe_block_matches_dense_reference(rng, ep, tp, n, top_k, normalize):
    x = rng.normal(size=(n, H)).astype(np.float32)
    slots = rng.integers(0, S, size=n).astype(np.int32)
    router = rng.normal(size=(H, E)).astype(np.float32)
    w_gu = rng.normal(size=(E, H, 2, I)).astype(np.float32) * 0.3
    w_down = rng.normal(size=(E, I, H)).astype(np.float32) * 0.3
    lora = {"gate_up": (rng.normal(size=(S, E, R, H)).astype(np.float32) * 0.2,
                        rng.normal(size=(S, E, R, 2, I)).astype(np.float32) * 0.2),
            "down": (rng.normal(size=(S, E, R, I)).astype(np.float32) * 0.2,
                     rng.normal(size=(S, E, R, H)).astype(np.float32) * 0.2)}
    for pair in lora.values():
        for arr in pair:
            arr[0] = 0
    want = _reference(x, slots, router, w_gu, w_down, lora, top_k, normalize)

    mesh = make_mesh(MeshLayout("test", ep=ep, tp=tp))
    specs = (P(), P(), P(), P(EP, None, None, TP), P(EP, TP, None),
             {"gate_up": (P(None, EP), P(None, EP, None, None, TP)), "down": (P(None, EP, None, TP), P(None, EP))})
    fn = jax.shard_map(functools.partial(moe_block, top_k=top_k, normalize=normalize, ep=ep), mesh=mesh,
                       in_specs=specs, out_specs=P(), check_vma=False)
    got = jax.jit(fn)(*jax.tree.map(jnp.asarray, (x, slots, router, w_gu, w_down, lora)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_all_tokens_routed_to_one_device_drop_nothing(rng):
    """Every token picks experts 0 and 1 (both on EP rank 0): the capacity bound must hold them all."""
    ep, n, top_k = 4, 11, 2
    x = np.abs(rng.normal(size=(n, H))).astype(np.float32) + 0.1
    router = np.full((H, E), -5.0, np.float32)
    router[:, 0], router[:, 1] = 5.0, 4.0
    w_gu = rng.normal(size=(E, H, 2, I)).astype(np.float32) * 0.3
    w_down = rng.normal(size=(E, I, H)).astype(np.float32) * 0.3
    zeros = {"gate_up": (np.zeros((S, E, R, H), np.float32), np.zeros((S, E, R, 2, I), np.float32)),
             "down": (np.zeros((S, E, R, I), np.float32), np.zeros((S, E, R, H), np.float32))}
    slots = np.zeros(n, np.int32)
    want = _reference(x, slots, router, w_gu, w_down, zeros, top_k, True)
    mesh = make_mesh(MeshLayout("test", ep=ep))
    specs = (P(), P(), P(), P(EP), P(EP),
             {"gate_up": (P(None, EP), P(None, EP)), "down": (P(None, EP), P(None, EP))})
    fn = jax.shard_map(functools.partial(moe_block, top_k=top_k, normalize=True, ep=ep), mesh=mesh,
                       in_specs=specs, out_specs=P(), check_vma=False)
    got = jax.jit(fn)(*jax.tree.map(jnp.asarray, (x, slots, router, w_gu, w_down, zeros)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    assert np.abs(want).sum() > 0


def test_unsort_inverts_the_sort_exactly():
    from infinilora_jax.models.moe import sort_rows, unsort

    rng = np.random.default_rng(3)
    experts = jnp.asarray(rng.integers(0, 5, 37), jnp.int32)  # 4 local experts + padding id 4
    rows = jnp.asarray(rng.normal(size=(37, 6)), jnp.bfloat16)
    order, _ = sort_rows(experts, 4)
    np.testing.assert_array_equal(np.asarray(unsort(rows[order], order)), np.asarray(rows))


def test_sort_rows_by_expert_and_slot_keeps_each_page_contiguous():
    """With slots, each (expert, slot) pair's rows form one run (what the per-expert LoRA kernels take in place),
    experts stay in order with the same group sizes, padding rows last."""
    from infinilora_jax.models.moe import sort_rows

    rng = np.random.default_rng(5)
    experts = rng.integers(0, 5, 200).astype(np.int32)  # 4 local experts + padding id 4
    slots = rng.integers(0, 6, 200).astype(np.int32)
    order, sizes = sort_rows(jnp.asarray(experts), 4, jnp.asarray(slots), 6)
    order = np.asarray(order)
    pairs = list(zip(experts[order].tolist(), slots[order].tolist()))
    runs = [p for i, p in enumerate(pairs) if i == 0 or p != pairs[i - 1]]
    assert len(runs) == len(set(pairs)) and runs == sorted(runs)
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(experts, minlength=5)[:4])
    np.testing.assert_array_equal(np.sort(order), np.arange(200))


def test_moe_block_lora_through_gpu_kernels_in_place(rng):
    """The MoE block with per-expert LoRA through the Mosaic GPU kernels (interpreted), rows taken in place as
    the block sorts them by (expert, slot): the same output as the reference LoRA math, in bf16."""
    from pallas_kernels import dispatch

    h, e, inter, s, r, n, top_k = 64, 4, 64, 3, 16, 24, 2
    bf = jnp.bfloat16
    x = jnp.asarray(rng.normal(size=(n, h)), bf)
    slots = jnp.asarray(rng.integers(0, s, size=n), jnp.int32)
    router = jnp.asarray(rng.normal(size=(h, e)), bf)
    w_gu = jnp.asarray(rng.normal(size=(e, h, 2, inter)) * 0.2, bf)
    w_down = jnp.asarray(rng.normal(size=(e, inter, h)) * 0.2, bf)
    pages = lambda *shape: np.concatenate([np.zeros((1, *shape)), rng.normal(size=(s - 1, *shape)) * 0.2])
    lora = {"gate_up": (pages(e, r, h), pages(e, r, 2, inter)), "down": (pages(e, r, inter), pages(e, r, h))}
    lora = jax.tree.map(lambda v: jnp.asarray(v, bf), lora)
    mesh = make_mesh(MeshLayout("test", ep=1, tp=1))

    def run(lora):  # a fresh jit each time: the backend is chosen at trace time
        fn = jax.shard_map(functools.partial(moe_block, top_k=top_k, normalize=True, ep=1), mesh=mesh,
                           in_specs=P(), out_specs=P(), check_vma=False)
        return np.asarray(jax.jit(fn)(x, slots, router, w_gu, w_down, lora), np.float32)

    outs = {}
    for backend in ("reference", "gpu_interpret"):
        with dispatch.use_backend(backend):
            outs[backend] = run(lora)
    no_lora = run(None)
    want = outs["reference"]
    assert np.abs(want - no_lora).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(outs["gpu_interpret"], want, rtol=2e-2, atol=2e-2)
