"""Content-derived names for Mosaic GPU kernels: one kernel in several step programs is compiled once.

Mosaic GPU names each module it lowers `<function>_<n>`, n from a process-wide counter, and stores the name in
the module (attribute `mosaic_gpu.dump_basename`, set by the dialect's `get_or_set_dump_options` when absent).
That attribute is part of the bytes whose SHA-256 is the custom call's `kernel_hash`, and the XLA custom call
compiles and caches kernels by that hash. So the same LoRA shrink, expand or expert GEMM in two step programs
(decode at two KV widths, prefill chunks of one size, the engine's ~80 programs) was compiled once per program,
and a program's HLO, hence its persistent-compilation-cache key, depended on how many kernels the process had
lowered before it (a restarted server that compiled in another order missed the cache).

`install()` wraps `get_or_set_dump_options` so that a module without the attribute first gets
`<function>_<16 hex digits of the SHA-256 of its text>`; Mosaic GPU then keeps that name. Identical kernels get
identical names (and hashes), different kernels different ones; MOSAIC_GPU_DUMP_TO dumps are named by content.
INFINILORA_MOSAIC_KERNEL_NAMES=counter leaves jax's numbering alone (for comparison; `content` is the default).
"""

from __future__ import annotations

import functools
import hashlib

from infinilora_jax.trace_choice import env_choice

ENV_VAR = "INFINILORA_MOSAIC_KERNEL_NAMES"
MODES = ("content", "counter")
BASENAME_ATTR = "mosaic_gpu.dump_basename"  # jaxlib/mosaic/gpu/dump.cc kDumpBasenameAttr


def content_name(module) -> str:
    """`<module's sym_name>_<16 hex of the SHA-256 of its text>` (the text holds no location info)."""
    from jax._src.lib.mlir import ir

    attrs = module.operation.attributes
    name = ir.StringAttr(attrs["sym_name"]).value if "sym_name" in attrs else "mosaic_gpu_module"
    return f"{name}_{hashlib.sha256(str(module).encode()).hexdigest()[:16]}"


def _named_first(get_or_set):
    @functools.wraps(get_or_set)
    def get_or_set_dump_options(module):
        from jax._src.lib.mlir import ir

        attrs = module.operation.attributes
        if BASENAME_ATTR not in attrs:
            attrs[BASENAME_ATTR] = ir.StringAttr.get(content_name(module))
        return get_or_set(module)

    get_or_set_dump_options.content_named = True
    return get_or_set_dump_options


def install() -> bool:
    """Name Mosaic GPU modules by content from now on (idempotent). False where this jax has no
    `get_or_set_dump_options` (older jaxlibs number no modules) or INFINILORA_MOSAIC_KERNEL_NAMES=counter."""
    if env_choice(ENV_VAR, MODES, "content") != "content":
        return False
    from jax.experimental.mosaic.gpu import core

    dialect = core.dialect  # the module both core.lower_mgpu_module and Pallas's lowering call through
    current = getattr(dialect, "get_or_set_dump_options", None)
    if current is None:
        return False
    if not getattr(current, "content_named", False):
        dialect.get_or_set_dump_options = _named_first(current)
    return True


__all__ = ["BASENAME_ATTR", "ENV_VAR", "content_name", "install"]
