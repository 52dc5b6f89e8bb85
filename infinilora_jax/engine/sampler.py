"""Token sampling on the device, inside the jitted step: greedy, temperature, top-k, top-p, per-request seeds.

Each row's random stream depends only on its request's seed and the index of the token being sampled, so a
request samples the same tokens whatever else shares its batch. Logprobs (the sampled token's and the top
MAX_LOGPROBS) are those of the model's distribution, before temperature and top-k/top-p, as vLLM reports them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infinilora_jax.sampling import MAX_LOGPROBS, SamplingParams

GREEDY, PLAIN, FILTERED = 0, 1, 2  # the sampler's work: argmax only, a tempered draw, top-k / top-p filtering


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    temperature: jax.Array  # [M] float32; 0 = greedy
    top_k: jax.Array  # [M] int32; 0 = off
    top_p: jax.Array  # [M] float32; 1 = off
    seeds: jax.Array  # [M] uint32 per-request seed
    counters: jax.Array  # [M] int32 index of the token being sampled (its output position)
    logprobs: jax.Array  # [M] bool the row asks for logprobs

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], counters: list[int], rows: int) -> SamplingArrays:
        """Per-row arrays padded to `rows` (padding rows sample greedily and are ignored)."""
        def fill(values, dtype, pad):
            out = np.full(rows, pad, dtype)
            out[: len(values)] = values
            return out

        return SamplingArrays(
            temperature=fill([p.temperature for p in params], np.float32, 0.0),
            top_k=fill([max(p.top_k, 0) for p in params], np.int32, 0),
            top_p=fill([p.top_p for p in params], np.float32, 1.0),
            seeds=fill([s & 0xFFFFFFFF for s in seeds], np.uint32, 0),
            counters=fill(counters, np.int32, 0),
            logprobs=fill([p.logprobs is not None for p in params], np.bool_, False))

    def work(self) -> int:
        """The sampler work these (host) rows need: what `sample` would pick on the device."""
        random_rows = np.asarray(self.temperature) > 0
        if np.any(random_rows & ((np.asarray(self.top_k) > 0) | (np.asarray(self.top_p) < 1))):
            return FILTERED
        return PLAIN if random_rows.any() else GREEDY

    @property
    def wants_logprobs(self) -> bool:
        return bool(np.any(self.logprobs))


def sample(logits: jax.Array, s: SamplingArrays, vocab_size: int, work: int | None = None) -> jax.Array:
    """logits: [M, V_padded] float32 -> sampled token ids [M] int32.

    The work: argmax only when every row is greedy (the common decode batch pays for no random draws over the
    vocabulary), a draw from the tempered distribution when some row samples, and the top-k / top-p filter (a
    sort over the vocabulary) only when some row asks for it. `work` None: a branch taken on the device picks
    it, so one compiled program serves every mix of sampling parameters; else the caller picked it on the host
    (`SamplingArrays.work`) and the program holds that path alone: XLA:GPU reads a branch's predicate back to the host,
    which blocks the dispatching thread until the device reaches the branch (docs/architecture/04-engine.md).
    """
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda seed, c: jax.random.fold_in(jax.random.key(seed), c))(s.seeds, s.counters)

    def scaled(logits):
        return logits / jnp.maximum(s.temperature, 1e-6)[:, None]

    def filtered(logits):
        x = scaled(logits)
        order = jnp.argsort(-x, axis=-1)
        ranked = jnp.take_along_axis(x, order, axis=-1)
        rank = jnp.arange(ranked.shape[-1])[None, :]
        keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
        probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < s.top_p[:, None]  # smallest prefix reaching top_p
        keep = keep.at[:, 0].set(True)
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, ranked, -jnp.inf))
        chosen = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        # rows that filter nothing draw as `plain` does: a row's token must not depend on its batch-mates' settings
        return jnp.where(filters, chosen, plain(logits))

    def plain(logits):
        return jax.vmap(jax.random.categorical)(keys, scaled(logits)).astype(jnp.int32)

    random_rows = s.temperature > 0
    filters = (s.top_k > 0) | (s.top_p < 1)
    paths = [lambda logits: greedy, plain, filtered]
    if work is None:
        work = jnp.where(jnp.any(random_rows & filters), FILTERED, jnp.any(random_rows).astype(jnp.int32))
        sampled = jax.lax.switch(work, paths, logits)
    elif work == GREEDY:
        return greedy
    else:
        sampled = paths[work](logits)
    return jnp.where(random_rows, sampled, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, wanted: jax.Array, vocab_size: int,
                   compute_them: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits: [M, V_padded] float32, tokens: [M] int32, wanted: [M] bool ->
    (logprob of each token [M] float32, top ids [M, K] int32, top logprobs [M, K] float32), K = min(20, vocab).

    Computed only when some row wants them (a branch on the device, so one compiled program serves every mix);
    zeros otherwise. `compute_them` True / False: the caller decided on the host (no branch; see `sample`).
    """
    k = min(MAX_LOGPROBS, vocab_size)
    m = logits.shape[0]

    def compute(logits):
        logp = jax.nn.log_softmax(jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf), axis=-1)
        chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
        top_logp, top_ids = jax.lax.top_k(logp, k)
        return chosen, top_ids.astype(jnp.int32), top_logp

    def skip(logits):
        return jnp.zeros(m, jnp.float32), jnp.zeros((m, k), jnp.int32), jnp.zeros((m, k), jnp.float32)

    logits = logits.astype(jnp.float32)
    if compute_them is not None:
        return compute(logits) if compute_them else skip(logits)
    return jax.lax.cond(jnp.any(wanted), compute, skip, logits)
