"""infinilora_jax/compilation_cache.py: where the cache lives, and that enabling it really writes compiled
programs to disk (in a fresh process: jax fixes its cache when a process first compiles)."""

import os
import subprocess
import sys

from infinilora_jax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_dir() == str(tmp_path / "infinilora_jax" / "xla")
    monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compilation_cache.default_dir() == str(tmp_path / "mine")


def test_enable_off_for_empty_path():
    assert compilation_cache.enable("") is None and compilation_cache.enable(None) is None


def test_unwritable_directory_leaves_the_cache_off_with_a_warning(tmp_path, caplog):
    """A server whose cache directory cannot be created (here: a file is in the way) still starts, uncached."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level("WARNING"):
        assert compilation_cache.enable(str(blocker / "xla")) is None
    assert "compilation cache off" in caplog.text


def test_enabled_cache_is_written_and_read_back(tmp_path):
    """A second process compiling the same program finds it in the cache (jax counts a hit)."""
    script = f"""
import jax, jax.numpy as jnp
from jax._src import monitoring
from infinilora_jax import compilation_cache
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
compilation_cache.enable({str(tmp_path)!r}, min_compile_secs=0)
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()), len(hits))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert os.listdir(tmp_path), "nothing was written to the cache"
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    value, hits = first.stdout.split()
    value2, hits2 = second.stdout.split()
    assert value == value2 and int(hits) == 0 and int(hits2) >= 1
