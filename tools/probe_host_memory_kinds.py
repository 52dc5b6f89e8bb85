"""Which host-memory transfers survive an XLA setting (one process per case: a crash costs one row).

Why: `--xla_gpu_command_buffer_update_mode=SKIP_TEMP` (stable addresses for the CUDA graph, so XLA need not
update it every step) makes XLA switch to its VMM allocator, and on one H200 (jax 0.11.2, fifteenth session)
the engine then died in `jax.device_put` of an adapter's pages into pinned host memory (segfault). This runs
each transfer the engine makes on its own, under the given XLA_FLAGS:
  np->device        device_put of a numpy array to device memory
  np->pinned        ... to pinned host memory (adapter staging: lora/adapter_cache.py)
  dev->pinned       a device array to pinned host memory
  np->unpinned      ... to unpinned host memory
  pinned->in-jit    a pinned-host array read inside a jitted program (layer-wise loading's copies)
  pinned->device    device_put of a pinned-host array to device memory (background loads)

    XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP python3 tools/probe_host_memory_kinds.py
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from infinilora_jax.bench.child_items import emit, run_child  # noqa: E402

CASES = ["np->device", "np->pinned", "dev->pinned", "np->unpinned", "pinned->in-jit", "pinned->device"]


def run_case(case: str) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    device = jax.devices()[0]
    sharding = lambda kind: jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
    x = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)
    if case == "np->device":
        out = jax.device_put(x, sharding("device"))
    elif case == "np->pinned":
        out = jax.device_put(x, sharding("pinned_host"))
    elif case == "dev->pinned":
        out = jax.device_put(jnp.asarray(x), sharding("pinned_host"))
    elif case == "np->unpinned":
        out = jax.device_put(x, sharding("unpinned_host"))
    elif case == "pinned->in-jit":
        pinned = jax.device_put(jnp.asarray(x), sharding("pinned_host"))
        out = jax.jit(lambda p: jax.device_put(p, jax.memory.Space.Device) * 2)(pinned)
    elif case == "pinned->device":
        out = jax.device_put(jax.device_put(jnp.asarray(x), sharding("pinned_host")), sharding("device"))
    else:
        raise ValueError(case)
    got = np.asarray(out)
    want = x * 2 if case == "pinned->in-jit" else x
    return "ok" if np.array_equal(got, want) else "wrong values"


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        emit({"result": run_case(sys.argv[2])})
        return
    rows = {}
    for case in CASES:
        run = run_child([sys.executable, os.path.abspath(__file__), "--one", case], dict(os.environ), 120)
        if run.failure:
            rows[case] = f"{run.failure}: " + " | ".join(run.failure_fields()["tail"][-2:])[-200:]
        else:
            rows[case] = run.rows[0]["result"]
        print(f"  {case:16} {rows[case]}", flush=True)
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": rows}))


if __name__ == "__main__":
    main()
