"""The reference multi-LoRA math against a per-token loop written independently in numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from infinilora_jax.lora.reference import expert_lora_delta, lora_delta


def _pool(rng, slots, *shape):
    pool = rng.normal(size=(slots, *shape)).astype(np.float32)
    pool[0] = 0  # slot 0: no adapter
    return pool


@pytest.mark.parametrize("n,d_in,d_out,rank,slots", [(1, 8, 5, 1, 2), (13, 16, 24, 4, 5), (64, 32, 8, 16, 9)])
def test_dense_delta_matches_per_token_loop(rng, n, d_in, d_out, rank, slots):
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    tok_slots = rng.integers(0, slots, size=n).astype(np.int32)
    a, b = _pool(rng, slots, d_in, rank), _pool(rng, slots, rank, d_out)
    got = np.asarray(lora_delta(jnp.asarray(x), jnp.asarray(tok_slots), jnp.asarray(a), jnp.asarray(b)))
    want = np.stack([x[i] @ a[s] @ b[s] for i, s in enumerate(tok_slots)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[tok_slots == 0] == 0)


def test_dense_delta_multi_dim_output_and_rank_padding(rng):
    """B with several output dims; an adapter of rank 3 zero-padded to 8 gives the same delta as unpadded."""
    x = rng.normal(size=(6, 10)).astype(np.float32)
    a3, b3 = rng.normal(size=(10, 3)).astype(np.float32), rng.normal(size=(3, 2, 4)).astype(np.float32)
    a = np.zeros((2, 10, 8), np.float32)
    b = np.zeros((2, 8, 2, 4), np.float32)
    a[1, :, :3], b[1, :3] = a3, b3
    slots = np.array([1, 0, 1, 1, 0, 1], np.int32)
    got = np.asarray(lora_delta(jnp.asarray(x), jnp.asarray(slots), jnp.asarray(a), jnp.asarray(b)))
    want = np.einsum("ni,ir,rgo->ngo", x, a3, b3) * (slots == 1)[:, None, None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expert_delta_matches_per_row_loop(rng):
    m, d_in, d_out, rank, slots, experts = 40, 12, 7, 4, 4, 6
    x = rng.normal(size=(m, d_in)).astype(np.float32)
    row_slots = rng.integers(0, slots, size=m).astype(np.int32)
    row_experts = rng.integers(0, experts + 1, size=m).astype(np.int32)  # == experts: padding row
    a, b = _pool(rng, slots, experts, d_in, rank), _pool(rng, slots, experts, rank, d_out)
    got = np.asarray(expert_lora_delta(jnp.asarray(x), jnp.asarray(row_slots), jnp.asarray(row_experts),
                                       jnp.asarray(a), jnp.asarray(b)))
    want = np.stack([x[i] @ a[s, e] @ b[s, e] if e < experts else np.zeros(d_out)
                     for i, (s, e) in enumerate(zip(row_slots, row_experts))])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.any(got != 0)


def test_bf16_delta_close_to_float64(rng):
    x = rng.normal(size=(32, 64)).astype(np.float32)
    a, b = _pool(rng, 3, 64, 16), _pool(rng, 3, 16, 64)
    slots = rng.integers(1, 3, size=32).astype(np.int32)
    got = lora_delta(jnp.asarray(x, jnp.bfloat16), jnp.asarray(slots), jnp.asarray(a, jnp.bfloat16),
                     jnp.asarray(b, jnp.bfloat16))
    want = np.stack([x[i].astype(np.float64) @ a[s] @ b[s] for i, s in enumerate(slots)])
    assert np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want) < 2e-2


@pytest.mark.parametrize("form", ["einsum", "mulsum", "batched"])
def test_every_shrink_form_gives_the_same_deltas(rng, monkeypatch, form):
    """INFINILORA_LORA_SHRINK picks the shrink's form (for measuring on GPUs): dense and per-expert deltas on
    rank-major pages, float32 and bfloat16, match the per-row loop whichever it is; an unknown form is refused."""
    from infinilora_jax.errors import ConfigError
    from infinilora_jax.lora import reference

    monkeypatch.setenv(reference.SHRINK_ENV, form)
    m, d_in, d_out, rank, slots, experts = 24, 16, 9, 8, 3, 5
    x = rng.normal(size=(m, d_in)).astype(np.float32)
    row_slots = rng.integers(0, slots, size=m).astype(np.int32)
    row_experts = rng.integers(0, experts, size=m).astype(np.int32)
    a, b = _pool(rng, slots, experts, rank, d_in), _pool(rng, slots, experts, rank, d_out)  # A rank-major
    want = np.stack([x[i] @ a[s, e].T @ b[s, e] for i, (s, e) in enumerate(zip(row_slots, row_experts))])
    got = expert_lora_delta(jnp.asarray(x), jnp.asarray(row_slots), jnp.asarray(row_experts), jnp.asarray(a),
                            jnp.asarray(b), a_rank_major=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    dense = lora_delta(jnp.asarray(x, jnp.bfloat16), jnp.asarray(row_slots), jnp.asarray(a[:, 0], jnp.bfloat16),
                       jnp.asarray(b[:, 0], jnp.bfloat16), a_rank_major=True)
    want = np.stack([x[i] @ a[s, 0].T @ b[s, 0] for i, s in enumerate(row_slots)])
    assert dense.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dense), want, rtol=5e-2, atol=5e-2 * np.abs(want).max())
    monkeypatch.setenv(reference.SHRINK_ENV, "loop")
    with pytest.raises(ConfigError, match=reference.SHRINK_ENV):
        lora_delta(jnp.asarray(x), jnp.asarray(row_slots), jnp.asarray(a[:, 0]), jnp.asarray(b[:, 0]),
                   a_rank_major=True)
