"""Expert GEMM implementations (infinilora_jax/models/grouped_matmul.py) on one H200: which should the MoE use?

    PYTHONPATH=. python3 benchmarks/expert_gemm.py --out $OUT/expert_gemm.json
    PYTHONPATH=. python3 benchmarks/expert_gemm.py --smoke     # CPU, tiny shapes: checks the script, not numbers

Shapes: Qwen3-30B-A3B (E=128, H=2048, I=768, top-8) and Mixtral-8x7B (E=8, H=4096, I=14336, top-2) at T tokens
in {64, 256} (decode) and {2048, 8192} (prefill); for each, the gate_up GEMM [T*k, H] x [E, H, 2I] and the down
GEMM [T*k, I] x [E, I, H] in bf16 (float32 accumulation, bf16 result, as the model uses them), with the k
distinct experts of each token drawn uniformly, or skewed (Zipf over a random expert order).

Each (implementation, shape) runs in its own subprocess with a timeout, since a Mosaic GPU fault poisons its
process: the child runs the implementation once and waits for it (a crash is then its own), compares a sample of
at most 512 rows against a float32 reference ("capacity" at HIGHEST precision), then times it inside one jitted
`fori_loop` of n calls whose carry takes a zero made from the sum of the whole output (XLA can neither hoist
the call nor slice it to the part one element needs), n set for ~0.2 s per repeat, median of --repeats. A device
copy (read + write) of the largest weight tensor, timed first in the same run, is the bandwidth ceiling.

Columns: us per call; wTB/s = bytes of the experts that have rows / time (what a grouped GEMM must read at
least); %copy = that against the copy ceiling (read + write bytes per second); TFLOP/s = useful
2 * rows * K * N / time; xRD = ragged_dot's time / this one's; err = max |out - ref| / max |ref| over the sampled
rows (bf16 rounding is ~4e-3; FAIL above 2e-2).

Items go most telling first; none starts after --budget seconds (the rest are listed as skipped); an
implementation found unavailable (it raised NotImplementedError) is skipped for the remaining shapes. The JSON
is rewritten after every row. The default budget covers the first few shapes; the rest in further runs, e.g.

    PYTHONPATH=. python3 benchmarks/expert_gemm.py --tokens 256 8192 --budget 400 --out $OUT/expert_gemm_2.json
    PYTHONPATH=. python3 benchmarks/expert_gemm.py --routings skewed --budget 400 --out $OUT/expert_gemm_3.json

--impls, --models, --tokens, --routings and --gemms narrow the sweep; --mgpu_blocks adds Mosaic GPU tilings
(block_m,block_n,block_k,max_concurrent_steps,grid_block_n) to compare with grouped_matmul.MGPU_BLOCKS. XLA_FLAGS
is inherited (and recorded): autotuning changes the XLA GEMMs (ragged_dot, capacity).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from infinilora_jax.bench.child_items import copy_seconds, emit, loop_seconds, run_child, stage  # noqa: E402

MODELS = {  # experts, hidden, moe intermediate, top-k
    "qwen3-30b-a3b": dict(experts=128, hidden=2048, inter=768, top_k=8),
    "mixtral-8x7b": dict(experts=8, hidden=4096, inter=14336, top_k=2),
}
TOKENS = (64, 2048, 256, 8192)  # the profiled decode case, then prefill, then the rest
SMOKE_MODELS = {"tiny": dict(experts=8, hidden=128, inter=96, top_k=2)}
SMOKE_TOKENS = (8, 40)  # 80 rows: not a multiple of the kernel's 64-row tiles
IMPLS = ("ragged_dot", "mgpu", "capacity")  # ragged_dot first: the others are timed against it
SMOKE_IMPLS = ("ragged_dot", "mgpu_interpret", "capacity")
SAMPLE_ROWS = 512
ERR_OK = 2e-2


# ---------------------------------------------------------------------------------------------- child


def gemm_shape(model: dict, gemm: str) -> tuple[int, int]:
    """(K, N) of one expert's weight."""
    h, i = model["hidden"], model["inter"]
    return (h, 2 * i) if gemm == "gate_up" else (i, h)


def route(rng, tokens: int, experts: int, top_k: int, routing: str):
    """Group sizes [E] of tokens * top_k rows: k distinct experts per token, uniform or Zipf-skewed (Gumbel top-k
    sampling without replacement)."""
    import numpy as np

    if routing == "uniform":
        scores = rng.random((tokens, experts))
    else:
        logp = -1.0 * np.log(1 + rng.permutation(experts))
        scores = logp + rng.gumbel(size=(tokens, experts))
    chosen = np.argsort(-scores, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=experts).astype(np.int32)


def impl_call(impl: str, smoke: bool):
    """fn(rows, weights, group_sizes) -> bf16 [M, N] for an implementation name ('mgpu:bm,bn,bk,steps,gbn' picks
    Mosaic GPU blocks; in the interpreter for --smoke)."""
    import jax.numpy as jnp

    from infinilora_jax.models import grouped_matmul as gm

    if impl.startswith("mgpu:"):
        bm, bn, bk, steps, gbn = (int(v) for v in impl[5:].split(","))
        blocks = gm.MgpuBlocks(bm, bn, bk, steps, gbn)
        return lambda x, w, s: gm.mgpu_grouped_matmul(x, w, s, out_dtype=jnp.bfloat16, blocks=blocks,
                                                       interpret=smoke)
    return lambda x, w, s: gm.grouped_matmul(x, w, s, implementation=impl).astype(x.dtype)


def timed(fn, args, repeats: int, target_s: float = 0.2, max_iters: int = 500) -> tuple[float, int]:
    """(median seconds per call, calls per repeat) of fn(*args) inside one jitted loop (child_items.loop_seconds),
    n calls per repeat for about `target_s`, n from one call's time. The weights and group sizes are arguments,
    never constants XLA could fold."""
    single = loop_seconds(fn, args, 1, 1)
    n = int(min(max(target_s / max(single, 1e-9), 1), max_iters))
    return loop_seconds(fn, args, n, repeats), n


def run_copy(args, shape):
    import jax
    import jax.numpy as jnp

    stage("setup")
    buf = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    stage("copy")
    t = copy_seconds(buf, 10, args.repeats)
    bw = 2 * buf.nbytes / t
    return dict(us=1e6 * t, bytes=2 * buf.nbytes, bytes_per_s=bw, device=jax.devices()[0].device_kind,
                jax=jax.__version__, ok=True, detail=f"{bw / 1e12:.3f} TB/s read+write of {buf.nbytes / 1e6:.1f} MB")


def run_item(args, impl, model_name, gemm, tokens, routing):
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np

    from infinilora_jax.models import grouped_matmul as gm

    warnings.simplefilter("error", gm.ExpertGemmFallback)  # a fallback would time lax.ragged_dot under our name
    model = (SMOKE_MODELS if args.smoke else MODELS)[model_name]
    k, n = gemm_shape(model, gemm)
    e, m = model["experts"], tokens * model["top_k"]
    stage("setup")
    # the same inputs for every implementation of a shape
    rng = np.random.default_rng([args.seed, zlib.crc32(f"{model_name}/{gemm}/{tokens}/{routing}".encode())])
    sizes = route(rng, tokens, e, model["top_k"], routing)
    kx, kw = jax.random.split(jax.random.key(int(rng.integers(2 ** 31))))
    rows = jax.random.normal(kx, (m, k), jnp.bfloat16)
    weights = jax.jit(lambda key: jax.random.normal(key, (e, k, n), jnp.bfloat16) * (k ** -0.5))(kw)
    group_sizes = jnp.asarray(sizes)
    fn = impl_call(impl, args.smoke)
    info = dict(rows=m, K=k, N=n, experts=e, nonempty=int((sizes > 0).sum()), max_group=int(sizes.max()),
                mean_group=m / e)

    stage("run")
    out = jax.block_until_ready(jax.jit(fn)(rows, weights, group_sizes))
    stage("reference")
    sample = np.sort(rng.choice(m, size=min(m, SAMPLE_ROWS), replace=False))
    row_group = np.repeat(np.arange(e), sizes)
    sample_sizes = jnp.asarray(np.bincount(row_group[sample], minlength=e).astype(np.int32))
    ref = jax.jit(lambda x, w, s: gm.grouped_matmul(
        x.astype(jnp.float32), w.astype(jnp.float32), s, precision=jax.lax.Precision.HIGHEST,
        implementation="capacity"))(rows[sample], weights, sample_sizes)
    ref = np.asarray(ref, np.float64)
    got = np.asarray(out[sample], np.float64)
    err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
    finite = bool(jnp.all(jnp.isfinite(out)))
    del out

    stage("time")
    t, iters = timed(fn, (rows, weights, group_sizes), args.repeats)
    weight_bytes = info["nonempty"] * k * n * 2
    ok = finite and err < ERR_OK
    return dict(info, us=1e6 * t, iters=iters, weight_bytes=weight_bytes, tbps=weight_bytes / t / 1e12,
                tflops=2 * m * k * n / t / 1e12, err=err, finite=finite, ok=ok,
                detail=f"{1e6 * t:.1f} us, err {err:.1e}" + ("" if finite else ", NON-FINITE"))


def child(args) -> int:
    row = dict(id=args.only)
    t0 = time.perf_counter()
    try:
        if args.only.startswith("copy/"):
            row.update(kind="copy", **run_copy(args, tuple(int(v) for v in args.only[5:].split("x"))))
        else:
            impl, model, gemm, tokens, routing = args.only.split("/")
            row.update(kind="gemm", impl=impl, model=model, gemm=gemm, tokens=int(tokens), routing=routing)
            row.update(run_item(args, impl, model, gemm, int(tokens), routing))
    except Exception as e:  # noqa: BLE001 - a Python-level failure is this item's row
        first = str(e).splitlines()[0] if str(e) else ""
        # not on this jax, or not on this platform: the parent skips the implementation from here on
        unavailable = isinstance(e, NotImplementedError) or (isinstance(e, RuntimeError) and "GPU only" in first)
        row.update(ok=False, error=f"{type(e).__name__}: {first}", detail=type(e).__name__, unavailable=unavailable,
                   traceback=traceback.format_exc(limit=-6))
    row["wall_s"] = time.perf_counter() - t0
    emit(row)
    return 0


# ---------------------------------------------------------------------------------------------- parent


def items(args) -> list[str]:
    """Item ids, most telling first: the copy ceiling, then per shape (uniform routing first, by T in TOKENS
    order) every implementation, ragged_dot first."""
    models = SMOKE_MODELS if args.smoke else MODELS
    names = [m for m in models if not args.models or m in args.models]
    shapes = [(r, t, m, g) for r in args.routings for t in args.tokens for m in names for g in args.gemms]
    largest = max((gemm_shape(models[m], g) + (models[m]["experts"],) for m in names for g in args.gemms),
                  key=lambda s: s[0] * s[1] * s[2])
    out = [f"copy/{largest[2]}x{largest[0]}x{largest[1]}"]
    for routing, tokens, model, gemm in shapes:
        out += [f"{impl}/{model}/{gemm}/{tokens}/{routing}" for impl in args.impls]
    return out


def spawn(args, item: str, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--only", item, "--seed", str(args.seed),
           "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    run = run_child(cmd, env, timeout)
    if run.failure is None:
        row = run.rows[0]
    else:
        row = dict(id=item, **run.failure_fields())
        if item.startswith("copy/"):
            row["kind"] = "copy"
        else:
            impl, model, gemm, tokens, routing = item.split("/")
            row.update(kind="gemm", impl=impl, model=model, gemm=gemm, tokens=int(tokens), routing=routing)
    row["child_wall_s"] = run.wall_s
    return row


def print_row(r: dict) -> None:
    mark = "ok  " if r.get("ok") else "FAIL"
    print(f"  {mark} {r['id'][:60]:60s} {r.get('detail', '')[:110]}  [{r['child_wall_s']:.0f}s]", flush=True)
    if not r.get("ok"):
        for ln in (r.get("error"), *r.get("traceback", "").splitlines()[-4:], *r.get("tail", [])[-6:]):
            if ln:
                print(f"       | {ln[:200]}", flush=True)


def table(results: dict) -> None:
    ceiling = next((r for r in results["rows"] if r.get("kind") == "copy" and r.get("ok")), None)
    if ceiling:
        print(f"copy ceiling: {ceiling['bytes_per_s'] / 1e12:.2f} TB/s ({ceiling['detail']}; {ceiling['device']}, "
              f"jax {ceiling['jax']})")
    rows = [r for r in results["rows"] if r.get("kind") == "gemm"]
    base = {(r["model"], r["gemm"], r["tokens"], r["routing"]): r["us"] for r in rows
            if r["impl"] == "ragged_dot" and r.get("ok")}
    print(f"{'model':14s} {'gemm':7s} {'T':>5s} {'route':7s} {'rows':>6s} {'maxg':>5s} {'impl':22s} {'us':>10s} "
          f"{'wTB/s':>6s} {'%copy':>5s} {'TFLOP/s':>7s} {'xRD':>6s} {'err':>8s}")
    for r in rows:
        key = (r["model"], r["gemm"], r["tokens"], r["routing"])
        head = f"{r['model']:14s} {r['gemm']:7s} {r['tokens']:5d} {r['routing']:7s}"
        if "us" not in r:
            print(f"{head} {'':6s} {'':5s} {r['impl']:22s} FAIL {(r.get('error') or '')[:80]}")
            continue
        ratio = f"{base[key] / r['us']:6.2f}" if key in base else f"{'-':>6s}"
        of_copy = f"{100 * r['tbps'] * 1e12 / ceiling['bytes_per_s']:5.0f}" if ceiling else f"{'-':>5s}"
        bad = "" if r.get("ok") else " FAIL"
        print(f"{head} {r['rows']:6d} {r['max_group']:5d} {r['impl']:22s} {r['us']:10.1f} {r['tbps']:6.2f} "
              f"{of_copy} {r['tflops']:7.1f} {ratio} {r['err']:8.1e}{bad}")
    if results["skipped"]:
        print(f"skipped: {len(results['skipped'])} items: {', '.join(results['skipped'][:12])}"
              + (" ..." if len(results["skipped"]) > 12 else ""))


def parent(args) -> int:
    t_start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t_start)
    results = {"args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": [], "skipped": [],
               "unavailable": {}}

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)

    todo = items(args)
    print(f"== {len(todo)} items, one process each, budget {args.budget:.0f} s, "
          f"XLA_FLAGS={results['xla_flags'] or '(none)'}", flush=True)
    for item in todo:
        impl = item.split("/")[0]
        if impl in results["unavailable"] or left() <= 0:
            results["skipped"].append(item + (f" ({impl} unavailable)" if impl in results["unavailable"] else ""))
            continue
        row = spawn(args, item, args.item_timeout)
        if row.get("unavailable"):
            results["unavailable"][impl] = row.get("error")
        results["rows"].append(row)
        print_row(row)
        save()
    print(f"== {sum(r.get('ok', False) for r in results['rows'])}/{len(results['rows'])} ok, "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    table(results)
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; no item starts after this")
    p.add_argument("--item_timeout", type=float, default=90.0, help="seconds for one child")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impls", nargs="*", default=None, help=f"default {' '.join(IMPLS)}")
    p.add_argument("--mgpu_blocks", nargs="*", default=[],
                   help="extra Mosaic GPU tilings 'block_m,block_n,block_k,max_concurrent_steps,grid_block_n'")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--tokens", nargs="*", type=int, default=None)
    p.add_argument("--routings", nargs="*", default=["uniform", "skewed"])
    p.add_argument("--gemms", nargs="*", default=["gate_up", "down"])
    p.add_argument("--only", default=None, help="run one item in this process (an id from --list)")
    p.add_argument("--list", action="store_true", help="print the item ids")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the CPU-capable implementations")
    args = p.parse_args()
    args.impls = list(args.impls or (SMOKE_IMPLS if args.smoke else IMPLS)) + [f"mgpu:{b}" for b in args.mgpu_blocks]
    args.tokens = args.tokens or list(SMOKE_TOKENS if args.smoke else TOKENS)
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    if args.list:
        print("\n".join(items(args)))
        return 0
    if args.only:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
