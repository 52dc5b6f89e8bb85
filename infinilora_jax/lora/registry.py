"""Adapter registry: adapter name -> pool slot, with all-or-nothing loading.

A load reads and validates the whole adapter on the host, assembles its pages, and writes them into a free
slot; only when that write has returned is the name registered. Any failure before that leaves the registry
and every resident adapter exactly as they were.
"""

from __future__ import annotations

import logging
import re
import threading

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from infinilora_jax.errors import AdapterCapacityError, AdapterError, AdapterNotFoundError
from infinilora_jax.loading.peft_adapter import AdapterWeights, load_peft_adapter
from infinilora_jax.lora.pool import LoraPool, adapter_pages, make_slot_writer
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.stages import StagePlan

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class AdapterRegistry:
    def __init__(self, cfg: ModelConfig, plan: StagePlan, pool: LoraPool, mesh: Mesh, dtype,
                 max_adapter_bytes: int | None = None):
        self.cfg, self.plan, self.pool = cfg, plan, pool
        self.pool_state = nnx.state(pool)
        self.dtype = np.dtype(dtype)
        self.max_adapter_bytes = max_adapter_bytes
        self._write = make_slot_writer(pool, mesh)
        self._slots: dict[str, int] = {}
        self._weights: dict[str, AdapterWeights] = {}
        self._lock = threading.Lock()

    @property
    def max_adapters(self) -> int:
        return self.pool.pool_cfg.max_adapters

    def names(self) -> list[str]:
        return list(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def info(self, name: str) -> AdapterWeights:
        return self._weights[self._require(name)]

    def slot(self, name: str | None) -> int:
        """Pool slot of a registered adapter; 0 for None (the base model)."""
        return 0 if name is None else self._slots[self._require(name)]

    def _require(self, name: str) -> str:
        if name not in self._slots:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded; loaded: {sorted(self._slots)}")
        return name

    def load(self, name: str, path: str) -> int:
        """Load a PEFT adapter directory under `name`; returns its slot. All or nothing."""
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise AdapterError(f"invalid adapter name {name!r}: use 1-128 characters from [A-Za-z0-9._:/-], "
                               "starting with a letter or digit", field="name")
        weights = load_peft_adapter(path, self.cfg, max_rank=self.pool.pool_cfg.max_rank, dtype=self.dtype,
                                    name=name, max_bytes=self.max_adapter_bytes)
        pages = adapter_pages(self.pool, self.plan, weights)
        with self._lock:
            if name in self._slots:
                raise AdapterError(f"an adapter named {name!r} is already loaded", path=path, field="name")
            used = set(self._slots.values())
            free = next((s for s in range(1, self.max_adapters + 1) if s not in used), None)
            if free is None:
                raise AdapterCapacityError(f"all {self.max_adapters} adapter slots are in use; unload one first")
            self.pool_state = self._write(self.pool_state, np.int32(free), pages)
            jax.block_until_ready(self.pool_state)
            self._slots[name], self._weights[name] = free, weights
        log.info("loaded adapter %s (r=%d, %.1f MB) from %s into slot %d", name, weights.rank, weights.nbytes / 2**20,
                 path, free)
        return free

    def unload(self, name: str) -> None:
        """Forget an adapter. Its slot's pages are zeroed so a stale slot id can never apply it."""
        with self._lock:
            slot = self._slots[self._require(name)]
            zeros = jax.tree.map(lambda a: np.zeros(a.shape[:1] + a.shape[2:], a.dtype),
                                 nnx.to_pure_dict(self.pool_state))
            self.pool_state = self._write(self.pool_state, np.int32(slot), zeros)
            del self._slots[name], self._weights[name]
