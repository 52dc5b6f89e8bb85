"""Each Mosaic GPU kernel lowered once per process, not once per step program.

A server lowers every step program before traffic (LLMEngine.warmup, tens of programs) and lowering is serial
Python. jax lowers a nested jit once per program, so Pallas rebuilt each kernel's Mosaic module (Pallas ->
Mosaic GPU dialect -> layout inference -> dialect lowering) in every program that launches it: on the CPU
machine 0.18 s per LoRA kernel, ~80% of lowering a program that holds a shrink and an expand, and the part that
persistent compilation caches cannot save (a restart lowers every program again to find its cache key).

`install()` memoizes Pallas's `lower_unpipelined_jaxpr_to_module` (what `plgpu.kernel` kernels lower through):
a kernel's first lowering keeps its result, the module as MLIR bytecode; a later call for the same kernel
parses the bytecode into the calling program's MLIR context instead of lowering again. "The same kernel": the
same traced kernel jaxpr (jit's trace cache hands every program the one object: the kernels are jits of their
own), mesh, shapes, compiler parameters and call-site location, so the module, and the program's HLO, are
identical to a fresh lowering (tests/test_kernel_caches.py compares them). Anything unhashable in a key, or
Mosaic GPU dumps asked for (MOSAIC_GPU_DUMP_*), lowers as before. Up to MAX_ENTRIES kernels are kept (least
recently used first out); the cache holds its jaxprs, so an id is never reused for another kernel.
INFINILORA_MOSAIC_LOWERING_CACHE=off turns it off (for comparison; `on` is the default).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os
import threading

from infinilora_jax.trace_choice import env_choice

ENV_VAR = "INFINILORA_MOSAIC_LOWERING_CACHE"
MODES = ("on", "off")
MAX_ENTRIES = 1024


class _Cache:
    def __init__(self):
        self.entries: collections.OrderedDict = collections.OrderedDict()  # key -> (bytecode, other fields)
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.hits = self.misses = 0


CACHE = _Cache()


def _key(args, kwargs):
    """(kernel jaxpr, mesh, jax mesh, shapes, params, call-site frame) or None when something is unhashable."""
    from jax._src import source_info_util

    gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params = args
    traceback = kwargs.get("outer_traceback")
    frame = source_info_util.user_frame(traceback) if traceback is not None else None
    site = None if frame is None else (frame.file_name, frame.start_line, frame.start_column)
    key = (_Identity(jaxpr), gpu_mesh, jax_mesh, tuple(in_shapes), tuple(out_shapes), params, site,
           tuple(sorted(kwargs.keys())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _Identity:
    """Hashes and compares by identity, and keeps the object alive (its id cannot be reused while cached)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj


def _dumping() -> bool:
    return any(k.startswith("MOSAIC_GPU_DUMP") for k in os.environ)


def _memoized(lower):
    @functools.wraps(lower)
    def lower_unpipelined_jaxpr_to_module(*args, **kwargs):
        from jax._src.lib.mlir import ir

        key = None if _dumping() or len(args) != 6 else _key(args, kwargs)
        if key is None:
            return lower(*args, **kwargs)
        with CACHE.lock:
            entry = CACHE.entries.get(key)
            if entry is not None:
                CACHE.entries.move_to_end(key)
                CACHE.hits += 1
        if entry is not None:
            bytecode, fields = entry
            return dataclasses.replace(fields, module=ir.Module.parse(bytecode))
        result = lower(*args, **kwargs)
        # snapshot now: the caller serializes the module in place (the serde pass) before emitting it
        buffer = io.BytesIO()
        result.module.operation.write_bytecode(buffer)
        with CACHE.lock:
            CACHE.misses += 1
            CACHE.entries[key] = (buffer.getvalue(), dataclasses.replace(result, module=None))
            while len(CACHE.entries) > MAX_ENTRIES:
                CACHE.entries.popitem(last=False)
        return result

    lower_unpipelined_jaxpr_to_module.memoized = True
    return lower_unpipelined_jaxpr_to_module


def install() -> bool:
    """Memoize kernel lowering from now on (idempotent). False when INFINILORA_MOSAIC_LOWERING_CACHE=off or this
    jax has no `lower_unpipelined_jaxpr_to_module`."""
    if env_choice(ENV_VAR, MODES, "on") != "on":
        return False
    from jax._src.pallas.mosaic_gpu import lowering

    current = getattr(lowering, "lower_unpipelined_jaxpr_to_module", None)
    if current is None:
        return False
    if not getattr(current, "memoized", False):
        lowering.lower_unpipelined_jaxpr_to_module = _memoized(current)
    return True


__all__ = ["CACHE", "ENV_VAR", "MAX_ENTRIES", "install"]
