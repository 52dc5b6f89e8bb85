"""jax's persistent compilation cache: compiled engine programs kept on disk, so a restarted server (or a
benchmark's second run) loads its step programs instead of compiling them again. An 8-layer Qwen3-30B-A3B-width
engine takes ~4 minutes to compile on an H200 (docs/benchmarks.md), and the layers are unrolled, so a full-depth
model takes longer. Entries are keyed by program, jax/XLA version and device kind; a program built for another
device of the same kind is a miss (device assignment is part of the key)."""

from __future__ import annotations

import os

ENV_VAR = "INFINILORA_COMPILATION_CACHE"


def default_dir() -> str:
    """$INFINILORA_COMPILATION_CACHE, else $XDG_CACHE_HOME/infinilora_jax/xla (~/.cache/... without it)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "infinilora_jax", "xla")


def enable(path: str | None, min_compile_secs: float = 1.0) -> str | None:
    """Cache programs that took at least `min_compile_secs` to compile under `path` (None or "": leave the cache
    off). Returns the directory used."""
    if not path:
        return None
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


__all__ = ["ENV_VAR", "default_dir", "enable"]
