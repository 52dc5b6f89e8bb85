"""What a role branch costs: `lax.cond` on the device's role inside one SPMD step, per XLA setting.

The disaggregated step (infinilora_jax/disagg/model.py) puts each role's compute in a `lax.cond` on
`axis_index(role)`: 19 per MoE layer at first, 6 now (one per exchange round trip, plus attention). XLA's GPU
runtime evaluates a conditional by copying its predicate to the host and waiting for it, which exposes launch
latency at every branch; CUDA-graph command buffers with conditional nodes keep the branch on the device.
This times a layer-shaped chain on two devices (role axis): per layer, `--conds` role branches each running a
[T, H] x [H, H] matmul on the base side and a small one on the LoRA side, with a ppermute round trip between
branches, as the real step does. Variants:
  plain     the same chain with no conds (every device runs the base work): the floor
  cond      role branches, default XLA flags
  cond+cb   role branches, XLA_FLAGS --xla_gpu_enable_command_buffer with CONDITIONAL (and WHILE) added
Each variant runs in its own process (XLA flags are read once). Prints ms per step and us per cond.

`--host_wait` (one device) asks what async scheduling needs to know instead: does the call return before the
device is done? A chain of `--layers` [T, H] x [H, H] matmuls, each (except in `plain`) in a `lax.cond` whose
predicate depends on the previous layer's output; prints the time for the call to return (`dispatch`) against
the time until its result is ready. If XLA reads each predicate back, dispatch ~ the whole step.

    PYTHONPATH=. python3 benchmarks/cond_overhead.py --out $OUT/cond_overhead
    PYTHONPATH=. python3 benchmarks/cond_overhead.py --host_wait --variants plain,cond,cond+cb,cond+cb1 \
        --layers 32 --hidden 8192 --out $OUT/cond_host_wait
    python benchmarks/cond_overhead.py --smoke      # CPU, 2 fake devices: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU host
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

COMMAND_BUFFER_FLAGS = {
    "cond": "",
    "cond+cb": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
    "cond+cb+coll": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE,"
                    "COLLECTIVES",
    "cond+cb1": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE "
                "--xla_gpu_graph_min_graph_size=1",
}


def measure(variant: str, layers: int, conds: int, tokens: int, hidden: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()[:2]
    mesh = Mesh(np.array(devices), ("role",))
    perm = [(0, 1), (1, 0)]

    def local(x, w):
        is_base = jax.lax.axis_index("role") == 0
        for _ in range(layers):
            for _ in range(conds):
                if variant == "plain":
                    y = x @ w[0]
                else:
                    y = jax.lax.cond(is_base, lambda a: a @ w[0], lambda a: a[:, :64] @ w[0][:64], x)
                x = (x + jax.lax.ppermute(y, "role", perm) * 1e-3).astype(x.dtype)
        return x

    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("role"), P("role")), out_specs=P("role"),
                                 check_vma=False))
    x = jax.device_put(jnp.ones((2 * tokens, hidden), jnp.bfloat16), NamedSharding(mesh, P("role")))
    w = jax.device_put(jnp.full((2, hidden, hidden), 1e-3, jnp.bfloat16), NamedSharding(mesh, P("role")))
    step(x, w).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step(x, w).block_until_ready()
        times.append(time.perf_counter() - t)
    ms = 1e3 * float(np.median(times))
    return {"variant": variant, "step_ms": ms, "branches": 0 if variant == "plain" else layers * conds}


def measure_host_wait(variant: str, layers: int, tokens: int, hidden: int, iters: int) -> dict:
    """One device: how long the call takes to return against how long until its result is ready."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def chain(x, w):
        for _ in range(layers):
            if variant == "plain":
                y = x @ w
            else:  # the predicate is only known once the previous layer has run
                y = jax.lax.cond(x[0, 0] > -1e30, lambda a: a @ w, lambda a: a * 0, x)
            x = (x + y * 1e-3).astype(x.dtype)
        return x

    step = jax.jit(chain)
    x = jnp.ones((tokens, hidden), jnp.bfloat16)
    w = jnp.full((hidden, hidden), 1e-3, jnp.bfloat16)
    step(x, w).block_until_ready()
    dispatch, total = [], []
    for _ in range(iters):
        t = time.perf_counter()
        out = step(x, w)
        dispatch.append(time.perf_counter() - t)
        out.block_until_ready()
        total.append(time.perf_counter() - t)
    t = time.perf_counter()  # eight calls queued back to back, as an engine queueing ahead would
    outs = [step(x, w) for _ in range(8)]
    queued = time.perf_counter() - t
    outs[-1].block_until_ready()
    queued_total = time.perf_counter() - t
    return {"variant": variant, "layers": layers, "dispatch_ms": 1e3 * float(np.median(dispatch)),
            "step_ms": 1e3 * float(np.median(total)), "queue8_dispatch_ms": 1e3 * queued,
            "queue8_total_ms": 1e3 * queued_total, "branches": 0 if variant == "plain" else layers}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="plain,cond,cond+cb,cond+cb+coll")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--conds", type=int, default=19)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--host_wait", action="store_true", help="one device: does the call wait for the device?")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="out/cond_overhead")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.conds, args.tokens, args.hidden, args.iters = 2, 3, 8, 128, 3
    if args.one:
        if args.smoke:
            import jax

            jax.config.update("jax_num_cpu_devices", 2)
        if args.host_wait:
            print(json.dumps(measure_host_wait(args.one, args.layers, args.tokens, args.hidden, args.iters)))
        else:
            print(json.dumps(measure(args.one, args.layers, args.conds, args.tokens, args.hidden, args.iters)))
        return
    rows = []
    for variant in args.variants.split(","):
        env = dict(os.environ)
        flags = COMMAND_BUFFER_FLAGS.get(variant, "")
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--layers", str(args.layers), "--conds",
               str(args.conds), "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--iters", str(args.iters)]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--host_wait"] if args.host_wait else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["xla_flags"] = flags
    if args.host_wait:
        print(f"  one device, {args.layers} layers, T={args.tokens}, H={args.hidden}")
        print(f"  {'variant':10} {'dispatch ms':>12} {'step ms':>9} {'8 queued: dispatch / total ms':>30}")
        for r in rows:
            if "step_ms" not in r:
                print(f"  {r['variant']:10} failed: {r['error']}")
                continue
            print(f"  {r['variant']:10} {r['dispatch_ms']:12.3f} {r['step_ms']:9.3f} "
                  f"{r['queue8_dispatch_ms']:17.3f} / {r['queue8_total_ms']:.3f}")
        _write(args.out, rows)
        return
    floor = next((r["step_ms"] for r in rows if r["variant"] == "plain" and "step_ms" in r), None)
    print(f"  {args.layers} layers x {args.conds} branches, T={args.tokens}, H={args.hidden}")
    print(f"  {'variant':14} {'step ms':>9} {'us/branch over plain':>22}")
    for r in rows:
        if "step_ms" not in r:
            print(f"  {r['variant']:14} failed: {r['error']}")
            continue
        extra = (1e3 * (r["step_ms"] - floor) / r["branches"]) if floor and r["branches"] else float("nan")
        r["us_per_branch"] = extra
        print(f"  {r['variant']:14} {r['step_ms']:9.3f} {extra:22.1f}")
    _write(args.out, rows)


def _write(out: str, rows: list) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
