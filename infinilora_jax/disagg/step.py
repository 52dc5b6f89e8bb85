"""The jitted disaggregated steps: one jit(shard_map) over the global role mesh per engine iteration.

Inputs: the role buffers (weights, which a LoRA device reads as page arenas, and KV blocks, donated), each base
instance's StepBatch stacked over `dp` (sharded over dp: instance d's devices see its batch), and the adapter
slots of every instance's tokens (replicated: the LoRA server serves all instances). The same step names as
models/step.py: `score`, `prompt_logprobs`, `sample`, `sample_loading` (layer-wise loading of one adapter into
the LoRA devices' pages while the step runs). `score` and `prompt_logprobs` return per instance ([dp, M, ...]);
the sampling steps return per device ([devices, ...], `base_rows` picks the instances' rows on the host), and
take a previous step's tokens as they left them (async scheduling, engine/engine.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from infinilora_jax.disagg.exchange import on
from infinilora_jax.disagg.model import DisaggModel, is_base_device
from infinilora_jax.disagg.roles import PER_DEVICE
from infinilora_jax.engine.sampler import SamplingArrays, sample, token_logprobs
from infinilora_jax.models.batch import StepBatch
from infinilora_jax.models.precompiled import PrecompiledSteps
from infinilora_jax.models.step import with_prev_tokens
from meshes.axes import BASE_ROLE, DP, MODEL_AXES


class DisaggStepFunctions(PrecompiledSteps):
    """weights: name -> role buffer (read; donated only by steps that write adapter pages); kv: name -> role
    buffer (donated by every step)."""

    def __init__(self, forward: DisaggModel, mesh: Mesh, weight_names: list[str], kv_names: list[str],
                 vocab_size: int):
        self.forward, self.mesh, self.vocab_size = forward, mesh, vocab_size
        self.layout = forward.layout
        self.has_pool = True
        super().__init__()
        w_specs = {n: PER_DEVICE for n in weight_names}
        kv_specs = {n: PER_DEVICE for n in kv_names}
        self.weight_names, self.kv_names = list(weight_names), list(kv_names)
        batch_specs = PartitionSpec(DP)  # every leaf [dp, ...]

        def local(weights, kv, batch, all_slots, load=None):
            logits, blocks = forward.forward({**weights, **kv}, batch, all_slots, load)
            return logits[None], {n: blocks[n] for n in weight_names}, {n: blocks[n] for n in kv_names}

        def local_plain(weights, kv, batch, all_slots):  # weights are read only
            logits, _, kv = local(weights, kv, jax.tree.map(lambda a: a[0], batch), all_slots)
            return logits, kv

        def local_sample(weights, kv, batch, all_slots, sampling, prev_tokens, token_src, load=None):
            # an instance's placeholder tokens come from its own devices' previous tokens (async scheduling)
            batch = with_prev_tokens(jax.tree.map(lambda a: a[0], batch), prev_tokens[0], token_src[0])
            logits, weights, kv = local(weights, kv, batch, all_slots, load)
            out = self._sample_on_base(logits[0], jax.tree.map(lambda a: a[0], sampling), prev_tokens.shape[1])
            return out, weights, kv

        def local_sample_plain(weights, kv, batch, all_slots, sampling, prev_tokens, token_src):  # weights read only
            out, _, kv = local_sample(weights, kv, batch, all_slots, sampling, prev_tokens, token_src)
            return out, kv

        self._forward = jax.shard_map(local_plain, mesh=mesh,
                                      in_specs=(w_specs, kv_specs, batch_specs, PartitionSpec()),
                                      out_specs=(PER_DEVICE, kv_specs), check_vma=False)
        sample_specs = (w_specs, kv_specs, batch_specs, PartitionSpec(), batch_specs, PER_DEVICE, batch_specs)
        self._forward_sample = jax.shard_map(local_sample_plain, mesh=mesh, in_specs=sample_specs,
                                             out_specs=(PER_DEVICE, kv_specs), check_vma=False)
        self._forward_sample_loading = jax.shard_map(
            lambda w, kv, b, s, sampling, prev, src, slot, pages: local_sample(w, kv, b, s, sampling, prev, src,
                                                                               (slot, pages)),
            mesh=mesh, in_specs=(*sample_specs, PartitionSpec(), PER_DEVICE),
            out_specs=(PER_DEVICE, w_specs, kv_specs), check_vma=False)
        self.jit_step("score", self._score, (1,))
        self.jit_step("sample", self._sample, (1,))
        self.jit_step("prompt_logprobs", self._prompt_logprobs, (1,))
        self.jit_step("sample_loading", self._sample_loading, (0, 1))

    def _logits(self, per_device: jax.Array) -> jax.Array:
        """[devices, M, V/ep] from the shard_map -> base instances' [dp, M, vocab] float32 logits."""
        lay = self.layout
        m, rows = per_device.shape[1:]
        grid = per_device.reshape(2, lay.dp, lay.ep, m, rows)[BASE_ROLE]  # [dp, ep, M, V/ep]
        return jnp.swapaxes(grid, 1, 2).reshape(lay.dp, m, lay.ep * rows)[:, :, : self.vocab_size]

    def _score(self, weights, kv, batch: StepBatch, all_slots):
        """-> (float32 logits [dp, M, vocab], kv)."""
        logits, kv = self._forward(weights, kv, batch, all_slots)
        return self._logits(logits), kv

    def _sample_on_base(self, logits: jax.Array, sampling: SamplingArrays, rows_out: int) -> tuple:
        """Local code: this instance's logits block [M, V/n] and its sampling rows -> (tokens [1, rows_out] (rows
        past M: 0), logprobs [1, M], top ids [1, M, K], top logprobs [1, M, K]), computed on base devices only
        (zeros on LoRA ones). The tokens keep one shape for every batch, so the next step can take them as its
        `prev_tokens` whatever its batch (async scheduling).

        Why here, not on the assembled logits after the shard_map: there, picking the base role's blocks out of
        the per-device logits made XLA all-reduce the float32 [M, V] logits across roles (39 MB per decode step
        at Qwen3 widths, on the H200 profile) and run the whole sampler on the LoRA devices too. The vocab blocks
        of an instance are gathered over its own devices only."""
        if self.layout.ep > 1:  # the base instance's vocab is split over its model axes
            logits = jax.lax.all_gather(logits, MODEL_AXES, axis=1, tiled=True)

        def sampled(logits, sampling):
            tokens = sample(logits, sampling, self.vocab_size)
            top = token_logprobs(logits, tokens, sampling.logprobs, self.vocab_size)
            # jnp.pad, not zeros().at[:M].set: inside this branch the latter crashed XLA:CPU's compiler (jax 0.11.2)
            return (jnp.pad(tokens, (0, rows_out - tokens.shape[0])), *top)

        return tuple(a[None] for a in on(is_base_device(), sampled, logits, sampling))

    def _sample(self, weights, kv, batch: StepBatch, all_slots, sampling: SamplingArrays, prev_tokens, token_src):
        """sampling: leaves [dp, M]; prev_tokens: [devices, rows_out] (a previous step's tokens, as this step
        returns them); token_src: [dp, N] (instance d's token t is prev_tokens[its device][token_src[d, t]] where
        that is >= 0). -> ((tokens [devices, rows_out], their logprobs [devices, M], top ids [devices, M, K], top
        logprobs), kv), per device: a base device holds its instance's rows (`base_rows`), a LoRA device zeros.
        They stay per device so the next step takes them where they are, with no gather."""
        return self._forward_sample(weights, kv, batch, all_slots, sampling, prev_tokens, token_src)

    def _sample_loading(self, weights, kv, batch: StepBatch, all_slots, sampling: SamplingArrays, prev_tokens,
                        token_src, slot, pages):
        """`_sample` that also writes one adapter's pages (pinned host, per device) into `slot` layer by layer.
        -> (as `_sample`'s first output, weights, kv)."""
        return self._forward_sample_loading(weights, kv, batch, all_slots, sampling, prev_tokens, token_src, slot,
                                            pages)

    def _prompt_logprobs(self, weights, kv, batch: StepBatch, all_slots, targets):
        """targets: [dp, M] -> ((logprob of targets, top ids, top logprobs), each [dp, M, ...]), kv)."""
        logits, kv = self._forward(weights, kv, batch, all_slots)
        logits = self._logits(logits)
        dp, m, v = logits.shape
        out = token_logprobs(logits.reshape(dp * m, v), targets.reshape(-1), jnp.ones(dp * m, bool), self.vocab_size)
        return tuple(a.reshape(dp, m, *a.shape[1:]) for a in out), kv


def base_rows(layout, per_device):
    """Per-device sampling outputs [devices, ...] (numpy) -> the base instances' [dp, ...] (an instance's devices
    agree)."""
    return per_device.reshape(2, layout.dp, layout.ep, *per_device.shape[1:])[BASE_ROLE, :, 0]




__all__ = ["DisaggStepFunctions"]
