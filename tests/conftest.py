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


# pytest-xdist (pyproject's addopts run the suite on 2 workers; `-n 0` runs it in one process). Each test file runs
# whole on one worker, so its module-scoped LLMs load and compile once; the files of the session-wide server
# (server_support.shared_server) run together on one worker, so it is built once; and the slowest files start
# first, so that the workers finish together.
SHARED_SERVER_FILES = {"test_server.py", "test_server_fuzz.py", "test_server_load.py", "test_server_security.py"}
# Rough seconds of each slow file (the server files together) in a 2-worker run on CI's 2-core machine: only their
# order matters; files not listed start after these, in collection order.
SLOW_FILES = {
    "test_parity_hf.py": 530,
    "test_disagg.py": 340,
    "test_server*": 250,
    "test_replicas.py": 250,
    "test_gpu_block_tables.py": 190,
    "test_engine.py": 180,
    "test_disagg_push.py": 120,
    "test_pallas_kernels.py": 95,
    "test_attention.py": 85,
    "test_gpu_kernels.py": 75,
    "test_slo.py": 60,
    "test_grouped_matmul.py": 50,
    "test_llm_api.py": 50,
    "test_slot_ranks.py": 40,
    "test_orbax_store.py": 30,
    "test_background_loads.py": 30,
    "test_adapter_errors.py": 25,
    "test_colab_notebook.py": 25,
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # the default under -n; another --dist given explicitly is kept
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlowFilesFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = os.path.basename(nodeid.split("::", 1)[0])
            return "test_server*" if file in SHARED_SERVER_FILES else file

        def _assign_work_unit(self, node) -> None:
            slowest = max(self.workqueue, key=lambda scope: SLOW_FILES.get(scope, 0))  # the first of equals
            self.workqueue.move_to_end(slowest, last=False)
            super()._assign_work_unit(node)

    return SlowFilesFirst(config, log)
