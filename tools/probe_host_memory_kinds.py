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
import subprocess
import sys

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
        print(run_case(sys.argv[2]))
        return
    rows = {}
    for case in CASES:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", case], capture_output=True,
                                  text=True, timeout=120)
            if proc.returncode == 0:
                rows[case] = proc.stdout.strip().splitlines()[-1]
            else:
                rows[case] = f"rc={proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-2:])[-200:]
        except subprocess.TimeoutExpired:
            rows[case] = "timed out"
        print(f"  {case:16} {rows[case]}", flush=True)
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": rows}))


if __name__ == "__main__":
    main()
