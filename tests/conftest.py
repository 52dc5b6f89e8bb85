"""Every test runs on CPU with 8 fake devices, so each sharding, role and collective path is exercised."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def model_dir(name: str) -> str:
    return os.path.join(FIXTURES, "models", name)


def adapter_dirs(model: str) -> dict[str, str]:
    root = os.path.join(FIXTURES, "adapters", model)
    return {n: os.path.join(root, n) for n in sorted(os.listdir(root))} if os.path.isdir(root) else {}


def variants(model: str) -> list[str]:
    """The reference fixtures' variants of a model: "base" (no adapter), then each adapter's name."""
    return ["base", *adapter_dirs(model)]


def variant_adapter(variant: str) -> str | None:
    """The adapter a request of this variant names (None for "base")."""
    return None if variant == "base" else variant


@functools.cache
def reference(model: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURES, "reference", f"{model}.npz")) as data:
        return dict(data)


@functools.cache
def manifest() -> dict:
    with open(os.path.join(FIXTURES, "manifest.json")) as f:
        return json.load(f)


@functools.cache
def shared_llm(model: str, dtype: str, mesh: str | None):
    """One LLM per (model, dtype, layout) for a test module: loading and compiling dominate test time."""
    from infinilora_jax import LLM

    return LLM(model_dir(model), adapters=adapter_dirs(model), dtype=dtype, mesh=mesh, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each module's LLMs and compiled programs when it ends. XLA:CPU keeps every compiled program's code in
    memory mappings of its own; kept for the whole suite they passed the kernel's per-process limit
    (vm.max_map_count, 65530; test_parity_hf.py alone reaches ~36,000) and LLVM aborted the process
    ("Unable to allocate section memory")."""
    yield
    shared_llm.cache_clear()
    gc.collect()
    jax.clear_caches()
    gc.collect()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
