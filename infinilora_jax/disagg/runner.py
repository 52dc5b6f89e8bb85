"""DisaggRunner: base instances and a LoRA server on one role mesh, with ModelRunner's interface.

The engine (engine/engine.py) drives it exactly as it drives a coupled ModelRunner (dp = 1), or through
disagg/engine.py's InstanceGroup (dp > 1: several base instances, each with its own scheduler and KV pages,
one step for all). The adapter cache is the coupled one (lora/adapter_cache.py: registry, host store, LRU
slots, prefetch, layer-wise loading); only where pages land differs: in the LoRA devices' role buffers.
"""

from __future__ import annotations

import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from tqdm.auto import tqdm

from infinilora_jax.disagg.model import DisaggModel
from infinilora_jax.disagg.pages import RolePool
from infinilora_jax.disagg.roles import (
    PER_DEVICE,
    BufferSpec,
    assemble,
    device_roles,
    kv_specs,
    live_bytes,
    role_of_devices,
    weight_buffers,
    zeros_buffer,
)
from infinilora_jax.disagg.step import DisaggStepFunctions, base_rows
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.runner import StepTokens
from infinilora_jax.engine.sampler import SamplingArrays
from infinilora_jax.errors import ConfigError
from infinilora_jax.lora import staging
from infinilora_jax.lora.adapter_cache import AdapterCache
from infinilora_jax.lora.pool import LoraPoolConfig
from infinilora_jax.models.batch import QueryBlock, StepBatch
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import abstract_factory
from infinilora_jax.models.stages import StagePlan
from infinilora_jax.models.transformer import CausalLM
from meshes.axes import BASE_ROLE, LORA_ROLE, ROLE
from meshes.layouts import RoleLayout, make_mesh, make_role_mesh

log = logging.getLogger(__name__)


class RoleAdapterCache(AdapterCache):
    """The coupled adapter cache, writing pages into the LoRA devices' role buffers (runner.write_slot)."""

    def __init__(self, runner: DisaggRunner, cfg, plan, pool: RolePool, dtype, **kwargs):
        super().__init__(cfg, plan, pool, dtype, **kwargs)
        self.runner = runner

    def _stage(self, weights) -> dict:
        """One adapter's pages (zeros for None), per LoRA layer slot, as staged per-device blocks (lora/staging.py;
        a LoRA device's block holds its stage's layers and expert shard; base devices' blocks are zeros)."""
        return self.runner.stage_pages(weights)

    def _write_now(self, slot: int, name: str | None) -> None:
        start = time.perf_counter()
        self.runner.write_slot(slot, self.staged_pages(name))  # the writer copies the pinned pages in itself
        self.stats.load_seconds += time.perf_counter() - start

    def _commit(self, slot: int, pages: dict) -> None:
        self.runner.write_slot(slot, pages)

    def reload_resident(self) -> None:
        """Pages were lost (a new KV cache): write every resident adapter again before its next use."""
        with self._lock:
            for name, slot in self.slot_of.items():
                self.pending[slot] = name


class KVHandle:
    """What the engine holds as its KV cache: the runner owns the KV role buffers (adapter pages live in the
    LoRA devices' blocks of them), so the engine only needs to know whether they were lost with a failed step."""

    def __init__(self, runner: DisaggRunner):
        self.runner = runner

    def is_deleted(self) -> bool:
        return any(a.is_deleted() for a in self.runner.kv.values())


class DisaggRunner:
    def __init__(self, cfg: ModelConfig, layout: RoleLayout, dtype, make_factory, pool_cfg: LoraPoolConfig, *,
                 max_host_adapters: int = 64, max_adapter_bytes: int | None = None, devices=None,
                 progress: bool = True, rank_block: int = 8, background_loads: bool = False):
        """make_factory(mesh, on_param) -> ParamFactory supplies base weights (as for the coupled ModelRunner);
        they are made on base instance 0's devices and copied to the other instances. background_loads: as for
        ModelRunner."""
        self.cfg, self.layout, self.dtype = cfg, layout, jnp.dtype(dtype)
        layout.check_fits(cfg)
        self.mesh = make_role_mesh(layout, devices)
        base_mesh = make_mesh(layout.base, list(self.mesh.devices[BASE_ROLE, 0].flatten()))
        abstract = CausalLM(cfg, layout.base, jnp.float32, abstract_factory(base_mesh))
        bar = tqdm(total=len(jax.tree.leaves(nnx.state(abstract))), desc="loading weights", unit="tensor",
                   disable=not progress, leave=False)
        model = CausalLM(cfg, layout.base, self.dtype, make_factory(base_mesh, lambda decl: bar.update(1)))
        bar.close()
        self.weights, self.weight_specs = weight_buffers(nnx.to_pure_dict(nnx.state(model)), self.mesh, layout)
        del model
        self.lora_plan = StagePlan.build(cfg.moe_layers, layout.lora_pp)
        self.pool = RolePool(cfg, self.lora_plan, pool_cfg, layout.ep, self.dtype, rank_block)
        self.adapters = RoleAdapterCache(self, cfg, self.lora_plan, self.pool, self.dtype,
                                         max_host_adapters=max_host_adapters, max_adapter_bytes=max_adapter_bytes,
                                         background_loads=background_loads)
        self.model = DisaggModel(cfg, layout, self.pool)
        self.kv_names = [f"kv:{layer}:{which}" for layer in range(cfg.num_layers) for which in "kv"]
        self.steps = DisaggStepFunctions(self.model, self.mesh, list(self.weights), self.kv_names, cfg.vocab_size)
        self.kv: dict[str, jax.Array] = {}
        self.kv_specs: dict[str, BufferSpec] = {}
        self._writer = None
        self._zero_blocks: dict = {}  # base device -> its staged zero block of one adapter's pages (stage_pages)
        self._zero_tokens: dict[int, jax.Array] = {}  # rows_out -> the no-previous-step tokens (_no_tokens)
        log.info("disaggregated: %s", layout.describe())

    # ---- KV pages (and the LoRA devices' arenas in them) ----

    def kv_block(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        cfg = self.cfg
        return (1, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)

    def round_kv_pages(self, num_pages: int, page_size: int) -> int:
        """num_pages, rounded up (by at most 1/8) so a KV block can be viewed as an arena of every page width
        the LoRA server uses: then the LoRA devices' KV blocks hold any target's pages."""
        per_page = math.prod(self.kv_block(1, page_size))
        step = 1
        for width in self.pool.widths():
            step = math.lcm(step, width // math.gcd(width, per_page))
        rounded = -(-num_pages // step) * step
        return rounded if rounded - num_pages <= max(1, num_pages // 8) else num_pages

    def _arenas(self, num_pages: int, page_size: int) -> list[tuple[str, int]]:
        """(buffer, elements) a LoRA device can hold pages in, in order of preference: KV blocks, then weights."""
        block = math.prod(self.kv_block(num_pages, page_size))
        weights = sorted(self.weight_specs.values(), key=lambda s: -s.size)
        return [*((n, block) for n in self.kv_names), *((s.name, s.size) for s in weights)]

    def kv_pages_for_adapters(self, num_pages: int, page_size: int, memory_share: float = 0.9) -> int:
        """The KV cache size to use when none was asked for: at least `num_pages`, and enough that the LoRA
        devices' role buffers (the base role's weights and KV blocks) hold max_adapters adapters. The base
        devices get the extra pages as KV cache. Growth stops at `memory_share` of a device's memory, leaving
        the rest to activations; new_kv_cache then says how many adapters fit."""
        slots = self.pool.pool_cfg.max_adapters
        fits = lambda n: self.pool.fits(self._arenas(self.round_kv_pages(n, page_size), page_size), slots)
        if fits(num_pages):
            return num_pages
        weight_bytes = sum(s.nbytes for s in self.weight_specs.values())
        page_bytes = 2 * self.cfg.num_layers * math.prod(self.kv_block(1, page_size)) * self.dtype.itemsize
        stats = self.mesh.devices.flat[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        most = 1 << 24 if limit is None else max(num_pages, int((memory_share * limit - weight_bytes) // page_bytes))
        if not fits(most):
            return most
        lo, hi = num_pages, most  # fits(hi), not fits(lo)
        while hi - lo > max(1, lo // 64):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        log.info("disaggregated: KV cache grown from %d to %d pages so the LoRA server holds %d adapters",
                 num_pages, hi, slots)
        return hi

    def new_kv_cache(self, cache: CacheConfig) -> KVHandle:
        """Allocate the KV role buffers (zeros) and, the first time, place the LoRA pages in the role buffers.
        Called again after a failed step lost them: adapter pages kept in KV blocks are written again."""
        if any(a.is_deleted() for a in self.weights.values()):
            raise RuntimeError("the base weights (which hold LoRA pages on the LoRA devices) were lost with a "
                               "failed adapter-loading step: create the LLM again")
        block = self.kv_block(cache.num_pages, cache.page_size)
        specs = kv_specs(self.cfg.num_layers, block, self.dtype)
        if self.kv_specs and specs != self.kv_specs:
            raise ConfigError("a disaggregated runner's KV cache shape is fixed once its adapter pages are placed")
        if self.kv and not any(a.is_deleted() for a in self.kv.values()):
            return KVHandle(self)  # several base instances share the KV role buffers (each its devices' blocks)
        self.kv_specs = specs
        self.kv = {n: zeros_buffer(self.mesh, block, self.dtype) for n in self.kv_names}
        if not self.pool.placed:
            self.pool.place(self._arenas(cache.num_pages, cache.page_size))
            log.info("LoRA server: %d adapter slots of rank %d, %.1f MB of pages per LoRA device",
                     self.pool.pool_cfg.max_adapters, self.pool.pool_cfg.max_rank, self.pool.page_bytes() / 2**20)
        else:
            self.adapters.reload_resident()
        return KVHandle(self)

    # ---- adapter pages ----

    def stage_pages(self, weights) -> dict:
        """One adapter's pages for one slot, {j: {t: {"a", "b": [devices, rows, width]}}}, staged (pinned host memory
        by default; PER_DEVICE: each LoRA device's block holds its stage's layer and expert shard). Base devices'
        blocks are zeros the writer drops: one zero block per base device, made once and shared by every staging
        (staging stays one copy of the adapter's own bytes, however many base devices the mesh has)."""
        blocks = []
        for device, role, dp, ep in device_roles(self.mesh):
            if role == LORA_ROLE:
                blocks.append(self._staged_block(self.pool.host_pages(weights, stage=dp, ep_index=ep), device))
            else:
                if device not in self._zero_blocks:
                    zeros = jax.tree.map(np.zeros_like, self.pool.host_pages(None, 0, 0))
                    self._zero_blocks[device] = self._staged_block(zeros, device)
                blocks.append(self._zero_blocks[device])
        kind = staging.memory_kind(self.adapters.staging)
        return jax.tree.map(lambda *per_device: assemble(self.mesh, list(per_device), kind), *blocks)

    def _staged_block(self, host: dict, device) -> dict:
        """Host pages of one device as [1, rows, width] blocks staged for that device (lora/staging.py: in its
        pinned host memory by default)."""
        return staging.stage(jax.tree.map(lambda x: x[None], host), SingleDeviceSharding(device),
                             self.adapters.staging)

    def write_slot(self, slot: int, pages: dict) -> None:
        """Write staged pages into `slot` on the LoRA devices (one jitted, donated update of the role buffers;
        base devices' blocks are untouched: their row indices are out of range and the scatter drops them)."""
        if not self.pool.placed:
            raise RuntimeError("the LoRA pages are placed when the KV cache is allocated (new_kv_cache)")
        if self._writer is None:
            pool, weights_names = self.pool, list(self.weights)
            w_specs = {n: PER_DEVICE for n in weights_names}
            kv_specs_ = {n: PER_DEVICE for n in self.kv_names}

            def local(weights, kv, slot, pages):
                blocks = {**weights, **kv}
                is_lora = jax.lax.axis_index(ROLE) == LORA_ROLE
                for j in range(len(pool.layers)):
                    incoming = jax.tree.map(lambda p: jax.device_put(p, jax.memory.Space.Device)[0], pages[j])
                    blocks = pool.write(blocks, j, slot, incoming, is_lora)
                return {n: blocks[n] for n in weights_names}, {n: blocks[n] for n in self.kv_names}

            self._writer = jax.jit(jax.shard_map(
                local, mesh=self.mesh, in_specs=(w_specs, kv_specs_, jax.sharding.PartitionSpec(), PER_DEVICE),
                out_specs=(w_specs, kv_specs_), check_vma=False), donate_argnums=(0, 1))
        self.weights, self.kv = self._writer(self.weights, self.kv, np.int32(slot), pages)

    # ---- steps (one base instance: the LLMEngine interface) ----

    # `sample` queues the step and returns its tokens on the devices (engine: async scheduling). XLA:GPU reads the
    # role branches' predicates back, but not on the caller's thread: it returns before the device is done
    # (one H200, benchmarks/cond_overhead.py --host_wait; 07-disaggregated.md).
    supports_async = True
    sampler_programs_per_bucket = 0  # the sampler is part of the step program (disagg/step.py)

    def sample(self, batch: StepBatch, kv, sampling: SamplingArrays, rows_out: int, prev: StepTokens | None = None,
               token_src: np.ndarray | None = None) -> tuple[StepTokens, KVHandle]:
        """ModelRunner.sample's interface for base instance 0 (the others idle); its tokens on the devices, per
        device (`fetch`)."""
        step = self.sample_instances([batch], [sampling], rows_out, prev, [token_src], sampling.wants_logprobs)
        return step, KVHandle(self)

    def fetch(self, step: StepTokens) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Instance 0's tokens [rows_out] and logprobs on the host (waits for the step)."""
        tokens, top = self.fetch_instances(step)
        return tokens[0], (None if top is None else tuple(x[0] for x in top))

    def fetch_instances(self, step: StepTokens) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
        """Every base instance's tokens [dp, rows_out] and, when asked, (logprobs [dp, M], top ids [dp, M, K], top
        logprobs) on the host (waits for the step)."""
        pick = lambda a: base_rows(self.layout, np.asarray(a))
        return pick(step.tokens), (None if step.top is None else tuple(pick(x) for x in step.top))

    def score(self, batch: StepBatch, kv) -> tuple[np.ndarray, KVHandle]:
        self.adapters.flush()
        logits, self.kv = self.steps.run("score", self.weights, self.kv, *self._stack([batch]))
        return np.asarray(logits)[0], KVHandle(self)

    def prompt_logprobs(self, batch: StepBatch, kv, targets: np.ndarray) -> tuple[tuple[np.ndarray, ...], KVHandle]:
        self.adapters.flush()
        targets = np.zeros((self.layout.dp, len(targets)), np.int32) + np.asarray(targets, np.int32)[None]
        out, self.kv = self.steps.run("prompt_logprobs", self.weights, self.kv, *self._stack([batch]), targets)
        return tuple(np.asarray(x)[0] for x in out), KVHandle(self)

    # ---- steps (every base instance at once) ----

    def _stack(self, batches: list[StepBatch]) -> tuple[StepBatch, np.ndarray]:
        """Batches of the first instances (the rest idle) -> (leaves stacked over dp, adapter slots [dp, N])."""
        batches = list(batches) + [self.idle_like(batches[0])] * (self.layout.dp - len(batches))
        batch = jax.tree.map(lambda *xs: np.stack(xs), *batches)
        return batch, np.asarray(batch.adapter_slots)

    def idle_like(self, batch: StepBatch) -> StepBatch:
        """A batch of the same shapes that reads and writes nothing (for an instance with no work this step)."""
        n = batch.tokens.shape[0]
        spec = next(iter(self.kv_specs.values()))
        no_slot = spec.shape[1] * spec.shape[2]
        empty = lambda block: QueryBlock(np.full(block.index.shape, n, np.int32),
                                         np.zeros(block.block_tables.shape, np.int32))
        zeros = np.zeros(n, np.int32)
        return StepBatch(zeros, zeros, zeros, np.full(n, no_slot, np.int32), empty(batch.decode),
                         empty(batch.prefill), np.zeros(batch.logits_indices.shape, np.int32))

    def _stack_sampling(self, samplings: list[SamplingArrays], rows: int) -> SamplingArrays:
        idle = SamplingArrays.build([], [], [], rows)
        samplings = list(samplings) + [idle] * (self.layout.dp - len(samplings))
        return jax.tree.map(lambda *xs: np.stack(xs), *samplings)

    def sample_instances(self, batches: list[StepBatch], samplings: list[SamplingArrays], rows_out: int,
                         prev: StepTokens | None = None, token_srcs: list | None = None,
                         logprobs: bool = False) -> StepTokens:
        """Queue one step for every base instance (batches of equal shapes, one per instance, the rest idle):
        tokens [devices, rows_out] on the devices (`fetch_instances`), with (logprobs, top ids, top logprobs) when
        `logprobs`. Instance d's token t is prev's token token_srcs[d][t] where that is >= 0 (tokens of the step
        queued before, not fetched yet). A pending adapter load is carried into the step layer by layer."""
        needed = set(np.unique(np.concatenate([b.adapter_slots for b in batches])).tolist())
        load = self.adapters.take_load(needed)
        batch, all_slots = self._stack(batches)
        sampling = self._stack_sampling(samplings, len(batches[0].logits_indices))
        prev_tokens = prev.tokens if prev is not None else self._no_tokens(rows_out)
        token_src = np.full((self.layout.dp, len(batches[0].tokens)), -1, np.int32)
        for d, src in enumerate(token_srcs or []):
            if src is not None:
                token_src[d] = src
        args = (self.weights, self.kv, batch, all_slots, sampling, prev_tokens, token_src)
        if load is None:
            (tokens, *top), self.kv = self.steps.run("sample", *args)
        else:
            slot, pages = load
            (tokens, *top), self.weights, self.kv = self.steps.run("sample_loading", *args, np.int32(slot), pages)
        return StepTokens(tokens, tuple(top) if logprobs else None)

    def sample_args(self, batch: StepBatch, rows_out: int) -> tuple:
        """The `sample` step's arguments for one instance's batch on every instance, no sampling rows and no
        tokens of a queued step, the role buffers as shapes (to lower or precompile it)."""
        dp = self.layout.dp
        return (*self._state_shapes(), *self._stack([batch] * dp), self._stack_sampling([], len(batch.logits_indices)),
                self._no_tokens(rows_out), np.full((dp, len(batch.tokens)), -1, np.int32))

    def _state_shapes(self) -> tuple:
        """(weights, kv) role buffers as shapes with their shardings (to lower or precompile steps)."""
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            (self.weights, self.kv))

    def _no_tokens(self, rows_out: int) -> jax.Array:
        """The `prev` tokens of a step that takes none: zeros [devices, rows_out], per device."""
        if rows_out not in self._zero_tokens:
            n = self.mesh.devices.size
            self._zero_tokens[rows_out] = jax.device_put(np.zeros((n, rows_out), np.int32),
                                                         jax.sharding.NamedSharding(self.mesh, PER_DEVICE))
        return self._zero_tokens[rows_out]

    def score_instances(self, batches: list[StepBatch]) -> np.ndarray:
        """float32 logits [dp, M, vocab] of one step over every instance's batch."""
        self.adapters.flush()
        logits, self.kv = self.steps.run("score", self.weights, self.kv, *self._stack(batches))
        return np.asarray(logits)

    def precompile(self, batches: list[StepBatch], score_batches: list[StepBatch] = (), workers: int = 8,
                   on_done=None, rows_out: int | None = None) -> int:
        """Compile ahead of time the programs `sample` (with and without a carried adapter load; the sampler is
        part of them), `score` and `prompt_logprobs` may run for these (one instance's) batch shapes, the sampled
        tokens padded to rows_out rows (default: each batch's sampling rows)."""
        dp = self.layout.dp
        w, kv = self._state_shapes()
        slot, pages = self.adapters.warmup_load()  # one no-op load serves every shape
        calls = []
        for batch in batches:
            args = self.sample_args(batch, rows_out or len(batch.logits_indices))
            calls.append(("sample", args))
            calls.append(("sample_loading", (*args, np.int32(slot), pages)))
        for batch in score_batches:
            stacked = self._stack([batch] * dp)
            calls.append(("score", (w, kv, *stacked)))
            calls.append(("prompt_logprobs", (w, kv, *stacked, np.zeros((dp, len(batch.logits_indices)), np.int32))))
        self.steps.precompile(calls, workers, on_done)
        return len(calls)

    # ---- memory ----

    def live_bytes_per_device(self) -> dict[str, int]:
        return live_bytes((self.weights, self.kv))

    def bytes_by_role(self) -> list[dict]:
        """Per device: its role and what its role buffer bytes hold. Base: weights and KV pages. LoRA: adapter
        pages (every slot's region) and arena space no region uses. Every device holds the same buffers."""
        live = self.live_bytes_per_device()
        weights = sum(s.nbytes for s in self.weight_specs.values())
        kv = sum(s.nbytes for s in self.kv_specs.values())
        pages = self.pool.page_bytes() if self.pool.placed else 0
        rows = []
        for device, role, dp, ep in device_roles(self.mesh):
            row = {"device": str(device), "role": "base" if role == BASE_ROLE else "lora", "dp": dp, "ep": ep,
                   "live_bytes": live.get(str(device), 0)}
            if role == BASE_ROLE:
                row.update(base_weights=weights, kv_pages=kv)
            else:
                row.update(adapter_pages=pages, free_arena=weights + kv - pages)
            rows.append(row)
        return rows

    def roles(self) -> dict[str, str]:
        return role_of_devices(self.mesh)


__all__ = ["DisaggRunner", "KVHandle", "RoleAdapterCache"]
