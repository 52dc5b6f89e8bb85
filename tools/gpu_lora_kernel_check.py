"""Check and time the Mosaic GPU LoRA kernels (pallas_kernels/gpu/) on one Hopper GPU, in one run.

    PYTHONPATH=. python3 tools/gpu_lora_kernel_check.py --out $OUT/gpu_lora_check.json 2>&1 | tee $OUT/log.txt

1. Numerics: every variant (dense / per-expert x decode / prefill, the shrink alone, a packed arena through
   paged_lora_delta) against infinilora_jax/lora/reference.py on fresh random bf16 inputs: ragged, unaligned T,
   empty (slot, expert) groups, padding experts, an all-slot-0 batch (y must stay bit-identical), ranks 8, 16,
   32, 64, 128. Rows of y with no adapter are NaN (poisoned): they must stay NaN, all others finite.
2. Timing (median of --repeats loops of --iters calls inside one jitted fori_loop, so host dispatch stays out)
   on the shapes of ../shared/design/GPU.md: shrink x[T, H] . A[slot] and the full delta added into y, for
   ours vs jax.lax.ragged_dot vs gather + einsum vs one-hot, with the device-copy ceiling measured in the
   same run and each case's byte floor at that bandwidth.
Every check and every timing runs on its own: a failure is printed with its traceback and the run goes on.
Prints a short table; writes everything (and the tracebacks) to the --out JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from infinilora_jax.lora import reference  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.gpu import ops as gpu_ops  # noqa: E402
from pallas_kernels.layout import PageTable, a_rows_from_pool, b_rows_from_pool, padded_rank, total_blocks  # noqa: E402

BF = jnp.bfloat16
GPU = [dispatch.LoraBackend.GPU]  # [GPU_INTERPRET] with --smoke (CPU: checks the script, not the kernels' speed)
INTERPRET = [None]
SIZE = {"d": 1024, "h_big": 4096, "t_big": 4096, "copy": 2**29}  # copy: 1 GiB of bf16  # --smoke shrinks these
RESULTS = {"checks": [], "timings": [], "errors": []}


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def attempt(kind: str, name: str, fn) -> None:
    """Run fn(); record its result dict, or its traceback; never raise."""
    t0 = time.perf_counter()
    try:
        row = fn() or {}
        row.update(kind=kind, name=name, ok=row.get("ok", True), wall_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - one failure must not stop the run
        tb = traceback.format_exc()
        print(f"  !! {kind} {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        print(tb, file=sys.stderr, flush=True)
        RESULTS["errors"].append(dict(kind=kind, name=name, error=f"{type(e).__name__}: {e}", traceback=tb))
        row = dict(kind=kind, name=name, ok=False, error=f"{type(e).__name__}")
    RESULTS["checks" if kind == "check" else "timings"].append(row)
    if kind == "check":
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {name:48s} {row.get('detail', row.get('error', ''))}",
              flush=True)


# ---------------------------------------------------------------------------------------------- numerics


def pages(rng, ranks, d_in, out, experts=None):
    r = max(ranks)
    lead = (len(ranks),) if experts is None else (len(ranks), experts)
    a = rng.normal(size=(*lead, d_in, r)).astype(np.float32) / np.sqrt(d_in)
    b = rng.normal(size=(*lead, r, out)).astype(np.float32) / np.sqrt(r)
    for s, rank in enumerate(ranks):
        a[s, ..., rank:] = 0
        b[s, ..., rank:, :] = 0
    return jnp.asarray(a, BF), jnp.asarray(b, BF)


def check_add(name, rng, *, m, rank, d_in=None, out=None, num_slots=64, adapters=32, experts=None,
              zero_frac=0.2, force_prefill=False):
    d_in, out = d_in or SIZE["d"], out or SIZE["d"]

    def run():
        ranks = [0] + [rank] * (num_slots - 1)
        a, b = pages(rng, ranks, d_in, out, experts)
        used = rng.choice(np.arange(1, num_slots), size=min(adapters, num_slots - 1), replace=False)
        slots = rng.choice(used, size=m).astype(np.int32)
        slots[rng.random(m) < zero_frac] = 0
        ex = None if experts is None else rng.integers(0, experts + 1, size=m).astype(np.int32)  # E: padding
        x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
        y = rng.normal(size=(m, out)).astype(np.float32)
        idle = slots == 0 if ex is None else (slots == 0) | (ex == experts)
        y[idle] = np.nan
        y, sl = jnp.asarray(y, BF), jnp.asarray(slots)
        exj = None if ex is None else jnp.asarray(ex)
        if force_prefill:  # the prefill variant (whole D_in per CTA) on a batch the dispatcher calls decode
            rb = padded_rank(rank, 16)
            table = PageTable.padded(num_slots, 1, rb, rb)
            got = gpu_ops.lora_apply((y,), x, sl, sl > 0, (a_rows_from_pool(a, rb),), (b_rows_from_pool(b, 1, rb),),
                                     (table,), num_experts=1, ksplit=1, interpret=INTERPRET[0])[0]
            delta = reference.lora_delta(x, sl, a, b)
        elif ex is None:
            got = jax.jit(lambda y, x, s: dispatch.add_lora(y, x, s, a, b, backend=GPU[0]))(y, x, sl)
            delta = reference.lora_delta(x, sl, a, b)
        else:
            got = jax.jit(lambda y, x, s, e: dispatch.add_expert_lora(y, x, s, e, a, b, backend=GPU[0]))(y, x, sl, exj)
            delta = reference.expert_lora_delta(x, sl, exj, a, b)
        got = np.asarray(got, np.float32)
        want = np.asarray(reference.add_delta(y, delta), np.float32)
        nan_kept = bool(np.all(np.isnan(got[idle])))
        finite = bool(np.all(np.isfinite(got[~idle])))
        err = rel_err(got[~idle], want[~idle]) if np.any(~idle) else 0.0
        # bf16 outputs: ~1 ULP of rounding differences are expected; the float32 delta is checked separately
        return dict(ok=nan_kept and finite and err < 1e-2, rel_err=err,
                    detail=f"rel err {err:.1e}, idle rows kept NaN {nan_kept}, others finite {finite}")
    attempt("check", name, run)


def check_delta(name, rng, *, m, rank, d_in=None, out=None, num_slots=16, experts=None):
    """The float32 delta itself (lora_delta / expert_lora_delta), tight."""
    d_in, out = d_in or SIZE["d"], out or SIZE["d"]

    def run():
        ranks = [0] + [int(rng.choice([rank, max(8, rank // 2)])) for _ in range(num_slots - 1)]
        a, b = pages(rng, ranks, d_in, out, experts)
        sl = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
        x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
        if experts is None:
            got = jax.jit(lambda x, s: dispatch.lora_delta(x, s, a, b, backend=GPU[0]))(x, sl)
            want = reference.lora_delta(x, sl, a, b)
        else:
            ex = jnp.asarray(rng.integers(0, experts + 1, size=m), jnp.int32)
            got = jax.jit(lambda x, s, e: dispatch.expert_lora_delta(x, s, e, a, b, backend=GPU[0]))(x, sl, ex)
            want = reference.expert_lora_delta(x, sl, ex, a, b)
        err = rel_err(got, want)
        return dict(ok=err < 1e-4 and bool(np.all(np.isfinite(np.asarray(got)))), rel_err=err,
                    detail=f"rel err {err:.1e}")
    attempt("check", name, run)


def check_all_slot_zero(rng):
    def run():
        d = SIZE["d"]
        a, b = pages(rng, [0, 16, 64], d, d)
        x = jnp.asarray(rng.normal(size=(77, d)), BF)
        y = jnp.asarray(rng.normal(size=(77, d)), BF)
        got = jax.jit(lambda y, x: dispatch.add_lora(y, x, jnp.zeros((77,), jnp.int32), a, b, backend=GPU[0]))(y, x)
        same = bool(np.array_equal(np.asarray(got, np.float32), np.asarray(y, np.float32)))
        return dict(ok=same, detail=f"y bit-identical {same}")
    attempt("check", "all-slot-0 batch (T=77)", run)


def check_shrink(rng, *, m, rank):
    def run():
        h = SIZE["h_big"]
        a, b = pages(rng, [0] + [rank] * 31, h, 64)
        sl = jnp.asarray(rng.integers(0, 32, size=m), jnp.int32)
        x = jnp.asarray(rng.normal(size=(m, h)), BF)
        rb = padded_rank(rank, 16)
        arena, table = a_rows_from_pool(a, rb), PageTable.padded(32, 1, rb, rb)
        got = gpu_ops.lora_shrink(x, sl, sl > 0, arena, table, num_experts=1, interpret=INTERPRET[0])[:, :rank]
        want = jnp.einsum("ni,nir->nr", x, a[sl], preferred_element_type=jnp.float32)
        err = rel_err(got, want)
        return dict(ok=err < 1e-4, rel_err=err, detail=f"rel err {err:.1e}")
    attempt("check", f"shrink alone T={m} r={rank}", run)


def check_packed(rng):
    def run():
        m, d_in, out, num_experts = 300, SIZE["d"], SIZE["d"] // 2, 4
        ranks = [0, 16, 64, 32, 48, 0, 16]
        table = PageTable.packed(ranks, num_experts, 16, 64)
        rows = total_blocks(table, num_experts) * 16 + 64
        a_rows = jnp.asarray(rng.normal(size=(rows, d_in)) / np.sqrt(d_in), BF)
        b_rows = jnp.asarray(rng.normal(size=(rows, out)) / 8, BF)
        x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
        sl = jnp.asarray(rng.integers(0, len(ranks), size=m), jnp.int32)
        ex = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)
        got = dispatch.paged_lora_delta(x, sl, ex, a_rows, b_rows, table, num_experts=num_experts, backend=GPU[0])
        err = rel_err(got, reference.paged_lora_delta(x, sl, ex, a_rows, b_rows, table, num_experts))
        return dict(ok=err < 1e-4, rel_err=err, detail=f"rel err {err:.1e}")
    attempt("check", "packed arena, experts (paged_lora_delta)", run)


def run_checks(seed: int):
    rng = np.random.default_rng(seed)
    print("== numerics (vs infinilora_jax/lora/reference.py)", flush=True)
    for rank in (8, 16, 32, 64, 128):
        check_delta(f"dense delta decode T=37 r={rank}", rng, m=37, rank=rank)
    check_delta("dense delta prefill T=1500 r=64", rng, m=1500, rank=64)
    check_delta("expert delta decode T*k=200 E=8 r=16", rng, m=200, rank=16, experts=8)
    check_delta("expert delta prefill T*k=2000 E=8 r=32", rng, m=2000, rank=32, experts=8)
    for m in (1, 3, 64, 130):
        check_add(f"dense add decode T={m} r=16 (NaN idle rows)", rng, m=m, rank=16)
    check_add("dense add decode-as-prefill T=130 r=64", rng, m=130, rank=64, force_prefill=True)
    check_add("dense add prefill T=4096 r=64 H=4096", rng, m=SIZE["t_big"], rank=64, d_in=SIZE["h_big"],
              out=SIZE["h_big"])
    check_add("expert add decode T*k=256 E=8 r=64", rng, m=256, rank=64, experts=8, num_slots=16)
    check_add("expert add prefill T*k=3000 E=8 r=16", rng, m=3000, rank=16, experts=8, num_slots=16)
    check_all_slot_zero(rng)
    for m, rank in ((64, 16), (256, 64), (SIZE["t_big"], 64)):
        check_shrink(rng, m=m, rank=rank)
    check_packed(rng)


# ---------------------------------------------------------------------------------------------- timing


def timed(fn, args, iters: int, repeats: int) -> float:
    """Median seconds per call of fn(*args) inside one jitted fori_loop; each iteration feeds a zero made from
    its output back into args[0], so XLA can neither hoist nor drop the call."""
    def loop(first, *rest):
        def body(_, v):
            out = fn(v, *rest)
            return v.at[0, 0].add((out.reshape(-1)[0] * 0).astype(v.dtype))
        return jax.lax.fori_loop(0, iters, body, first)
    run = jax.jit(loop)
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _ragged(x, slots, w, num_slots):
    order = jnp.argsort(slots)
    sizes = jnp.bincount(slots, length=num_slots).astype(jnp.int32)
    out = jax.lax.ragged_dot(x[order], w, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(out).at[order].set(out)


def run_timings(args):
    print("== timing (us per call, jitted loop)", flush=True)
    ceil = {}

    def copy():
        buf = jnp.ones((SIZE["copy"],), BF)
        t = timed(lambda v: v + jnp.asarray(1, BF), (buf.reshape(1, -1),), 20, args.repeats)
        ceil["copy_bytes_per_s"] = 2 * buf.nbytes / t
        print(f"  copy ceiling {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write)", flush=True)
        return dict(us=1e6 * t, bytes_per_s=ceil["copy_bytes_per_s"])
    attempt("time", "copy ceiling", copy)
    bw = ceil.get("copy_bytes_per_s", 3.2e12)
    h, num_slots = args.hidden, args.slots
    print(f"  {'op':6s} {'T':>5s} {'ad':>3s} {'r':>3s}  {'variant':14s} {'us':>9s} {'floor':>7s} {'x floor':>8s}",
          flush=True)
    for case in args.cases:
        tokens, adapters, rank = (int(v) for v in case.split(","))
        rng = np.random.default_rng(tokens * 1000 + rank)
        a = jnp.asarray(rng.normal(size=(num_slots, h, rank)) / np.sqrt(h), BF).at[0].set(0)
        b = jnp.asarray(rng.normal(size=(num_slots, rank, h)) / np.sqrt(rank), BF).at[0].set(0)
        used = rng.choice(np.arange(1, num_slots), size=adapters, replace=False)
        slots = jnp.asarray(rng.choice(used, size=tokens), jnp.int32)
        x = jnp.asarray(rng.normal(size=(tokens, h)), BF)
        y = jnp.asarray(rng.normal(size=(tokens, h)), BF)
        rb = padded_rank(rank, 16)
        table = PageTable.padded(num_slots, 1, rb, rb)
        # the arenas are built once, outside the timed loop: the pool should keep A rank-major (06-lora-kernels.md)
        a_rows, b_rows = a_rows_from_pool(a, rb), b_rows_from_pool(b, 1, rb)
        page = h * rank * 2
        shrink_bytes = tokens * h * 2 + adapters * page + tokens * rank * 4
        delta_bytes = tokens * h * 2 + 2 * adapters * page + 2 * tokens * h * 2
        shrink_v = {
            "ours": lambda x, s, ar: gpu_ops.lora_shrink(x, s, s > 0, ar, table, num_experts=1,
                                                         interpret=INTERPRET[0]),
            "ragged_dot": lambda x, s, ar: _ragged(x, s, a, num_slots),
            "gather+einsum": lambda x, s, ar: jnp.einsum("ni,nir->nr", x, a[s], preferred_element_type=jnp.float32),
            "one-hot": lambda x, s, ar: jnp.einsum(
                "nsr,ns->nr", jnp.dot(x, jnp.swapaxes(a, 0, 1).reshape(h, -1),
                                      preferred_element_type=jnp.float32).reshape(tokens, num_slots, rank),
                jax.nn.one_hot(s, num_slots, dtype=jnp.float32)),
        }
        delta_v = {
            "ours": lambda y, x, s: gpu_ops.lora_apply((y,), x, s, s > 0, (a_rows,), (b_rows,), (table,),
                                                       num_experts=1, interpret=INTERPRET[0])[0],
            "reference": lambda y, x, s: reference.add_delta(y, reference.lora_delta(x, s, a, b)),
            "ragged_dot": lambda y, x, s: reference.add_delta(
                y, _ragged(_ragged(x, s, a, num_slots).astype(BF), s, b, num_slots)),
        }
        for op, variants, n_bytes in (("shrink", shrink_v, shrink_bytes), ("delta", delta_v, delta_bytes)):
            floor = 1e6 * n_bytes / bw
            for name, fn in variants.items():
                def one(fn=fn, op=op, name=name, floor=floor, n_bytes=n_bytes):
                    if op == "shrink":
                        t = timed(fn, (x, slots, a_rows), args.iters, args.repeats)
                    else:
                        t = timed(fn, (y, x, slots), args.iters, args.repeats)
                    us = 1e6 * t
                    print(f"  {op:6s} {tokens:5d} {adapters:3d} {rank:3d}  {name:14s} {us:9.1f} {floor:7.1f} "
                          f"{us / floor:7.1f}x", flush=True)
                    return dict(op=op, tokens=tokens, adapters=adapters, rank=rank, variant=name, us=us,
                                floor_us=floor, bytes=n_bytes, frac_of_copy=floor / us)
                attempt("time", f"{op} T={tokens} adapters={adapters} r={rank} {name}", one)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--cases", nargs="*", default=["64,32,16", "256,64,16", "256,64,64", "4096,64,64",
                                                  "4096,64,16"], help="T,adapters,rank")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--slots", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU: kernels in the Mosaic GPU interpreter, tiny shapes")
    args = p.parse_args()
    if args.smoke:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        GPU[0], INTERPRET[0] = dispatch.LoraBackend.GPU_INTERPRET, plgpu.InterpretGPUParams()
        SIZE.update(d=128, h_big=256, t_big=600, copy=2**20)
        args.hidden, args.slots, args.iters, args.repeats = 256, 16, 1, 1
        args.cases = ["8,4,16", "64,8,64"]
    dev = jax.devices()[0]
    RESULTS["env"] = dict(jax=jax.__version__, platform=jax.default_backend(), device=dev.device_kind)
    print(f"jax {jax.__version__}, {jax.default_backend()}, {dev.device_kind}", flush=True)
    if not args.skip_checks:
        run_checks(args.seed)
    if not args.skip_timing:
        run_timings(args)
    failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print(f"== {len(RESULTS['checks']) - len(failed)}/{len(RESULTS['checks'])} checks ok; "
          f"{len(RESULTS['errors'])} errors" + (f"; failed: {failed}" if failed else ""), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
