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
device. Role branches cost ~24 us each on GPU (the predicate goes to the host), so there is at most one per
segment between two collectives, and only for work a role must not run: each round trip's base GEMM and LoRA
deltas share one conditional (exchange.split), attention and the LM head have one (base only); a LoRA device
runs no base GEMM, attention or LoRA math of another stage, a base device no LoRA math. Cheap [T, H]-sized work
(norms, adding deltas, RoPE, activations, routing, packing and sorting rows, the weighted sum, the embedding
gather) runs on both roles unconditionally: on a LoRA device its results are unused (never pushed). Per layer
with every target adapted: 6 branches in a MoE layer (q/k/v, attention, o, router, expert gate/up, expert
down), 5 in a dense one (q/k/v, attention, o, gate/up, down); tests/test_disagg.py holds the count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinilora_jax.disagg.exchange import on, split, to_base, to_lora
from infinilora_jax.disagg.pages import RolePool
from infinilora_jax.lora.reference import add_delta
from infinilora_jax.models.batch import StepBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.layers import apply_rope, matmul, paged_attention, rms_norm, rope_tables, write_kv
from infinilora_jax.models.moe import (
    combine_rows,
    expert_down,
    expert_gate_up,
    pack_rows,
    route_logits,
    sort_rows,
    unsort,
)
from infinilora_jax.models.stages import StagePlan
from meshes.axes import BASE_ROLE, DP, EP, LORA_ROLE, MODEL_AXES, ROLE
from meshes.layouts import RoleLayout
from pallas_kernels.dispatch import paged_lora_delta  # kernels on TPU, the reference elsewhere

ATTN_IN = ("q", "k", "v")
DENSE_IN = ("gate", "up")


def is_base_device():
    """This device plays the base role (local code; XLA folds the repeated axis_index)."""
    return jax.lax.axis_index(ROLE) == BASE_ROLE


class DisaggModel:
    """Static structure of the step (config, layer kinds, page placement); `forward` is the local code."""

    def __init__(self, cfg: ModelConfig, layout: RoleLayout, pool: RolePool):
        self.cfg, self.layout, self.pool = cfg, layout, pool
        self.base_plan = StagePlan.build(cfg.moe_layers, 1)
        self.lora_layers = pool.plan.layers_per_stage

    # ---- LoRA role ----

    def _deltas(self, blocks, j: int, targets, rows, slots, experts=None, row_runs=None) -> dict:
        """{target: [R, D_out] float32} for the rows, from the pages of LoRA layer slot j. row_runs: a bound on
        the rows' runs of one key (dispatch.add_lora_fused), None when there is none."""
        out = {}
        for t in targets:
            tp = self.pool.layers[j][t]
            a = self.pool.arena(blocks[tp.a.buffer], tp.a)
            b = self.pool.arena(blocks[tp.b.buffer], tp.b)
            table_a, table_b = self.pool.tables(tp)
            out[t] = paged_lora_delta(rows, slots, experts, a, b, table_a, num_experts=tp.experts, b_table=table_b,
                                      row_runs=row_runs)
        return out

    def _round_trip(self, blocks, branch, stage, j, targets, push, slots_of, base_work, *base_args):
        """push -> one conditional (base: base_work(*base_args) | serving LoRA: deltas) -> reply. `branch`: 0 on
        base devices, 1 on the LoRA devices of `stage`, 2 on other LoRA devices. Returns (base_work's result,
        deltas)."""
        dp = self.layout.dp
        if not targets:  # nothing to adapt here: no exchange
            return on(is_base_device(), base_work, *base_args), {}
        got = to_lora(push, stage, dp)

        def lora(got):
            rows, slots, experts, runs = slots_of(got)
            deltas = self._deltas(blocks, j, targets, rows, slots, experts, runs)
            return {t: d.reshape(dp, -1, d.shape[-1]) for t, d in deltas.items()}

        base_out, deltas = split(branch, base_work, base_args, lora, (got,), idle=dp > 1)
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
        # Work outside role branches runs on both roles: on a LoRA device it reads page bytes as if they were
        # norm weights or embedding rows, and its results are never pushed (only base devices push).
        x = jax.lax.psum(self._embed(w("embed"), batch.tokens), MODEL_AXES)
        rope = rope_tables(batch.positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        kv_block = blocks["kv:0:k"].shape  # [1, 1, num_pages, page_size, kv_heads, hd]
        no_slot = kv_block[2] * kv_block[3]
        cache_slots = jnp.where(is_base_device(), batch.cache_slots, no_slot)
        slots = batch.adapter_slots
        flat_slots = all_slots.reshape(-1)  # [dp * N]: the stacking order of to_lora
        # every instance's tokens end to end, each sequence's one run of its slot: at most dp x the sequence
        # bound of runs, so the GPU kernels take them in place
        dense_runs = self.layout.dp * batch.max_sequences
        dense_rows = lambda got: (got.reshape(-1, got.shape[-1]), flat_slots, None, dense_runs)

        for layer in range(cfg.num_layers):
            stage, j = divmod(layer, self.lora_layers)
            branch = jnp.where(is_lora, jnp.where(instance == stage, 1, 2), 0)  # exchange.split's branch
            targets = self.pool.layers[j]
            p = lambda key, layer=layer: w(f"layers/{layer}/{key}")[0]  # drops the stage dim
            eps = cfg.rms_norm_eps
            rt = lambda names, *args, branch=branch, stage=stage, j=j, targets=targets: self._round_trip(
                blocks, branch, stage, j, [t for t in names if t in targets], *args)

            # 1. q, k, v
            h = rms_norm(x, p("attn_norm"), eps)
            qkv0, d = rt(ATTN_IN, h, dense_rows,
                         lambda h: tuple(matmul(h, p(f"attn/w{t}"), "nh,ho->no") for t in ATTN_IN), h)
            q, k, v = self._qkv(qkv0, d, rope, p)
            for name, new in ((f"kv:{layer}:k", k), (f"kv:{layer}:v", v)):  # blocks [1, 1 (stage), pages, ...]
                blocks[name] = write_kv(blocks[name][0, 0], new, cache_slots)[None, None]
            pages = (blocks[f"kv:{layer}:k"][0, 0], blocks[f"kv:{layer}:v"][0, 0])
            attention = lambda q, kp, vp: self._attention(q, kp, vp, batch)
            o_proj = lambda a: matmul(a, p("attn/wo"), "no,oh->nh")

            # 2. o (no exchange: attention and o projection in one branch). With an exchange, attention runs on
            # both roles outside any branch: a LoRA device waits for the push of its output anyway, so reading
            # its page bytes as KV costs no time (its result is never pushed), and it saves a role branch
            # (~24 us of predicate read-back per layer on GPU).
            if "o" in targets:
                attn = attention(q, *pages)
                o0, d = rt(("o",), attn, dense_rows, o_proj, attn)
            else:
                o0, d = on(is_base_device(), lambda *a: o_proj(attention(*a)), q, *pages), {}
            x = x + (add_delta(o0, d["o"]) if "o" in d else o0)
            h2 = rms_norm(x, p("mlp_norm"), eps)

            if self.base_plan.slot_kinds[layer][0]:
                x = x + self._moe(rt, targets, h2, slots, dense_rows, p)
            else:
                x = x + self._dense(rt, targets, h2, dense_rows, p)

        def final(x, norm, head):
            hidden = rms_norm(x[batch.logits_indices], norm, cfg.rms_norm_eps)
            return matmul(hidden, head, "mh,vh->mv").astype(jnp.float32)

        head = w("embed") if cfg.tie_word_embeddings else w("lm_head")
        logits = on(is_base_device(), final, x, w("final_norm"), head)
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

    @staticmethod
    def _dense_act(gate_up, d):
        """silu(gate) * up from gate_up [N, 2, I], the gate and up deltas added."""
        gate = add_delta(gate_up[:, 0], d["gate"]) if "gate" in d else gate_up[:, 0]
        up = add_delta(gate_up[:, 1], d["up"]) if "up" in d else gate_up[:, 1]
        return jax.nn.silu(gate) * up

    @staticmethod
    def _expert_act(gate_up, d):
        """silu(gate) * up from expert rows' gate_up [R, 2, I], its delta added."""
        if "expert_gate_up" in d:
            gate_up = add_delta(gate_up, d["expert_gate_up"])
        return jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]

    def _dense(self, rt, targets, h2, dense_rows, p):
        """The dense MLP's output y (x += y by the caller)."""
        gate_up_proj = lambda h: matmul(h, p("mlp/w_gate_up"), "nh,hgi->ngi")
        down_proj = lambda a: matmul(a, p("mlp/w_down"), "ni,ih->nh")
        if not any(t in targets for t in (*DENSE_IN, "down")):  # no exchange: the whole MLP in one branch
            return on(is_base_device(), lambda h: down_proj(self._dense_act(gate_up_proj(h), {})), h2)
        gate_up, d = rt(DENSE_IN, h2, dense_rows, gate_up_proj, h2)
        act = self._dense_act(gate_up, d)
        down0, d = rt(("down",), act, dense_rows, down_proj, act)
        return add_delta(down0, d["down"]) if "down" in d else down0

    def _moe(self, rt, targets, h2, slots, dense_rows, p):
        """The MoE block's output y (x += y by the caller)."""
        cfg, ep = self.cfg, self.layout.ep
        n, hidden = h2.shape
        w_gate_up, w_down = p("moe/w_gate_up"), p("moe/w_down")
        num_local = w_gate_up.shape[0]
        router0, d = rt(("router",), h2, dense_rows, lambda h: matmul(h, p("moe/router"), "nh,he->ne"), h2)
        logits = add_delta(router0, d["router"]) if "router" in d else router0
        weights, experts = route_logits(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        packed = pack_rows(h2, slots, weights, experts, num_local=num_local, ep=ep)
        capacity = packed.send_e.shape[1]
        recv_x, recv_e, recv_s = (jax.lax.all_to_all(a, EP, 0, 0) if ep > 1 else a for a in packed[:3])
        rows, row_experts, row_slots = recv_x.reshape(-1, hidden), recv_e.reshape(-1), recv_s.reshape(-1)
        expert_lora = any(t in targets for t in ("expert_gate_up", "expert_down"))
        # with expert LoRA, rows sorted by (expert, slot) (the expert GEMM's groups unchanged): each instance's
        # rows of one (slot, expert) page are one run, so the LoRA server's kernels take the dp instances' rows
        # in place (at most dp x slots x local experts runs)
        order, group_sizes = (sort_rows(row_experts, num_local, row_slots, self.pool.num_slots) if expert_lora
                              else sort_rows(row_experts, num_local))
        rows, row_experts, row_slots = rows[order], row_experts[order], row_slots[order]

        gate_up_proj = lambda r, gs: expert_gate_up(r, gs, w_gate_up)
        down_proj = lambda a, gs: expert_down(a, gs, w_down)
        if not expert_lora:  # no exchange: one branch
            down0 = on(is_base_device(), lambda r, gs: down_proj(self._expert_act(gate_up_proj(r, gs), {}), gs),
                       rows, group_sizes)
        else:
            runs = self.layout.dp * self.pool.num_slots * num_local
            expert_rows = lambda got: (got[0].reshape(-1, got[0].shape[-1]), got[2].reshape(-1), got[1].reshape(-1),
                                       runs)
            gate_up, d = rt(("expert_gate_up",), (rows, row_experts, row_slots), expert_rows, gate_up_proj, rows,
                            group_sizes)
            act = self._expert_act(gate_up, d)
            down0, d = rt(("expert_down",), (act, row_experts, row_slots), expert_rows, down_proj, act, group_sizes)
            if "expert_down" in d:
                down0 = add_delta(down0, d["expert_down"])
        out = unsort(down0, order).reshape(ep, capacity, hidden)
        back = jax.lax.all_to_all(out, EP, 0, 0) if ep > 1 else out
        y = combine_rows(back, packed)
        if ep > 1:
            y = jax.lax.all_gather(y, EP, tiled=True)
        return y[:n]


__all__ = ["DisaggModel"]
