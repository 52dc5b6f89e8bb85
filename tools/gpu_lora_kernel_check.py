"""Check and time the Mosaic GPU LoRA kernels (pallas_kernels/gpu/) on one Hopper GPU, one subprocess per item.

    PYTHONPATH=. python3 tools/gpu_lora_kernel_check.py --out $OUT/gpu_lora_check.json 2>&1 | tee $OUT/log.txt

A CUDA fault (misaligned address, illegal access) poisons the whole process, so the parent runs every item as
`python3 tools/gpu_lora_kernel_check.py --only ID` in its own process with a timeout: a fault costs one row.
Checks run a few at a time (--jobs; separate processes have separate CUDA contexts), with CUDA_LAUNCH_BLOCKING=1
so a fault is reported by the kernel that made it; timings run one at a time. Items go cheapest and most
telling first; the parent stops starting items after --budget seconds and lists the ones it skipped.

1. Numerics: every variant (dense / per-expert x decode / prefill, the shrink alone, a packed arena through
   paged_lora_delta) against infinilora_jax/lora/reference.py on fresh random bf16 inputs: ragged, unaligned T,
   empty (slot, expert) groups, padding experts, an all-slot-0 batch (y must stay bit-identical), ranks 8, 16,
   32, 64, 128. Rows of y with no adapter are NaN (poisoned): they must stay NaN, all others finite. Our
   kernels run (and are waited for) before the reference, and the child says which stage it was in.
2. Timing (median of --repeats loops of --iters calls inside one jitted fori_loop, so host dispatch stays out)
   on the shapes of ../shared/design/GPU.md: shrink x[T, H] . A[slot] and the full delta added into y, for
   ours vs jax.lax.ragged_dot vs gather + einsum vs one-hot, with the device-copy ceiling measured first and
   each case's byte floor at that bandwidth. One process per case (ours first, then the baselines).
Prints a compact table; writes every row (and the tail of each failed child's output) to the --out JSON.
`--only ID` runs one item in this process (IDs: --list). `--smoke`: CPU, kernels in the Mosaic GPU interpreter,
tiny shapes (checks the script, not the kernels' speed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from infinilora_jax.bench.child_items import copy_seconds, emit, loop_seconds, run_child, stage  # noqa: E402

BF = None  # jnp.bfloat16, set by _setup() (the parent never starts a jax backend: it must not touch the GPU)
SIZE = {"d": 1024, "h_big": 4096, "t_big": 4096, "copy": 2**29}  # copy: 1 GiB of bf16  # --smoke shrinks these


def _setup(smoke: bool):
    """Imports for a child (jax & co.), as module globals."""
    global jax, jnp, np, reference, dispatch, gpu_ops, PageTable, a_rows_from_pool, b_rows_from_pool, padded_rank
    global total_blocks, BF, GPU, INTERPRET
    import jax
    import jax.numpy as jnp
    import numpy as np

    from infinilora_jax.lora import reference
    from pallas_kernels import dispatch
    from pallas_kernels.gpu import ops as gpu_ops
    from pallas_kernels.layout import PageTable, a_rows_from_pool, b_rows_from_pool, padded_rank, total_blocks
    BF = jnp.bfloat16
    GPU, INTERPRET = dispatch.LoraBackend.GPU, None
    if smoke:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        GPU, INTERPRET = dispatch.LoraBackend.GPU_INTERPRET, plgpu.InterpretGPUParams()


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def ours(got):
    """Wait for our kernels before anything else runs, so an asynchronous fault is theirs."""
    stage("ours")
    got = jax.block_until_ready(got)
    stage("reference")
    return got


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


def check_add(rng, *, m, rank, d_in=None, out=None, num_slots=64, adapters=32, experts=None, zero_frac=0.2,
              force_prefill=False):
    d_in, out = d_in or SIZE["d"], out or SIZE["d"]
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
        got = ours(gpu_ops.lora_apply((y,), x, sl, sl > 0, (a_rows_from_pool(a, rb),), (b_rows_from_pool(b, 1, rb),),
                                      (table,), num_experts=1, ksplit=1, interpret=INTERPRET)[0])
        delta = reference.lora_delta(x, sl, a, b)
    elif ex is None:
        got = ours(jax.jit(lambda y, x, s: dispatch.add_lora(y, x, s, a, b, backend=GPU))(y, x, sl))
        delta = reference.lora_delta(x, sl, a, b)
    else:
        got = ours(jax.jit(lambda y, x, s, e: dispatch.add_expert_lora(y, x, s, e, a, b, backend=GPU))(y, x, sl, exj))
        delta = reference.expert_lora_delta(x, sl, exj, a, b)
    got = np.asarray(got, np.float32)
    want = np.asarray(reference.add_delta(y, delta), np.float32)
    nan_kept = bool(np.all(np.isnan(got[idle])))
    finite = bool(np.all(np.isfinite(got[~idle])))
    err = rel_err(got[~idle], want[~idle]) if np.any(~idle) else 0.0
    # bf16 outputs: ~1 ULP of rounding differences are expected; the float32 delta is checked separately
    return dict(ok=nan_kept and finite and err < 1e-2, rel_err=err,
                detail=f"err {err:.1e} idleNaN {nan_kept} finite {finite}")


def check_delta(rng, *, m, rank, d_in=None, out=None, num_slots=16, experts=None, in_place=False):
    """The float32 delta itself (lora_delta / expert_lora_delta), tight. in_place: expert rows sorted by (expert,
    slot), as the MoE layer sorts them, taken in place (rows_grouped)."""
    d_in, out = d_in or SIZE["d"], out or SIZE["d"]
    ranks = [0] + [int(rng.choice([rank, max(8, rank // 2)])) for _ in range(num_slots - 1)]
    a, b = pages(rng, ranks, d_in, out, experts)
    sl = jnp.asarray(rng.integers(0, num_slots, size=m), jnp.int32)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    if experts is None:
        got = ours(jax.jit(lambda x, s: dispatch.lora_delta(x, s, a, b, backend=GPU))(x, sl))
        want = reference.lora_delta(x, sl, a, b)
    else:
        ex = jnp.asarray(rng.integers(0, experts + 1, size=m), jnp.int32)
        if in_place:
            order = jnp.argsort(ex * num_slots + sl, stable=True)
            sl, ex = sl[order], ex[order]
        got = ours(jax.jit(lambda x, s, e: dispatch.expert_lora_delta(x, s, e, a, b, backend=GPU,
                                                                      rows_grouped=in_place))(x, sl, ex))
        want = reference.expert_lora_delta(x, sl, ex, a, b)
    err = rel_err(got, want)
    return dict(ok=err < 1e-4 and bool(np.all(np.isfinite(np.asarray(got)))), rel_err=err, detail=f"err {err:.1e}")


def check_all_slot_zero(rng):
    d = SIZE["d"]
    a, b = pages(rng, [0, 16, 64], d, d)
    x = jnp.asarray(rng.normal(size=(77, d)), BF)
    y = jnp.asarray(rng.normal(size=(77, d)), BF)
    got = ours(jax.jit(lambda y, x: dispatch.add_lora(y, x, jnp.zeros((77,), jnp.int32), a, b, backend=GPU))(y, x))
    same = bool(np.array_equal(np.asarray(got, np.float32), np.asarray(y, np.float32)))
    return dict(ok=same, detail=f"y bit-identical {same}")


def check_shrink(rng, *, m, rank):
    h = SIZE["h_big"]
    a, b = pages(rng, [0] + [rank] * 31, h, 64)
    sl = jnp.asarray(rng.integers(0, 32, size=m), jnp.int32)
    x = jnp.asarray(rng.normal(size=(m, h)), BF)
    rb = padded_rank(rank, 16)
    arena, table = a_rows_from_pool(a, rb), PageTable.padded(32, 1, rb, rb)
    got = ours(gpu_ops.lora_shrink(x, sl, sl > 0, arena, table, num_experts=1, interpret=INTERPRET))[:, :rank]
    want = jnp.einsum("ni,nir->nr", x, a[sl], preferred_element_type=jnp.float32)
    err = rel_err(got, want)
    return dict(ok=err < 1e-4, rel_err=err, detail=f"err {err:.1e}")


def check_packed(rng):
    m, d_in, out, num_experts = 300, SIZE["d"], SIZE["d"] // 2, 4
    ranks = [0, 16, 64, 32, 48, 0, 16]
    table = PageTable.packed(ranks, num_experts, 16, 64)
    rows = total_blocks(table, num_experts) * 16 + 64  # one page of slack: max-rank windows stay in the arena
    a_rows = jnp.asarray(rng.normal(size=(rows, d_in)) / np.sqrt(d_in), BF)
    b_rows = jnp.asarray(rng.normal(size=(rows, out)) / 8, BF)
    x = jnp.asarray(rng.normal(size=(m, d_in)), BF)
    sl = jnp.asarray(rng.integers(0, len(ranks), size=m), jnp.int32)
    ex = jnp.asarray(rng.integers(0, num_experts, size=m), jnp.int32)
    got = ours(dispatch.paged_lora_delta(x, sl, ex, a_rows, b_rows, table, num_experts=num_experts, backend=GPU))
    err = rel_err(got, reference.paged_lora_delta(x, sl, ex, a_rows, b_rows, table, num_experts))
    return dict(ok=err < 1e-4, rel_err=err, detail=f"err {err:.1e}")


def each(*checks):
    """Several small checks in one process (ok if all are); detail lists each."""
    def run(rng):
        rows = [(name, fn(rng)) for name, fn in checks]
        return dict(ok=all(r["ok"] for _, r in rows), rel_err=max(r.get("rel_err", 0.0) for _, r in rows),
                    detail="; ".join(f"{n}: {r['detail']}" for n, r in rows))
    return run


def check_items():
    """(id, description, fn(rng) -> row): cheapest and most telling first (the first three are what failed on
    the first H200 run: odd T, rank 16's 64-byte rows, the per-expert decode)."""
    t_big, h_big = SIZE["t_big"], SIZE["h_big"]
    return [
        ("shrink64", "shrink alone T=64 r=16", lambda r: check_shrink(r, m=64, rank=16)),
        ("dense37r16", "dense delta decode T=37 r=16", lambda r: check_delta(r, m=37, rank=16)),
        ("expert200", "expert delta decode T*k=200 E=8 r=16",
         lambda r: check_delta(r, m=200, rank=16, experts=8)),
        ("dense37ranks", "dense delta decode T=37 r=8,32,64,128", each(
            *((f"r{k}", lambda r, k=k: check_delta(r, m=37, rank=k)) for k in (8, 32, 64, 128)))),
        ("addsmall", "dense add decode T=1,3,64,130 r=16 (NaN idle)", each(
            *((f"T{m}", lambda r, m=m: check_add(r, m=m, rank=16)) for m in (1, 3, 64, 130)))),
        ("slot0", "all-slot-0 batch T=77 (y bit-identical)", check_all_slot_zero),
        ("dense1500", "dense delta prefill T=1500 r=64", lambda r: check_delta(r, m=1500, rank=64)),
        ("asprefill130", "dense add decode-as-prefill T=130 r=64",
         lambda r: check_add(r, m=130, rank=64, force_prefill=True)),
        ("expert2000", "expert delta prefill T*k=2000 E=8 r=32",
         lambda r: check_delta(r, m=2000, rank=32, experts=8)),
        ("expertinplace", "expert delta, rows in place, T*k=200,2000 E=8 r=32", each(
            *((f"T{m}", lambda r, m=m: check_delta(r, m=m, rank=32, experts=8, in_place=True)) for m in (200, 2000)))),
        ("packed", "packed arena, experts (paged_lora_delta)", check_packed),
        ("expertadd256", "expert add decode T*k=256 E=8 r=64",
         lambda r: check_add(r, m=256, rank=64, experts=8, num_slots=16)),
        ("expertadd3000", "expert add prefill T*k=3000 E=8 r=16",
         lambda r: check_add(r, m=3000, rank=16, experts=8, num_slots=16)),
        ("shrinkbig", f"shrink alone T=256,{t_big} r=64", each(
            *((f"T{m}", lambda r, m=m: check_shrink(r, m=m, rank=64)) for m in (256, t_big)))),
        ("densebig", f"dense add prefill T={t_big} r=64 H={h_big}",
         lambda r: check_add(r, m=t_big, rank=64, d_in=h_big, out=h_big)),
    ]


# ---------------------------------------------------------------------------------------------- timing


def _ragged(x, slots, w, num_slots):
    order = jnp.argsort(slots)
    sizes = jnp.bincount(slots, length=num_slots).astype(jnp.int32)
    out = jax.lax.ragged_dot(x[order], w, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(out).at[order].set(out)


def time_copy(args):
    buf = jnp.ones((SIZE["copy"],), BF)
    stage("copy")
    t = copy_seconds(buf, 20, args.repeats)
    bw = 2 * buf.nbytes / t
    emit(dict(kind="time", id="copy", name="copy ceiling", ok=True, us=1e6 * t, bytes_per_s=bw,
              detail=f"{bw / 1e9:.0f} GB/s read+write"))


def time_case(args, case: str):
    """Every variant of one case in this process, ours first; each variant's failure is its own row."""
    tokens, adapters, rank = (int(v) for v in case.split(","))
    bw, h, num_slots = args.bw, args.hidden, args.slots
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
        "ours": lambda x, s, ar: gpu_ops.lora_shrink(x, s, s > 0, ar, table, num_experts=1, interpret=INTERPRET),
        "ragged_dot": lambda x, s, ar: _ragged(x, s, a, num_slots),
        "gather+einsum": lambda x, s, ar: jnp.einsum("ni,nir->nr", x, a[s], preferred_element_type=jnp.float32),
        "one-hot": lambda x, s, ar: jnp.einsum(
            "nsr,ns->nr", jnp.dot(x, jnp.swapaxes(a, 0, 1).reshape(h, -1),
                                  preferred_element_type=jnp.float32).reshape(tokens, num_slots, rank),
            jax.nn.one_hot(s, num_slots, dtype=jnp.float32)),
    }
    delta_v = {
        "ours": lambda y, x, s: gpu_ops.lora_apply((y,), x, s, s > 0, (a_rows,), (b_rows,), (table,),
                                                   num_experts=1, interpret=INTERPRET)[0],
        "reference": lambda y, x, s: reference.add_delta(y, reference.lora_delta(x, s, a, b)),
        "ragged_dot": lambda y, x, s: reference.add_delta(
            y, _ragged(_ragged(x, s, a, num_slots).astype(BF), s, b, num_slots)),
    }
    order = [("shrink", "ours"), ("delta", "ours")] + [("shrink", n) for n in shrink_v if n != "ours"] + [
        ("delta", n) for n in delta_v if n != "ours"]
    for op, name in order:
        n_bytes = shrink_bytes if op == "shrink" else delta_bytes
        floor = 1e6 * n_bytes / bw
        row = dict(kind="time", id=f"{case}/{op}/{name}", name=f"{op} T={tokens} ad={adapters} r={rank} {name}",
                   op=op, tokens=tokens, adapters=adapters, rank=rank, variant=name, floor_us=floor, bytes=n_bytes)
        stage(f"{op} {name}")
        t0 = time.perf_counter()
        try:
            if op == "shrink":
                t = loop_seconds(shrink_v[name], (x, slots, a_rows), args.iters, args.repeats)
            else:
                t = loop_seconds(delta_v[name], (y, x, slots), args.iters, args.repeats)
            us = 1e6 * t
            row.update(ok=True, us=us, frac_of_copy=floor / us, detail=f"{us:.1f} us, {us / floor:.1f}x floor")
        except Exception as e:  # noqa: BLE001 - a Python-level failure costs one variant
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                       traceback=traceback.format_exc(limit=-8), detail=type(e).__name__)
        row["wall_s"] = time.perf_counter() - t0
        emit(row)


def child(args) -> int:
    """Run one item in this process: print its row(s) as TAG lines."""
    _setup(args.smoke)
    if args.only == "copy":
        time_copy(args)
        return 0
    if args.only.startswith("case:"):
        time_case(args, args.only[5:])
        return 0
    items = {i: (d, fn) for i, d, fn in check_items()}
    desc, fn = items[args.only]
    t0 = time.perf_counter()
    stage("setup")
    row = dict(kind="check", id=args.only, name=desc)
    try:
        row.update(fn(np.random.default_rng([args.seed, sorted(items).index(args.only)])))
    except Exception as e:  # noqa: BLE001 - reported, with the traceback, as this item's row
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   traceback=traceback.format_exc(limit=-8), detail=type(e).__name__)
    row["wall_s"] = time.perf_counter() - t0
    emit(row)
    return 0


# ---------------------------------------------------------------------------------------------- parent


def spawn(args, item: str, timeout: float, extra_env: dict) -> list[dict]:
    """Run one item in a child; its rows, or one row saying how the child died (and in which stage)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", item, "--seed", str(args.seed),
           "--iters", str(args.iters), "--repeats", str(args.repeats), "--hidden", str(args.hidden),
           "--slots", str(args.slots), "--bw", repr(args.bw)] + (["--smoke"] if args.smoke else [])
    run = run_child(cmd, dict(os.environ, **extra_env), timeout)
    rows = run.rows
    if run.failure is not None:
        rows.append(dict(kind="time" if item == "copy" or item.startswith("case:") else "check", id=item,
                         name=item, **run.failure_fields()))
    for r in rows:
        r.setdefault("wall_s", run.wall_s)
        r["child_wall_s"] = run.wall_s
    return rows


def print_row(r: dict) -> None:
    mark = "ok  " if r.get("ok") else "FAIL"
    print(f"  {mark} {r['name'][:52]:52s} {r.get('detail', '')[:120]}  [{r.get('child_wall_s', 0):.0f}s]", flush=True)
    if not r.get("ok"):
        for ln in (r.get("error"), *(r.get("traceback", "").splitlines()[-6:]), *r.get("tail", [])[-8:]):
            if ln:
                print(f"       | {ln[:200]}", flush=True)


def parent(args) -> int:
    t_start = time.perf_counter()
    results = {"checks": [], "timings": [], "skipped": [], "env": {}}
    left = lambda: args.budget - (time.perf_counter() - t_start)  # noqa: E731
    check_env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
                 "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "CUDA_LAUNCH_BLOCKING": "1",
                 "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip(),
                 "TF_CPP_MIN_LOG_LEVEL": "2"}
    time_env = {"CUDA_VISIBLE_DEVICES": check_env["CUDA_VISIBLE_DEVICES"], "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.smoke:
        check_env = time_env = {"JAX_PLATFORMS": "cpu"}
    _setup_sizes(args)
    ids = [i for i, _, _ in check_items()] if not args.skip_checks else []
    print(f"== numerics ({len(ids)} checks, {args.jobs} at a time, one process each; vs lora/reference.py)",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {}
        for i in ids:  # submitted in order; a check starts only while budget is left
            futures[i] = pool.submit(lambda i=i: spawn(args, i, min(args.check_timeout, max(left(), 1)), check_env)
                                     if left() > args.timing_reserve else None)
        for i in ids:
            rows = futures[i].result()
            if rows is None:
                results["skipped"].append(i)
                continue
            for r in rows:
                results["checks"].append(r)
                print_row(r)
    if not args.skip_timing:
        print("== timing (us per call, jitted loop; floor = bytes at the measured copy bandwidth)", flush=True)
        for item in ["copy"] + [f"case:{c}" for c in args.cases]:
            if left() < 10:
                results["skipped"].append(item)
                continue
            rows = spawn(args, item, min(args.time_timeout, left()), time_env)
            for r in rows:
                if r.get("id") == "copy" and r.get("ok"):
                    args.bw = r["bytes_per_s"]
                results["timings"].append(r)
                print_row(r)
    ok = [r for r in results["checks"] if r.get("ok")]
    print(f"== {len(ok)}/{len(results['checks'])} checks ok; {sum(r.get('ok', False) for r in results['timings'])}/"
          f"{len(results['timings'])} timings ok; skipped (budget): {results['skipped'] or 'none'}; "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    table = [r for r in results["timings"] if r.get("ok") and "us" in r and "op" in r]
    if table:
        print(f"  {'op':6s} {'T':>5s} {'ad':>3s} {'r':>3s}  {'variant':14s} {'us':>9s} {'floor':>7s} {'x floor':>8s}")
        for r in table:
            print(f"  {r['op']:6s} {r['tokens']:5d} {r['adapters']:3d} {r['rank']:3d}  {r['variant']:14s} "
                  f"{r['us']:9.1f} {r['floor_us']:7.1f} {r['us'] / r['floor_us']:7.1f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0


def _setup_sizes(args):
    if args.smoke:
        SIZE.update(d=128, h_big=256, t_big=600, copy=2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--cases", nargs="*", default=["64,32,16", "256,64,16", "4096,64,64", "256,64,64",
                                                  "4096,64,16"], help="T,adapters,rank")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--slots", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bw", type=float, default=4.0e12, help="copy bandwidth for the floors (measured first)")
    p.add_argument("--jobs", type=int, default=4, help="checks run at once (one process each)")
    p.add_argument("--budget", type=float, default=140.0, help="seconds; no item starts after this")
    p.add_argument("--timing-reserve", type=float, default=60.0,
                   help="seconds of the budget checks leave for the timings")
    p.add_argument("--check-timeout", type=float, default=60.0)
    p.add_argument("--time-timeout", type=float, default=45.0)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--only", default=None, help="run one item here (a check id, 'copy' or 'case:T,ad,r')")
    p.add_argument("--list", action="store_true", help="print the check ids")
    p.add_argument("--smoke", action="store_true", help="CPU: kernels in the Mosaic GPU interpreter, tiny shapes")
    args = p.parse_args()
    if args.smoke:
        _setup_sizes(args)
        args.hidden, args.slots, args.iters, args.repeats = 256, 16, 1, 1
        if args.cases == p.get_default("cases"):
            args.cases = ["8,4,16", "64,8,64"]
    if args.list:
        for i, d, _ in check_items():
            print(f"{i:14s} {d}")
        return 0
    if args.only:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
