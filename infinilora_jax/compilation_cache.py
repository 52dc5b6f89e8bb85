"""jax's persistent compilation cache: compiled engine programs kept on disk, so a restarted server (or a
benchmark's second run) loads its step programs instead of compiling them again. An 8-layer Qwen3-30B-A3B-width
engine takes ~4 minutes to compile on an H200 (docs/benchmarks.md), and the layers are unrolled, so a full-depth
model takes longer. Entries are keyed by program, jax/XLA version and device kind; the device assignment is part
of the key on CPU and TPU, not on GPU (there another device of the same kind loads the program: engine/replicas.py
relies on it). A directory that cannot be written leaves the cache off with a warning: a server starts anyway."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV_VAR = "INFINILORA_COMPILATION_CACHE"


def default_dir() -> str:
    """$INFINILORA_COMPILATION_CACHE, else $XDG_CACHE_HOME/infinilora_jax/xla (~/.cache/... without it)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "infinilora_jax", "xla")


def enable(path: str | None, min_compile_secs: float = 1.0) -> str | None:
    """Cache programs that took at least `min_compile_secs` to compile under `path` (None or "": leave the cache
    off). Returns the directory used, or None when the cache stays off (also when `path` cannot be written)."""
    if not path:
        return None
    import jax

    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {path}")
    except OSError as e:
        log.warning("compilation cache off: cannot use %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


__all__ = ["ENV_VAR", "default_dir", "enable"]
