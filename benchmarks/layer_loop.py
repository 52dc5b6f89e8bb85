"""What the host pays to queue a many-layer step: layers unrolled (as models/transformer.py runs them) against
one `lax.scan` over layer-stacked weights, per XLA command-buffer setting.

Why: with async scheduling (engine/engine.py) the decode step is bound by the host's work to queue it. On one
H200 (fourteenth session), an 8-layer Qwen3-30B-A3B-shaped step took 5.65 ms queued ahead, of which ~4.7 ms was
the host queueing it and ~2.9 ms device work; the trace showed XLA updating the step's CUDA graph (588 nodes,
1.4-1.7 ms) and launching it (1.1-1.3 ms) on every step, and without CUDA graphs the host's per-kernel launches
cost as much. Both grow with the layer count. A scanned layer is one loop body: if XLA keeps the loop on the
device (a CUDA-graph WHILE node) the host's per-step work stops growing with depth.

Each layer here: `--blocks` blocks of [T, H] x [H, H] matmul + a tanh residual (two kernels each, as the real
layer's ~70 small kernels), and a write of [T, H] into its slice of a donated cache (as the KV write). Every
call gets a fresh host input (the engine's packed batch) and donates the cache, so buffer addresses change
from step to step as in the engine (and XLA updates the graph's pointers, unless its command-buffer update mode
gives them stable addresses: the -skip variants). Measured per variant, each in its own process:
  queued   ms per step with `--queue` steps queued back to back (the async engine's steady state)
  enqueue  host ms per call while queueing them
  single   ms of one step run alone (host + device in series)

    PYTHONPATH=. python3 benchmarks/layer_loop.py --layers 8,32 --out $OUT/layer_loop
    python benchmarks/layer_loop.py --smoke      # CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from infinilora_jax.bench.child_items import emit, run_child  # noqa: E402

_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
VARIANTS = {  # name -> (layer loop, XLA_FLAGS)
    "unrolled": ("unrolled", ""),
    "unrolled-nocb": ("unrolled", "--xla_gpu_enable_command_buffer="),
    "scan": ("scan", ""),
    "scan-nocb": ("scan", "--xla_gpu_enable_command_buffer="),
    "scan-cb-while": ("scan", f"--xla_gpu_enable_command_buffer={_TYPES},CONDITIONAL,WHILE"),
    # XLA's CommandBufferUpdateMode: stable (VA-remapped) addresses for temporaries / also for parameters and
    # outputs found stable over the first executions, so the CUDA graph needs fewer updates per execution
    "unrolled-skip-temp": ("unrolled", "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"),
    "unrolled-skip-profiled": ("unrolled", "--xla_gpu_command_buffer_update_mode=SKIP_PROFILED"),
}


def measure(loop: str, layers: int, blocks: int, tokens: int, hidden: int, queue: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.key(0)
    weights = jax.random.normal(key, (layers, blocks, hidden, hidden), jnp.bfloat16) * hidden ** -0.5
    cache = jnp.zeros((layers, 8, tokens, hidden), jnp.bfloat16)

    def layer(x, w, c, slot):
        for b in range(blocks):
            x = x + jnp.tanh(x @ w[b]) * 0.1
        return x, jax.lax.dynamic_update_slice_in_dim(c, x[None], slot, axis=0)

    def step(weights, cache, host):
        x = jnp.broadcast_to(host[:, None].astype(jnp.bfloat16), (tokens, hidden)) * 1e-3
        slot = host[0] % 8
        if loop == "scan":
            def body(x, wc):
                x, c = layer(x, *wc, slot)
                return x, c
            x, cache = jax.lax.scan(body, x, (weights, cache))
        else:
            new = []
            for i in range(layers):
                x, c = layer(x, weights[i], cache[i], slot)
                new.append(c)
            cache = jnp.stack(new)
        return x.sum(), cache

    run = jax.jit(step, donate_argnums=(1,))
    host = lambda i: np.full(tokens, i % 8, np.int32)
    out, cache = run(weights, cache, host(0))
    out.block_until_ready()
    single = []
    for i in range(repeats * 4):
        t = time.perf_counter()
        out, cache = run(weights, cache, host(i))
        out.block_until_ready()
        single.append(time.perf_counter() - t)
    queued, enqueue = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        spent = 0.0
        for i in range(queue):
            s = time.perf_counter()
            out, cache = run(weights, cache, host(i))
            spent += time.perf_counter() - s
        out.block_until_ready()
        queued.append((time.perf_counter() - t) / queue)
        enqueue.append(spent / queue)
    ms = lambda xs: 1e3 * float(np.median(xs))
    return {"loop": loop, "layers": layers, "blocks": blocks, "tokens": tokens, "hidden": hidden,
            "queued_ms": ms(queued), "enqueue_ms": ms(enqueue), "single_ms": ms(single),
            "device": str(jax.devices()[0].device_kind)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layers", default="8,32")
    parser.add_argument("--blocks", type=int, default=32, help="matmul blocks per layer (two kernels each)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per variant (its own process)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: "variant:layers"
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="out/layer_loop")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.blocks, args.tokens, args.hidden, args.queue, args.repeats = "2,3", 2, 8, 64, 3, 2
    if args.one:
        variant, layers = args.one.split(":")
        emit(measure(VARIANTS[variant][0], int(layers), args.blocks, args.tokens, args.hidden, args.queue,
                     args.repeats))
        return
    rows = []
    for layers in args.layers.split(","):
        for variant in args.variants.split(","):
            env = dict(os.environ)
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {VARIANTS[variant][1]}".strip()
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{variant}:{layers}", "--blocks",
                   str(args.blocks), "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--queue",
                   str(args.queue), "--repeats", str(args.repeats)]
            row = {"variant": variant, "layers": int(layers), "xla_flags": VARIANTS[variant][1]}
            run = run_child(cmd + (["--smoke"] if args.smoke else []), env, args.timeout)
            if run.failure:
                fields = run.failure_fields()
                row.update(error=fields["detail"], tail=fields["tail"][-3:])
            else:
                row.update(run.rows[0])
            rows.append(row)
            print(_line(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


def _line(r: dict) -> str:
    if "error" in r:
        return f"  {r['variant']:14} L={r['layers']:<3} failed: {r['error']}"
    return (f"  {r['variant']:14} L={r['layers']:<3} queued {r['queued_ms']:8.3f} ms/step  enqueue "
            f"{r['enqueue_ms']:7.3f} ms  single {r['single_ms']:8.3f} ms")


if __name__ == "__main__":
    main()
