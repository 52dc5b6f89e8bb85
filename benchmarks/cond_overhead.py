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

    PYTHONPATH=. python3 benchmarks/cond_overhead.py --out $OUT/cond_overhead
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="plain,cond,cond+cb,cond+cb+coll")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--conds", type=int, default=19)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one variant
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="out/cond_overhead")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.conds, args.tokens, args.hidden, args.iters = 2, 3, 8, 128, 3
    if args.one:
        if args.smoke:
            import jax

            jax.config.update("jax_num_cpu_devices", 2)
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
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["xla_flags"] = flags
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
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
