"""The MoE decoder (Mixtral and Qwen3-MoE) as Flax NNX modules.

Modules hold global, sharded parameters (see models/params.py and models/stages.py); their `__call__` methods
run on a device's local shards inside one `shard_map` over the (pp, ep, tp) mesh (models/step.py), with every
collective written out:
  attention: heads split over TP; q/k/v column-parallel, o row-parallel + psum over TP;
  experts:   split over EP (all-to-all token dispatch, models/moe.py), their width over TP;
  dense MLP: width split over TP;
  pipeline:  `pp` rounds; in round r every stage runs its layers on the current activation, stage r's result
             is broadcast (psum over PP) and only stage r writes its KV cache. With one micro-batch that is the
             same latency as running the stages one after another.
  vocab:     embedding and LM-head rows split over every device.
LoRA deltas are added right after the base projection they adapt, on the same shards, so row-parallel deltas
ride in the base projection's psum and no extra collective is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from infinilora_jax import trace_choice
from infinilora_jax.models import attention
from infinilora_jax.models.batch import StepBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.layers import apply_rope, matmul, rms_norm, rope_tables
from infinilora_jax.models.moe import moe_block
from infinilora_jax.models.params import ParamFactory, declare
from infinilora_jax.models.stages import StagePlan
from meshes.axes import MODEL_AXES, PP, TP
from meshes.layouts import MeshLayout
from pallas_kernels.dispatch import add_lora_fused  # kernels on TPU (GPU from its row threshold), else the reference


def _local(p: nnx.Param) -> jax.Array:
    """A per-layer array's local shard is [1, ...] (this device's stage); drop the stage dim (a free view)."""
    return p[...][0]


def _lora_pair(pool_slot, target: str):
    if pool_slot is None or target not in pool_slot:
        return None
    return pool_slot[target]["a"][...][0], pool_slot[target]["b"][...][0]


def _lora_ranks(pool_slot, target: str):
    """[S] int32: the rank rows each slot's page of `target` holds in this layer (0: none; LoraPool)."""
    if pool_slot is None or target not in pool_slot:
        return None
    return pool_slot[target]["rank"][...][0]


def _with_loras(ys: tuple[jax.Array, ...], x: jax.Array, slots: jax.Array, pool_slot,
                targets: tuple[str, ...], row_runs: int) -> tuple[jax.Array, ...]:
    """ys[i] + the LoRA delta of targets[i] (none where the pool does not carry it), for targets that share the
    input x (q/k/v, gate/up): one dispatcher call, so the kernels group the rows once, the TPU kernels add every
    output in one launch, and each slot's page rank lets them skip the padding above it. The sum is float32,
    rounded once per output (reference.add_delta). row_runs: the step's sequence bound (StepBatch.max_sequences):
    each sequence's tokens are one run of its slot, so the GPU kernels take the tokens in place."""
    pairs = [_lora_pair(pool_slot, t) for t in targets]
    live = [i for i, pair in enumerate(pairs) if pair is not None]
    if not live:
        return tuple(ys)
    out = list(ys)
    fused = add_lora_fused(tuple(ys[i] for i in live), x, slots, tuple(pairs[i] for i in live), a_rank_major=True,
                           slot_ranks=tuple(_lora_ranks(pool_slot, targets[i]) for i in live), row_runs=row_runs)
    for i, y in zip(live, fused):
        out[i] = y
    return tuple(out)


class LayerParams:
    """Declares the per-layer arrays of one layer slot: global name "layers.{slot}.{key}", stacked over stages."""

    def __init__(self, factory: ParamFactory, slot: int, layers: tuple[int, ...], dtype):
        self.factory, self.slot, self.layers, self.dtype = factory, slot, layers, dtype

    def __call__(self, key: str, shape, dims) -> nnx.Param:
        return declare(self.factory, f"layers.{self.slot}.{key}", (len(self.layers), *shape), ("stage", *dims),
                       self.dtype, layers=self.layers, key=key)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: LayerParams, backend: attention.AttentionBackend):
        h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.cfg, self.backend = cfg, backend
        self.wq = params("attn.wq", (h, q_out), (None, "heads"))
        self.wk = params("attn.wk", (h, kv_out), (None, "kv_heads"))
        self.wv = params("attn.wv", (h, kv_out), (None, "kv_heads"))
        self.wo = params("attn.wo", (q_out, h), ("heads", None))
        if cfg.qk_norm:
            self.q_norm = params("attn.q_norm", (cfg.head_dim,), (None,))
            self.k_norm = params("attn.k_norm", (cfg.head_dim,), (None,))

    def __call__(self, x, rope, batch: StepBatch, cache_slots, kv, lora_slot):
        """x: [N, H]; rope: (cos, sin) [N, hd]; kv: this layer slot's local cache arrays in the backend's layout
        (models/attention/layout.py; the reference's: (k, v) pages [num_pages, page, kv_heads/tp, hd]).

        Returns (out [N, H], kv). cache_slots: where each token's K/V go (out of range: nowhere).
        """
        cfg = self.cfg
        n, hd = x.shape[0], cfg.head_dim
        slots = batch.adapter_slots
        q, k, v = _with_loras(tuple(matmul(x, _local(w), "nh,ho->no") for w in (self.wq, self.wk, self.wv)), x,
                              slots, lora_slot, ("q", "k", "v"), batch.max_sequences)
        q, k, v = (a.reshape(n, -1, hd) for a in (q, k, v))
        if cfg.qk_norm:
            q = rms_norm(q, _local(self.q_norm), cfg.rms_norm_eps)
            k = rms_norm(k, _local(self.k_norm), cfg.rms_norm_eps)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kv = attention.write_kv(self.backend, kv, k, v, cache_slots)
        attn = attention.paged_attention(self.backend, q, kv, batch, cfg.sliding_window).reshape(n, -1)
        (out,) = _with_loras((matmul(attn, _local(self.wo), "no,oh->nh"),), attn, slots, lora_slot, ("o",),
                             batch.max_sequences)
        return jax.lax.psum(out, TP), kv


class DenseMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: LayerParams):
        h, i = cfg.hidden_size, cfg.dense_intermediate_size
        self.w_gate_up = params("mlp.w_gate_up", (h, 2, i), (None, None, "mlp"))
        self.w_down = params("mlp.w_down", (i, h), ("mlp", None))

    def __call__(self, x, slots, lora_slot, row_runs: int):
        gate_up = matmul(x, _local(self.w_gate_up), "nh,hgi->ngi")
        gate, up = _with_loras((gate_up[:, 0], gate_up[:, 1]), x, slots, lora_slot, ("gate", "up"), row_runs)
        act = jax.nn.silu(gate) * up
        (out,) = _with_loras((matmul(act, _local(self.w_down), "ni,ih->nh"),), act, slots, lora_slot, ("down",),
                             row_runs)
        return jax.lax.psum(out, TP)


class SparseMoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, ep: int, params: LayerParams):
        h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.cfg, self.ep = cfg, ep
        self.router = params("moe.router", (h, e), (None, None))
        self.w_gate_up = params("moe.w_gate_up", (e, h, 2, i), ("experts", None, None, "expert_mlp"))
        self.w_down = params("moe.w_down", (e, i, h), ("experts", "expert_mlp", None))

    def __call__(self, x, slots, lora_slot):
        lora = None
        if lora_slot is not None:
            lora = {"gate_up": _lora_pair(lora_slot, "expert_gate_up"), "down": _lora_pair(lora_slot, "expert_down"),
                    "router": _lora_pair(lora_slot, "router"),
                    "ranks": {"gate_up": _lora_ranks(lora_slot, "expert_gate_up"),
                              "down": _lora_ranks(lora_slot, "expert_down"),
                              "router": _lora_ranks(lora_slot, "router")}}
        return moe_block(x, slots, _local(self.router), _local(self.w_gate_up), _local(self.w_down), lora,
                         top_k=self.cfg.num_experts_per_tok, normalize=self.cfg.norm_topk_prob, ep=self.ep)


class DecoderLayer(nnx.Module):
    """One layer slot: layer `stage * layers_per_stage + slot` on each pipeline stage."""

    def __init__(self, cfg: ModelConfig, layout: MeshLayout, plan: StagePlan, slot: int, dtype,
                 factory: ParamFactory, attention_backend: attention.AttentionBackend):
        params = LayerParams(factory, slot, tuple(plan.layer_index(s, slot) for s in range(layout.pp)), dtype)
        self.cfg = cfg
        self.kinds = plan.slot_kinds[slot]
        self.attn_norm = params("attn_norm", (cfg.hidden_size,), (None,))
        self.mlp_norm = params("mlp_norm", (cfg.hidden_size,), (None,))
        self.attn = Attention(cfg, params, attention_backend)
        self.moe = SparseMoE(cfg, layout.ep, params) if any(self.kinds) else None
        self.mlp = DenseMLP(cfg, params) if not all(self.kinds) else None

    def __call__(self, x, rope, batch, cache_slots, kv, lora_slot):
        eps = self.cfg.rms_norm_eps
        attn_out, kv = self.attn(rms_norm(x, _local(self.attn_norm), eps), rope, batch, cache_slots, kv, lora_slot)
        x = x + attn_out
        h = rms_norm(x, _local(self.mlp_norm), eps)
        slots = batch.adapter_slots
        if self.mlp is None:
            mlp_out = self.moe(h, slots, lora_slot)
        elif self.moe is None:
            mlp_out = self.mlp(h, slots, lora_slot, batch.max_sequences)
        else:  # this slot's kind differs between stages: each stage takes its own branch
            is_moe = jnp.asarray(self.kinds)[jax.lax.axis_index(PP)]
            mlp_out = jax.lax.cond(is_moe, lambda a: self.moe(a, slots, lora_slot),
                                   lambda a: self.mlp(a, slots, lora_slot, batch.max_sequences), h)
        return x + mlp_out, kv


def run_layer(layer: DecoderLayer, lora_slot, x, rope, batch: StepBatch, cache_slots, kv):
    """layer(x, rope, batch, cache_slots, kv, lora_slot) through one jit shared by every layer of the same
    structure, so a step program traces and lowers a layer once, not once per layer: in Python that took ~0.1 s
    per layer and program (5-7 s per program at full depth on the H200 host, benchmarks/compile_time.py), and
    a server builds ~80 programs before traffic. XLA inlines the calls: compiled code is the same."""
    layer_graph, layer_state = nnx.split(layer)
    slot_graph, slot_state = nnx.split(lora_slot) if lora_slot is not None else (None, None)
    return _layer_program(layer_graph, slot_graph, trace_choice.current(), layer_state, slot_state, x, rope, batch,
                          cache_slots, kv)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _layer_program(layer_graph, slot_graph, choices, layer_state, slot_state, x, rope, batch, cache_slots, kv):
    """`choices` (trace_choice.current()) keys the trace cache on the implementations chosen at trace time."""
    del choices
    layer = nnx.merge(layer_graph, layer_state)
    lora_slot = nnx.merge(slot_graph, slot_state) if slot_graph is not None else None
    return layer(x, rope, batch, cache_slots, kv, lora_slot)


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, layout: MeshLayout, dtype, factory: ParamFactory,
                 attention_backend: attention.AttentionBackend | str | None = None):
        """attention_backend: None picks by platform (or the `attention.use_backend` context); it also fixes the
        KV cache layout (kv_cache_shape)."""
        layout.check_fits(cfg)
        self.cfg, self.layout = cfg, layout
        self.attention = attention.select_backend(attention_backend)
        self.plan = StagePlan.build(cfg.moe_layers, layout.pp)
        self.vocab_padded = -(-cfg.vocab_size // layout.num_devices) * layout.num_devices
        h = cfg.hidden_size
        self.embed = declare(factory, "embed", (self.vocab_padded, h), ("vocab", None), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, layout, self.plan, j, dtype, factory, self.attention)
                                for j in range(self.plan.layers_per_stage)])
        self.final_norm = declare(factory, "final_norm", (h,), (None,), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = declare(factory, "lm_head", (self.vocab_padded, h), ("vocab", None), dtype)

    def kv_cache_shape(self, num_pages: int, page_size: int) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
        """Global shape and logical dims of each of a layer slot's `kv_cache_arrays` cache arrays, in the attention
        backend's layout (models/attention/layout.py; the reference's: K or V [pp, pages, page, kv_heads, hd])."""
        cfg = self.cfg
        shape, dims = attention.layout.array_shape(self.attention.layout, num_pages, page_size, cfg.num_kv_heads,
                                                   cfg.head_dim)
        return (self.layout.pp, *shape), ("stage", *dims)

    @property
    def kv_cache_arrays(self) -> int:
        """Cache arrays per layer slot: 2 (K, V) or 1 (combined K/V)."""
        return attention.layout.num_arrays(self.attention.layout)

    def __call__(self, batch: StepBatch, kv: list, lora_pool) -> tuple[jax.Array, list]:
        """Local forward. kv: per layer slot a tuple of local cache arrays [1, ...] (e.g. (k, v) pages [1, num_pages,
        page, kv/tp, hd]); lora_pool: LoraPool or None. Returns (final hidden states [M, H] of
        batch.logits_indices, updated kv)."""
        cfg, pp = self.cfg, self.layout.pp
        x = self._embed(batch.tokens)
        rope = rope_tables(batch.positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        no_slot = jnp.iinfo(jnp.int32).max  # out of range in every cache layout: the write is dropped
        stage = jax.lax.axis_index(PP) if pp > 1 else 0
        kv = [tuple(a[0] for a in arrays) for arrays in kv]
        for r in range(pp):
            active = stage == r
            cache_slots = batch.cache_slots if pp == 1 else jnp.where(active, batch.cache_slots, no_slot)
            h = x
            for j, layer in enumerate(self.layers):
                lora_slot = None if lora_pool is None else lora_pool.layers[j]
                h, kv[j] = run_layer(layer, lora_slot, h, rope, batch, cache_slots, kv[j])
            x = h if pp == 1 else jax.lax.psum(jnp.where(active, h, jnp.zeros_like(h)), PP)
        x = rms_norm(x[batch.logits_indices], self.final_norm[...], cfg.rms_norm_eps)
        return x, [tuple(a[None] for a in arrays) for arrays in kv]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[M, H] final hidden states -> [M, vocab_padded / devices] float32 logits (this device's vocab rows)."""
        head = self.embed if self.cfg.tie_word_embeddings else self.lm_head
        return matmul(hidden, head[...], "mh,vh->mv").astype(jnp.float32)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """Row lookup in a vocab-sharded table: each device looks up the rows it holds, psum assembles them."""
        table = self.embed[...]
        rows = table.shape[0]
        offset = jax.lax.axis_index(MODEL_AXES) * rows
        local = tokens - offset
        mine = (local >= 0) & (local < rows)
        x = jnp.where(mine[:, None], table[jnp.clip(local, 0, rows - 1)], jnp.zeros((), table.dtype))
        return jax.lax.psum(x, MODEL_AXES)
