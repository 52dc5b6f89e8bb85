"""The disaggregated forward: local code of one SPMD step over the (role, dp, pp, ep, tp) mesh.

Base devices run the decoder (models/transformer.py numerics, op for op) without adapters; LoRA devices run
every LoRA delta. Per layer l (LoRA stage s = l // (L / dp), LoRA layer slot j = l % (L / dp)):

  1. base: h = norm(x)            -> push h              | base: q, k, v projections
     LoRA stage s: q/k/v deltas of every instance's tokens  -> reply
  2. base: rope, KV write, attention -> push attn         | base: o projection
     LoRA: o delta                                           -> reply
  3. base: x += o; h2 = norm(x)   -> push h2             | base: router logits (dense layer: gate/up)
     LoRA: router delta (dense layer: gate/up deltas)        -> reply
  4. MoE: base routes and packs rows, all_to_all over ep to the rows' experts, sorts them by expert
     -> push (rows, local expert, slot)                  | base: gate/up grouped GEMM
     LoRA device (s, e), which holds expert shard e's pages: gate/up deltas -> reply
  5. base: act = silu(gate) * up  -> push (act, expert, slot) | base: down grouped GEMM (dense: down)
     LoRA: down deltas                                       -> reply
  6. base: rows back over ep, weighted sum, all_gather over ep; x += y.

Each push is issued before the base projection it accompanies, so the base GEMM and the LoRA server's deltas
can run at once (both depend only on the pushed value). Deltas travel in float32 and are added to the base
output and rounded once, as in coupled mode, so float32 results match it. Collectives run at top level on every
device; compute sits in role branches (exchange.on), so a LoRA device runs no base GEMM and vice versa.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinilora_jax.disagg.exchange import on, to_base, to_lora
from infinilora_jax.disagg.pages import RolePool
from infinilora_jax.lora.reference import add_delta
from infinilora_jax.models.batch import StepBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.layers import apply_rope, matmul, paged_attention, rms_norm, rope_tables, write_kv
from infinilora_jax.models.moe import combine_rows, expert_down, expert_gate_up, pack_rows, route_logits, sort_rows
from infinilora_jax.models.stages import StagePlan
from meshes.axes import BASE_ROLE, DP, EP, LORA_ROLE, MODEL_AXES, ROLE
from meshes.layouts import RoleLayout
from pallas_kernels.dispatch import paged_lora_delta  # kernels on TPU, the reference elsewhere

ATTN_IN = ("q", "k", "v")
DENSE_IN = ("gate", "up")


def _is_base():
    """This device plays the base role (local code; XLA folds the repeated axis_index)."""
    return jax.lax.axis_index(ROLE) == BASE_ROLE


class DisaggModel:
    """Static structure of the step (config, layer kinds, page placement); `forward` is the local code."""

    def __init__(self, cfg: ModelConfig, layout: RoleLayout, pool: RolePool):
        self.cfg, self.layout, self.pool = cfg, layout, pool
        self.base_plan = StagePlan.build(cfg.moe_layers, 1)
        self.lora_layers = pool.plan.layers_per_stage

    # ---- LoRA role ----

    def _deltas(self, blocks, j: int, targets, rows, slots, experts=None) -> dict:
        """{target: [R, D_out] float32} for the rows, from the pages of LoRA layer slot j."""
        out = {}
        for t in targets:
            tp = self.pool.layers[j][t]
            a = self.pool.arena(blocks[tp.a.buffer], tp.a)
            b = self.pool.arena(blocks[tp.b.buffer], tp.b)
            table_a, table_b = self.pool.tables(tp)
            out[t] = paged_lora_delta(rows, slots, experts, a, b, table_a, num_experts=tp.experts, b_table=table_b)
        return out

    def _round_trip(self, blocks, serving, stage, j, targets, push, slots_of, base_work, *base_args):
        """push -> (base: base_work(*base_args) | LoRA: deltas) -> reply. Returns (base_work's result, deltas)."""
        dp = self.layout.dp
        if not targets:  # nothing to adapt here: no exchange
            return on(_is_base(), base_work, *base_args), {}
        got = to_lora(push, stage, dp)
        base_out = on(_is_base(), base_work, *base_args)

        def lora(got):
            rows, slots, experts = slots_of(got)
            deltas = self._deltas(blocks, j, targets, rows, slots, experts)
            return {t: d.reshape(dp, -1, d.shape[-1]) for t, d in deltas.items()}

        deltas = on(serving, lora, got)
        return base_out, to_base(deltas, stage, dp, jax.lax.axis_index(DP))

    # ---- the forward ----

    def forward(self, blocks: dict[str, jax.Array], batch: StepBatch, all_slots: jax.Array,
                load: tuple | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """blocks: role buffer name -> this device's [1, *local] block; batch: this device's instance's batch
        (on a LoRA device: instance `dp`'s, unused); all_slots: [dp, N] adapter slot of every instance's tokens;
        load: (slot, {j: {t: {"a", "b": [1, rows, width] host pages}}}) to write into the LoRA pages layer by
        layer, or None. Returns (float32 logits [M, vocab rows of this device], updated blocks)."""
        cfg = self.cfg
        role, instance = jax.lax.axis_index(ROLE), jax.lax.axis_index(DP)
        is_lora = role == LORA_ROLE
        blocks = dict(blocks)
        # Weights are read from `blocks` when used, so every read sees the latest value of its buffer (blocks
        # holding LoRA pages are rewritten in place by layer-wise loading; reading a stale value would copy).
        w = lambda name: blocks["w:" + name][0]  # drops the device dim

        if load is not None:
            # Layer-wise loading: each LoRA layer slot's pages come from host memory in their own transfer and
            # are scattered into their regions before any layer reads a buffer holding them. All writes come
            # first: a buffer read (inside a role branch) before a later in-place write into it would be
            # copied whole (measured: tests/test_disagg.py). A layer waits only for the transfers whose pages
            # sit in the buffers it reads.
            slot, pages = load
            for j in range(self.lora_layers):
                incoming = jax.tree.map(lambda page: jax.device_put(page, jax.memory.Space.Device)[0], pages[j])
                blocks = self.pool.write(blocks, j, slot, incoming, is_lora)
        x = jax.lax.psum(on(_is_base(), self._embed, w("embed"), batch.tokens), MODEL_AXES)
        rope = rope_tables(batch.positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        kv_block = blocks["kv:0:k"].shape  # [1, 1, num_pages, page_size, kv_heads, hd]
        no_slot = kv_block[2] * kv_block[3]
        cache_slots = jnp.where(_is_base(), batch.cache_slots, no_slot)
        slots = batch.adapter_slots
        flat_slots = all_slots.reshape(-1)  # [dp * N]: the stacking order of to_lora
        dense_rows = lambda got: (got.reshape(-1, got.shape[-1]), flat_slots, None)

        for layer in range(cfg.num_layers):
            stage, j = divmod(layer, self.lora_layers)
            serving = is_lora & (instance == stage)
            targets = self.pool.layers[j]
            p = lambda key, layer=layer: w(f"layers/{layer}/{key}")[0]  # drops the stage dim
            eps = cfg.rms_norm_eps

            # 1. q, k, v
            h = on(_is_base(), lambda x: rms_norm(x, p("attn_norm"), eps), x)
            qkv0, d = self._round_trip(blocks, serving, stage, j, [t for t in ATTN_IN if t in targets], h,
                                       dense_rows, lambda h: tuple(matmul(h, p(f"attn/w{t}"), "nh,ho->no")
                                                                   for t in ATTN_IN), h)
            q, k, v = on(_is_base(), lambda qkv0, d: self._qkv(qkv0, d, rope, p), qkv0, d)
            for name, new in ((f"kv:{layer}:k", k), (f"kv:{layer}:v", v)):  # blocks [1, 1 (stage), pages, ...]
                blocks[name] = write_kv(blocks[name][0, 0], new, cache_slots)[None, None]
            attn = on(_is_base(), lambda q, kp, vp: self._attention(q, kp, vp, batch), q,
                      blocks[f"kv:{layer}:k"][0, 0], blocks[f"kv:{layer}:v"][0, 0])

            # 2. o
            o0, d = self._round_trip(blocks, serving, stage, j, [t for t in ("o",) if t in targets], attn,
                                     dense_rows, lambda a: matmul(a, p("attn/wo"), "no,oh->nh"), attn)

            def post_attn(x, o0, d):
                out = add_delta(o0, d["o"]) if "o" in d else o0
                x = x + out
                return x, rms_norm(x, p("mlp_norm"), eps)

            x, h2 = on(_is_base(), post_attn, x, o0, d)

            if self.base_plan.slot_kinds[layer][0]:
                x = self._moe(blocks, serving, stage, j, targets, x, h2, slots, flat_slots, dense_rows, p)
            else:
                x = self._dense(blocks, serving, stage, j, targets, x, h2, dense_rows, p)

        def final(x, norm, head):
            hidden = rms_norm(x[batch.logits_indices], norm, cfg.rms_norm_eps)
            return matmul(hidden, head, "mh,vh->mv").astype(jnp.float32)

        head = w("embed") if cfg.tie_word_embeddings else w("lm_head")
        logits = on(_is_base(), final, x, w("final_norm"), head)
        return logits, blocks

    # ---- base pieces ----

    @staticmethod
    def _embed(table, tokens):
        """This device's rows of the vocab-sharded table (a psum over the instance assembles them)."""
        rows = table.shape[0]
        local = tokens - jax.lax.axis_index(MODEL_AXES) * rows
        mine = (local >= 0) & (local < rows)
        return jnp.where(mine[:, None], table[jnp.clip(local, 0, rows - 1)], jnp.zeros((), table.dtype))

    def _qkv(self, qkv0, d, rope, p):
        cfg = self.cfg
        n, hd = qkv0[0].shape[0], cfg.head_dim
        q, k, v = (add_delta(y, d[t]) if t in d else y for y, t in zip(qkv0, ATTN_IN))
        q, k, v = (a.reshape(n, -1, hd) for a in (q, k, v))
        if cfg.qk_norm:
            q = rms_norm(q, p("attn/q_norm"), cfg.rms_norm_eps)
            k = rms_norm(k, p("attn/k_norm"), cfg.rms_norm_eps)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def _attention(self, q, k_pages, v_pages, batch: StepBatch):
        attn = None
        for block in (batch.decode, batch.prefill):
            attn = paged_attention(q, k_pages, v_pages, batch.positions, block.index, block.block_tables,
                                   self.cfg.sliding_window, attn)
        return attn.reshape(q.shape[0], -1)

    def _dense(self, blocks, serving, stage, j, targets, x, h2, dense_rows, p):
        gate_up, d = self._round_trip(blocks, serving, stage, j, [t for t in DENSE_IN if t in targets], h2,
                                      dense_rows, lambda h: matmul(h, p("mlp/w_gate_up"), "nh,hgi->ngi"), h2)

        def act_down(gate_up, d):
            gate = add_delta(gate_up[:, 0], d["gate"]) if "gate" in d else gate_up[:, 0]
            up = add_delta(gate_up[:, 1], d["up"]) if "up" in d else gate_up[:, 1]
            return jax.nn.silu(gate) * up

        act = on(_is_base(), act_down, gate_up, d)
        down0, d = self._round_trip(blocks, serving, stage, j, [t for t in ("down",) if t in targets], act,
                                    dense_rows, lambda a: matmul(a, p("mlp/w_down"), "ni,ih->nh"), act)
        return on(_is_base(), lambda x, y, d: x + (add_delta(y, d["down"]) if "down" in d else y), x, down0, d)

    def _moe(self, blocks, serving, stage, j, targets, x, h2, slots, flat_slots, dense_rows, p):
        cfg, ep = self.cfg, self.layout.ep
        n, hidden = h2.shape
        w_gate_up, w_down = p("moe/w_gate_up"), p("moe/w_down")
        num_local = w_gate_up.shape[0]
        router0, d = self._round_trip(blocks, serving, stage, j, [t for t in ("router",) if t in targets], h2,
                                      dense_rows, lambda h: matmul(h, p("moe/router"), "nh,he->ne"), h2)

        def dispatch(h2, router0, d):
            logits = add_delta(router0, d["router"]) if "router" in d else router0
            weights, experts = route_logits(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
            return pack_rows(h2, slots, weights, experts, num_local=num_local, ep=ep)

        packed = on(_is_base(), dispatch, h2, router0, d)
        capacity = packed.send_e.shape[1]
        recv = tuple(jax.lax.all_to_all(a, EP, 0, 0) if ep > 1 else a for a in packed[:3])

        def sort(recv_x, recv_e, recv_s):
            rows, row_experts, row_slots = recv_x.reshape(-1, hidden), recv_e.reshape(-1), recv_s.reshape(-1)
            order, group_sizes = sort_rows(row_experts, num_local)
            return rows[order], row_experts[order], row_slots[order], order, group_sizes

        rows, row_experts, row_slots, order, group_sizes = on(_is_base(), sort, *recv)
        expert_rows = lambda got: (got[0].reshape(-1, got[0].shape[-1]), got[2].reshape(-1), got[1].reshape(-1))
        gate_up, d = self._round_trip(blocks, serving, stage, j, [t for t in ("expert_gate_up",) if t in targets],
                                      (rows, row_experts, row_slots), expert_rows,
                                      lambda r: expert_gate_up(r, group_sizes, w_gate_up), rows)

        def act_fn(gate_up, d):
            if "expert_gate_up" in d:
                gate_up = add_delta(gate_up, d["expert_gate_up"])
            return jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]

        act = on(_is_base(), act_fn, gate_up, d)
        down0, d = self._round_trip(blocks, serving, stage, j, [t for t in ("expert_down",) if t in targets],
                                    (act, row_experts, row_slots), expert_rows,
                                    lambda a: expert_down(a, group_sizes, w_down), act)

        def unsort(down0, d):
            out = add_delta(down0, d["expert_down"]) if "expert_down" in d else down0
            return jnp.zeros_like(out).at[order].set(out).reshape(ep, capacity, hidden)

        out = on(_is_base(), unsort, down0, d)
        back = jax.lax.all_to_all(out, EP, 0, 0) if ep > 1 else out
        y = on(_is_base(), combine_rows, back, packed)
        if ep > 1:
            y = jax.lax.all_gather(y, EP, tiled=True)
        return x + y[:n]


__all__ = ["DisaggModel"]
