"""The adapter cache: registered adapters -> host store (LRU) -> device pool slots (LRU, reference-counted).

Three tiers, as in S-LoRA and sglang's registry -> manager -> memory pool:
  registered  every adapter a request may name (name -> PEFT directory), validated when registered;
  host store  converted AdapterWeights in host memory, at most `max_host_adapters`, least recently used
              dropped first (re-read from disk on the next use); with each, once it has been loaded, its pool
              pages staged in pinned host memory, so loading it again is one DMA per layer;
  device      `max_adapters` pool slots; an adapter is resident while it sits in a slot. A slot whose adapter
              is in use by a running request (refcount > 0) is never evicted; otherwise the least recently used
              resident adapter makes room.

Registration is all-or-nothing: the adapter is read, validated and converted before its name exists, so a bad
adapter leaves everything as it was.

Loading into a slot is layer-wise (`layerwise=True`): taking a slot only records a pending load; before the next
step the runner takes one pending load (`take_load`), stages its pages in pinned host memory, and the step itself
copies them to the device layer by layer (models/step.py `sample_loading`), so the request's first layers run
while later layers' pages are still in flight. Any other pending load that step needs is written first with a
jitted, donated update per layer slot (`flush`); prefetched loads nobody needs yet wait for a later step.
Either way the step that first uses an adapter waits for its copy, and with it every request in that batch
(~200 ms for a 2.5 GB adapter over PCIe).

Background loading (`background_loads=True`) takes the load out of the steps: taking a slot starts the
host-to-device copy of the adapter's staged pages into buffers of their own (`loading`), which no step reads, so
steps go on while it is in flight; the scheduler leaves the requests that need it queued, holding their slot
(`is_ready`), and once the copy has landed `poll_loads` commits it into the slot with a device-to-device write.
An adapter not yet staged is first read (from disk if the host store dropped it), converted and staged on a
loader thread, so the engine thread never waits for host work either. A read that fails there fails the load:
the slot is unmapped and the requests holding it get AdapterLoadError when the scheduler next reaches them
(`raise_if_failed`). `min_load_seconds` holds a load back at least that long (benchmarks emulate a slower link
with it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import re
import threading
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from infinilora_jax.errors import AdapterError, AdapterLoadError, AdapterNotFoundError
from infinilora_jax.loading.peft_adapter import AdapterWeights, load_peft_adapter
from infinilora_jax.lora import staging
from infinilora_jax.lora.pool import LoraPool, adapter_pages, check_fits, make_layer_writer
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.stages import StagePlan
from infinilora_jax.models.step import drop_slot_dim

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class AdapterBusyError(AdapterError):
    """The adapter is in use by running requests (unload refused)."""


@dataclasses.dataclass
class AdapterStats:
    hits: int = 0  # acquire found the adapter resident
    misses: int = 0  # acquire had to load it into a slot
    evictions: int = 0  # a resident adapter was dropped to make room
    loads: int = 0  # writes of an adapter into a device slot
    disk_reads: int = 0  # adapters (re)read from disk into the host store
    load_seconds: float = 0.0  # host time spent assembling and dispatching slot writes
    layerwise_loads: int = 0  # loads copied in by the step that first used them


@dataclasses.dataclass
class BackgroundLoad:
    name: str
    pages: dict | None  # the adapter's pages, per layer slot, being copied into device buffers of their own
    started: float  # time.monotonic()
    preparing: concurrent.futures.Future | None = None  # the loader thread reading and staging it (then pages)


class AdapterCache:
    def __init__(self, cfg: ModelConfig, plan: StagePlan, pool: LoraPool, dtype, *,
                 max_host_adapters: int = 64, max_adapter_bytes: int | None = None, layerwise: bool = True,
                 background_loads: bool = False):
        self.cfg, self.plan, self.pool = cfg, plan, pool
        # What the step functions read (a pool that is not an nnx module keeps its pages elsewhere and
        # overrides the device writes: disagg/runner.py).
        self.pool_state = nnx.to_pure_dict(nnx.state(pool)) if isinstance(pool, nnx.Module) else None
        self.dtype = np.dtype(dtype)
        self.max_host_adapters = max_host_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self._write_layer = make_layer_writer()
        self.layerwise = layerwise
        self.background_loads = background_loads
        self.loading: dict[int, BackgroundLoad] = {}  # slot -> its load in flight (background loads)
        self.failed_loads: dict[str, str] = {}  # adapter -> why its background load failed (while requests hold it)
        self._loader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.min_load_seconds = 0.0
        self.pending: collections.OrderedDict[int, str | None] = collections.OrderedDict()  # slot -> adapter
        self.staged: dict[str | None, dict] = {}  # adapter (None: zeros) -> its staged pages (lora/staging.py)
        self.staging = staging.staging_mode()  # where staged pages live (pinned host memory by default)
        self._host_shardings = None
        self.paths: dict[str, str | None] = {}  # registered name -> directory (None: given in memory)
        self.host: collections.OrderedDict[str, AdapterWeights] = collections.OrderedDict()  # LRU order
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # resident, LRU order
        self.refcount: collections.Counter[str] = collections.Counter()
        self.stats = AdapterStats()
        self._lock = threading.RLock()

    @property
    def max_adapters(self) -> int:
        return self.pool.pool_cfg.max_adapters

    def names(self) -> list[str]:
        with self._lock:  # may be called from another thread than the one registering
            return list(self.paths)

    def path(self, name: str) -> str | None:
        """The directory a registered adapter was read from (None: given in memory)."""
        with self._lock:
            return self.paths[self.require(name)]

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def info(self, name: str) -> AdapterWeights:
        return self._host_weights(self.require(name))

    def require(self, name: str) -> str:
        """The name, if registered; else AdapterNotFoundError listing the registered ones."""
        if name not in self.paths:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {sorted(self.paths)}")
        return name

    # ---- registration ----

    def register(self, name: str, path: str) -> None:
        """Validate and convert the adapter at `path` and register it under `name`. All or nothing."""
        check_adapter_name(name)
        self._add(name, os.path.abspath(path), self._read(name, path))

    def register_weights(self, weights: AdapterWeights) -> None:
        """Register an adapter given in memory (generated, or trained in this process). It has no file to be
        re-read from, so it stays in the host store until unregistered."""
        check_adapter_name(weights.name)
        self._add(weights.name, None, weights)

    def _add(self, name: str, path: str | None, weights: AdapterWeights) -> None:
        check_fits(self.pool, self.plan, weights)
        with self._lock:
            if name in self.paths:
                raise AdapterError(f"an adapter named {name!r} is already loaded", path=path, field="name")
            self.paths[name] = path
            self._store(name, weights)
        log.info("registered adapter %s (r=%d, %.1f MB) from %s", name, weights.rank, weights.nbytes / 2**20,
                 path or weights.path)

    def unregister(self, name: str) -> None:
        """Forget an adapter; refused while requests use it. Its slot is zeroed."""
        with self._lock:
            self.require(name)
            if self.refcount[name] > 0:
                raise AdapterBusyError(f"adapter {name!r} is in use by {self.refcount[name]} running request(s)",
                                       field="name")
            if name in self.slot_of:
                self._write_slot(self.slot_of.pop(name), None)
            self.host.pop(name, None)
            self.staged.pop(name, None)
            del self.paths[name]

    # ---- residency ----

    def acquire(self, name: str | None) -> int | None:
        """Pin `name` in a device slot for a request and return the slot (0 for no adapter); None if every slot
        is pinned by running requests (the caller retries later)."""
        if name is None:
            return 0
        with self._lock:
            self.require(name)
            self.raise_if_failed(name)  # its load failed while other requests still hold it (else: try again)
            if name in self.slot_of:
                self.stats.hits += 1
                self.slot_of.move_to_end(name)
            else:
                if not self.background_loads:  # (background: the loader thread reads, and a failure unmaps)
                    self._readable(name)  # before a slot is taken: a failed read must map no slot to it
                slot = self._free_slot()
                if slot is None:
                    return None
                self.stats.misses += 1
                self._write_slot(slot, name)
                self.slot_of[name] = slot
            self.refcount[name] += 1
            return self.slot_of[name]

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self._lock:
            if self.refcount[name] <= 0:
                raise RuntimeError(f"release of adapter {name!r} without a matching acquire")
            self.refcount[name] -= 1
            if self.refcount[name] == 0:
                self.failed_loads.pop(name, None)

    def raise_if_failed(self, name: str | None) -> None:
        """AdapterLoadError if `name`'s background load failed (for requests holding its slot)."""
        error = self.failed_loads.get(name) if name is not None else None
        if error is not None:
            raise AdapterLoadError(error)

    def prefetch(self, names: list[str | None]) -> None:
        """Bring queued requests' adapters into the host store, and into free (never evicting) device slots."""
        with self._lock:
            for name in names:
                if name is None or name not in self.paths or name in self.slot_of:
                    continue
                if not self.background_loads:  # (background: the loader thread reads it, off this thread)
                    try:
                        self._host_weights(name)  # read ahead even when no slot is free
                    except AdapterError as e:  # its request fails when admitted (acquire), with this error
                        log.warning("read-ahead of adapter %s failed: %s", name, e)
                        continue
                free = self._unused_slot()
                if free is not None:
                    self._write_slot(free, name)
                    self.slot_of[name] = free
                    self.slot_of.move_to_end(name, last=False)  # prefetched: first to go if unused

    def _unused_slot(self) -> int | None:
        used = set(self.slot_of.values())
        return next((s for s in range(1, self.max_adapters + 1) if s not in used), None)

    def _free_slot(self) -> int | None:
        """An unused slot, else the least recently used unpinned one (evicting its adapter), else None."""
        free = self._unused_slot()
        if free is not None:
            return free
        victim = next((n for n in self.slot_of if self.refcount[n] == 0), None)  # least recently used first
        if victim is None:
            return None
        self.stats.evictions += 1
        return self.slot_of.pop(victim)

    # ---- host store ----

    def _read(self, name: str, path: str) -> AdapterWeights:
        self.stats.disk_reads += 1
        return load_peft_adapter(path, self.cfg, max_rank=self.pool.pool_cfg.max_rank, dtype=self.dtype, name=name,
                                 max_bytes=self.max_adapter_bytes)

    def _store(self, name: str, weights: AdapterWeights) -> None:
        self.host[name] = weights
        self.host.move_to_end(name)
        # least recently used first; never one whose slot load is still pending (the step that carries it
        # stages it from here: re-reading it then could fail after its slot was taken)
        keep = {name, *self.pending.values()}  # and never the one just stored (the caller is about to use it)
        droppable = [n for n in self.host if self.paths.get(n) is not None and n not in keep]
        while len(self.host) > self.max_host_adapters and droppable:
            dropped = droppable.pop(0)
            del self.host[dropped]
            self.staged.pop(dropped, None)

    def _readable(self, name: str) -> None:
        """Make sure the adapter is in the host store, reading it again if it was dropped; a read that fails
        (the directory changed or vanished since registration) raises AdapterLoadError."""
        if name not in self.host:
            self._store(name, self._read_again(name, self.paths[name]))

    def _read_again(self, name: str, path: str | None) -> AdapterWeights:
        """A registered adapter read from its directory again; AdapterLoadError if that fails."""
        try:
            return self._read(name, path)
        except AdapterError as e:
            raise AdapterLoadError(f"adapter {name!r} could not be read again: {e}") from e

    def _host_weights(self, name: str) -> AdapterWeights:
        weights = self.host.get(name)
        if weights is None:
            weights = self._read(name, self.paths[name])
            self._store(name, weights)
        self.host.move_to_end(name)
        return weights

    # ---- device writes ----

    def _write_slot(self, slot: int, name: str | None) -> None:
        """Put adapter `name` (zeros for None) into `slot`: now, as a pending layer-wise load, or as a background
        load. A load still in flight into the slot is dropped (its adapter was evicted or unregistered)."""
        self.loading.pop(slot, None)
        if name is not None:
            self.stats.loads += 1
        if self.background_loads and name is not None:
            self.pending.pop(slot, None)
            staged = self.staged.get(name)
            if staged is not None:
                self.loading[slot] = BackgroundLoad(name, self._to_device(staged), time.monotonic())
            else:  # read, convert and stage it on the loader thread; this thread goes on
                self.loading[slot] = BackgroundLoad(name, None, time.monotonic(),
                                                    self._loader().submit(self._prepare, name))
        elif self.layerwise:
            self.pending[slot] = name
            self.pending.move_to_end(slot)
        else:
            self._write_now(slot, name)

    def is_ready(self, slot: int) -> bool:
        """Whether a step may read `slot` (no background load into it is in flight)."""
        return slot not in self.loading

    def poll_loads(self) -> int:
        """Commit the background loads whose copies have landed (and are at least `min_load_seconds` old); returns
        how many are still in flight."""
        with self._lock:
            now = time.monotonic()
            for slot, load in list(self.loading.items()):
                if load.preparing is not None:
                    if not load.preparing.done():
                        continue
                    if load.preparing.exception() is not None:
                        self._fail_load(slot, load, load.preparing.exception())
                        continue
                    load.pages, load.preparing = load.preparing.result(), None
                if now - load.started >= self.min_load_seconds and all(
                        x.is_ready() for x in jax.tree.leaves(load.pages)):
                    del self.loading[slot]
                    start = time.perf_counter()
                    self._commit(slot, load.pages)
                    self.stats.load_seconds += time.perf_counter() - start
            return len(self.loading)

    def wait_for_load(self) -> None:
        """Block until the oldest background load has landed, and commit what has."""
        with self._lock:
            load = next(iter(self.loading.values()), None)
        if load is not None:
            preparing = load.preparing
            if preparing is not None:
                concurrent.futures.wait([preparing])
            pages = load.pages if preparing is None else (None if preparing.exception() else preparing.result())
            if pages is not None:
                jax.block_until_ready(pages)
                time.sleep(max(0.0, load.started + self.min_load_seconds - time.monotonic()))
        self.poll_loads()

    # ---- the loader thread (background loads of adapters not yet staged) ----

    def _loader(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._loader_pool is None:
            self._loader_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        return self._loader_pool

    def _prepare(self, name: str) -> dict:
        """On the loader thread: the adapter read (from disk if the host store dropped it), converted, staged in
        pinned host memory (kept as for any load) and its copy to the device started. The cache's lock is held
        only to look up and to store, never while reading or staging."""
        with self._lock:
            if name not in self.paths:  # unregistered before this ran (its load was dropped with it)
                raise AdapterLoadError(f"adapter {name!r} was unregistered while loading")
            weights, path = self.host.get(name), self.paths[name]
        if weights is None:
            weights = self._read_again(name, path)
        staged = self._stage(weights)
        with self._lock:
            # keep it as a synchronous load would, unless the name was unregistered (or registered anew)
            # meanwhile: the new adapter must not inherit these pages
            same = name in self.paths and self.paths[name] == path and self.host.get(name) in (None, weights)
            if same:
                if name not in self.host:
                    self._store(name, weights)
                self.staged[name] = staged
        return self._to_device(staged)

    def _fail_load(self, slot: int, load: BackgroundLoad, error: BaseException) -> None:
        """A background load whose read failed: its slot maps to nothing, and the requests holding it fail."""
        del self.loading[slot]
        if self.slot_of.get(load.name) == slot:
            del self.slot_of[load.name]
        message = str(error) if isinstance(error, AdapterLoadError) else (
            f"adapter {load.name!r} could not be loaded: {type(error).__name__}: {error}")
        log.warning("background load failed: %s", message)
        if self.refcount[load.name] > 0:
            self.failed_loads[load.name] = message

    def take_load(self, needed_slots) -> tuple[int, dict] | None:
        """Before a step reading `needed_slots`: the one pending load the step should copy in layer by layer, as
        (slot, pages staged in pinned host memory, per layer slot), or None. Other needed pending loads are
        written now; pending loads the step does not need stay pending (at most one is carried per step)."""
        with self._lock:
            needed = [s for s in self.pending if s in needed_slots]
            carried = needed[-1] if needed else next(iter(self.pending), None)
            for slot in needed[:-1]:
                self._write_now(slot, self.pending.pop(slot))
            if carried is None:
                return None
            start = time.perf_counter()
            staged = self.staged_pages(self.pending.pop(carried))
            self.stats.layerwise_loads += 1
            self.stats.load_seconds += time.perf_counter() - start
            return carried, staged

    def warmup_load(self) -> tuple[int, dict]:
        """A load that changes nothing (zeros into slot 0, which is all zeros), to compile the loading programs;
        also compiles the eager slot writer the same way."""
        self._write_now(0, None)
        return 0, self.staged_pages(None)

    def flush(self) -> None:
        """Write every pending load now and wait for the background loads (before a step that cannot carry
        one)."""
        while self.poll_loads():
            self.wait_for_load()
        with self._lock:
            while self.pending:
                slot, weights = self.pending.popitem(last=False)
                self._write_now(slot, weights)

    def _staging_shardings(self):
        """Pinned-host shardings of one adapter's pages: the pool's, without the slot dimension."""
        if self._host_shardings is None:
            def host(buf):
                return NamedSharding(buf.sharding.mesh, drop_slot_dim(buf.sharding.spec), memory_kind="pinned_host")
            self._host_shardings = jax.tree.map(host, self.pool_state["layers"])
        return self._host_shardings

    def staged_pages(self, name: str | None) -> dict:
        """Adapter `name`'s pages for one pool slot (zeros for None), per layer slot, staged (lora/staging.py: in
        pinned host memory by default) once and kept while the adapter stays in the host store."""
        pages = self.staged.get(name)
        if pages is None:
            pages = self._stage(None if name is None else self._host_weights(name))
            self.staged[name] = pages
        return pages

    def _stage(self, weights: AdapterWeights | None) -> dict:
        """One adapter's pool pages (zeros for None), per layer slot, staged (pinned host memory by default)."""
        return staging.stage(adapter_pages(self.pool, self.plan, weights)["layers"], self._staging_shardings(),
                             self.staging)

    def _write_now(self, slot: int, name: str | None) -> None:
        start = time.perf_counter()
        self._commit(slot, self._to_device(self.staged_pages(name)))
        self.stats.load_seconds += time.perf_counter() - start

    @staticmethod
    def _to_device(staged: dict) -> dict:
        """Staged pages copied to device memory (dispatched asynchronously: the copy runs while steps do)."""
        return jax.device_put(staged, jax.tree.map(lambda a: a.sharding.with_memory_kind("device"), staged))

    def _commit(self, slot: int, pages: dict) -> None:
        """Write one adapter's pages (per layer slot) into `slot` of the pool: a jitted, donated update per layer
        slot."""
        layers = self.pool_state["layers"]
        for j in range(self.plan.layers_per_stage):
            layers[j] = self._write_layer(layers[j], np.int32(slot), pages[j])


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):  # fullmatch: `$` passes a trailing \n
        raise AdapterError(f"invalid adapter name {name!r}: use 1-128 characters from [A-Za-z0-9._:/-], "
                           "starting with a letter or digit", field="name")


__all__ = ["AdapterBusyError", "AdapterCache", "AdapterStats", "check_adapter_name"]
