"""The LoRA server's adapter pages, laid out in the role buffers ("unified role paging").

A LoRA device holds no array of its own: every role buffer block (disagg/roles.py) is, on a LoRA device, raw
arena space. Each (LoRA layer slot j, target t) keeps its adapters in two rank-row arenas (the layout the LoRA
kernels read, pallas_kernels/layout.py):

    A rows [P, D_in]   rank components of A (PEFT's lora_A rows), one page of E_t * R rows per adapter slot
    B rows [P, D_out]  the matching rank components of B (scaling folded in)

An arena is a whole-array reshape `block.reshape(size / width, width)` of one role buffer's block, and a
target's pages are a region of rows in it; `place` assigns the regions (first fit, KV blocks first since they
are the largest, then weights) and page tables address them, so no view is ever sliced (offset slices of a flat
arena were measured to materialise copies; whole-array reshapes are bitcasts). Slot s >= 1 of a target takes
rows [row0 + (s - 1) * E_t * R, ... + E_t * R); slot 0 ("no adapter") takes none.

Placement is per LoRA layer *slot*: the LoRA server's pipeline stage s holds layer s * L/pp + j in the same
regions on every stage, so one program writes and reads every stage's pages. Expert pages hold this device's
expert shard (local expert ids); attention, router and dense-MLP pages are replicated over ep.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from infinilora_jax.errors import ConfigError
from infinilora_jax.loading.peft_adapter import AdapterWeights
from infinilora_jax.lora.pool import LoraPoolConfig, slot_targets
from infinilora_jax.lora.targets import page_decls
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.stages import StagePlan
from pallas_kernels.layout import PageTable, padded_rank


@dataclasses.dataclass(frozen=True)
class Region:
    buffer: str  # role buffer name
    width: int  # row width of the arena view
    row0: int  # first row of the region in the [size / width, width] view (a multiple of the rank block)
    rows: int  # rows reserved: max_adapters * experts * rank


@dataclasses.dataclass(frozen=True)
class TargetPages:
    """One target of one LoRA layer slot: its page shape and, once placed, its two regions."""

    target: str
    experts: int  # pages per adapter slot: local experts for expert targets, 1 otherwise
    d_in: int
    out_shape: tuple[int, ...]
    a: Region | None = None
    b: Region | None = None

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)


class RolePool:
    """Targets per LoRA layer slot (for AdapterCache's checks), their placement in role buffers, page tables,
    host pages of an adapter and the local code that writes or reads them."""

    def __init__(self, cfg: ModelConfig, plan: StagePlan, pool_cfg: LoraPoolConfig, ep: int, dtype,
                 rank_block: int = 8):
        self.cfg, self.plan, self.pool_cfg, self.ep = cfg, plan, pool_cfg, ep
        self.dtype = np.dtype(dtype)
        self.rank_block = rank_block
        self.rank = padded_rank(pool_cfg.max_rank, rank_block)  # rows per page (zero-padded above each rank)
        self.layers: list[dict[str, TargetPages]] = []  # [j][target]: AdapterCache checks `target in layers[j]`
        for j in range(plan.layers_per_stage):
            pages = {}
            for t in slot_targets(cfg, plan, j, pool_cfg.targets):
                (a_shape, _), (b_shape, _) = page_decls(t, cfg, 1, 1, pool_cfg.max_rank)
                expert = t.startswith("expert_")
                experts = a_shape[2] // ep if expert else 1
                d_in = a_shape[-1]
                out_shape = tuple(b_shape[4 if expert else 3:])
                pages[t] = TargetPages(t, experts, d_in, out_shape)
            self.layers.append(pages)
        self.placed = False

    @property
    def num_slots(self) -> int:
        return self.pool_cfg.num_slots

    def page_rows(self, tp: TargetPages) -> int:
        return tp.experts * self.rank

    def widths(self) -> set[int]:
        return {w for layer in self.layers for tp in layer.values() for w in (tp.d_in, tp.d_out)}

    # ---- placement ----

    def place(self, buffers: list[tuple[str, int]], max_adapters: int | None = None) -> None:
        """Assign every region (first fit, largest first) in the given (name, elements) blocks, in order of
        preference. Raises ConfigError, naming how many adapters would fit, when they do not."""
        slots = max_adapters or self.pool_cfg.max_adapters
        placed = self._try_place(buffers, slots)
        if placed is None:
            lo, hi = 0, slots
            while lo < hi:  # largest count that fits
                mid = (lo + hi + 1) // 2
                if self._try_place(buffers, mid) is not None:
                    lo = mid
                else:
                    hi = mid - 1
            fit = lo
            raise ConfigError(f"the LoRA server's role buffers hold pages for {fit} adapters of rank "
                              f"{self.pool_cfg.max_rank}, not max_adapters={slots}: lower max_adapters or "
                              "max_lora_rank, or give the KV cache more pages (LoRA devices lend theirs as pages)")
        self.layers = placed
        self.placed = True

    def fits(self, buffers: list[tuple[str, int]], slots: int) -> bool:
        """Whether `slots` adapters' pages fit in the (name, elements) blocks."""
        return self._try_place(buffers, slots) is not None

    def _try_place(self, buffers: list[tuple[str, int]], slots: int) -> list[dict[str, TargetPages]] | None:
        used = {name: 0 for name, _ in buffers}
        size = dict(buffers)
        order = sorted(((j, t, which) for j, layer in enumerate(self.layers) for t in layer for which in "ab"),
                       key=lambda k: -self._need(self.layers[k[0]][k[1]], k[2], slots))
        regions: dict[tuple[int, str, str], Region] = {}
        rb = self.rank_block
        for j, t, which in order:
            tp = self.layers[j][t]
            width = tp.d_in if which == "a" else tp.d_out
            rows = slots * self.page_rows(tp)
            for name, _ in buffers:
                if size[name] % width:
                    continue
                row0 = -(-used[name] // (width * rb)) * rb
                if (row0 + rows) * width <= size[name]:
                    used[name] = (row0 + rows) * width
                    regions[(j, t, which)] = Region(name, width, row0, rows)
                    break
            else:
                return None
        return [{t: dataclasses.replace(tp, a=regions[(j, t, "a")], b=regions[(j, t, "b")])
                 for t, tp in layer.items()} for j, layer in enumerate(self.layers)]

    def _need(self, tp: TargetPages, which: str, slots: int) -> int:
        return slots * self.page_rows(tp) * (tp.d_in if which == "a" else tp.d_out)

    def regions(self) -> list[Region]:
        return [r for layer in self.layers for tp in layer.values() for r in (tp.a, tp.b)]

    def page_bytes(self) -> int:
        """Bytes of adapter pages one LoRA device holds (every slot's region, used or not)."""
        return sum(r.rows * r.width for r in self.regions()) * self.dtype.itemsize

    # ---- addressing ----

    def table(self, tp: TargetPages, which: str) -> PageTable:
        """The page table of one arena of a placed target (constants: every slot uses the pool's full rank;
        ranks below it are zero-padded, which leaves deltas exact)."""
        region = tp.a if which == "a" else tp.b
        rb, per = self.rank_block, self.rank // self.rank_block
        slots = np.arange(self.num_slots)
        start = np.where(slots > 0, (region.row0 + (slots - 1) * tp.experts * self.rank) // rb, 0)
        return PageTable(start=jnp.asarray(start, jnp.int32), stride=jnp.full((self.num_slots,), per, jnp.int32),
                         nblocks=jnp.asarray(np.where(slots > 0, per, 0), jnp.int32), rank_block=rb,
                         max_blocks=per)

    def tables(self, tp: TargetPages) -> tuple[PageTable, PageTable | None]:
        """(A's table, B's table or None when B's pages sit at the same rows as A's)."""
        table_a = self.table(tp, "a")
        return table_a, (None if tp.b.row0 == tp.a.row0 else self.table(tp, "b"))

    def slot_rows(self, tp: TargetPages, which: str, slot) -> jax.Array:
        """Rows of `slot`'s page in a target's arena (traced slot ok)."""
        region = tp.a if which == "a" else tp.b
        n = self.page_rows(tp)
        return region.row0 + (slot - 1) * n + jnp.arange(n)

    # ---- host pages ----

    def host_pages(self, weights: AdapterWeights | None, stage: int, ep_index: int) -> dict:
        """One adapter's rows for one LoRA device: {j: {t: {"a": [E_t * R, D_in], "b": [E_t * R, D_out]}}}
        (numpy, the pool dtype); zeros for None or for targets the adapter leaves out."""
        out = {}
        for j, layer in enumerate(self.layers):
            out[j] = {}
            layer_index = self.plan.layer_index(stage, j)
            for t, tp in layer.items():
                a_rows = np.zeros((self.page_rows(tp), tp.d_in), self.dtype)
                b_rows = np.zeros((self.page_rows(tp), tp.d_out), self.dtype)
                page = None if weights is None else weights.pages.get((layer_index, t))
                if page is not None:
                    a, b = page
                    expert = t.startswith("expert_")
                    if expert:
                        lo = ep_index * tp.experts
                        a, b = a[lo:lo + tp.experts], b[lo:lo + tp.experts]
                    else:
                        a, b = a[None], b[None]
                    r = a.shape[-2]
                    a_t = np.zeros((tp.experts, self.rank, tp.d_in), self.dtype)
                    a_t[:, :r] = a
                    b_t = np.zeros((tp.experts, self.rank, tp.d_out), self.dtype)
                    b_t[:, :r] = b.reshape(tp.experts, r, tp.d_out)
                    a_rows, b_rows = a_t.reshape(-1, tp.d_in), b_t.reshape(-1, tp.d_out)
                out[j][t] = {"a": a_rows, "b": b_rows}
        return out

    # ---- local code (inside the step's shard_map) ----

    def arena(self, block: jax.Array, region: Region) -> jax.Array:
        """A role buffer block ([1, *local]) viewed as the region's arena: a whole-array reshape."""
        return block.reshape(-1, region.width)

    def write(self, blocks: dict[str, jax.Array], j: int, slot, pages: dict, active) -> dict[str, jax.Array]:
        """Write one adapter's pages of LoRA layer slot j into `slot` where `active` (this device is a LoRA
        device); elsewhere every row index is out of range and the scatter drops it (in place, no copy).
        pages: {t: {"a": [E_t * R, D_in], "b": [...]}} device arrays for this device."""
        blocks = dict(blocks)
        for t, tp in self.layers[j].items():
            for which in "ab":
                region = tp.a if which == "a" else tp.b
                shape = blocks[region.buffer].shape
                view = self.arena(blocks[region.buffer], region)
                rows = jnp.where(active & (slot > 0), self.slot_rows(tp, which, slot), view.shape[0])
                view = view.at[rows].set(pages[t][which].astype(view.dtype), mode="drop")
                blocks[region.buffer] = view.reshape(shape)
        return blocks


__all__ = ["Region", "RolePool", "TargetPages"]
