"""Multi-LoRA shrink and delta: the portable baselines, the dispatcher and the Mosaic GPU kernels, against copy and
matmul ceilings (issue 3's benchmark; results in docs/benchmarks.md, ninth session).

Per dense case (T tokens spread over `adapters` distinct adapters of a pool of max(slots, adapters + 1) slots,
rank r, hidden H, bf16; in random order, or with `:seg` in segments, each adapter's tokens contiguous as SGMV
takes them and as a step's sequences come) and per-expert case (rows = tokens x top_k (token, expert)
assignments at a model's widths, sorted by expert as the MoE layer feeds them) it times:
  shrink  x[T, H] . A[slot][H, r] -> [T, r] float32:
            gather+einsum (the reference's shrink), one-hot (x @ every slot's A, then select),
            ragged_dot (rows sorted by slot), gpu-kernel / gpu-kernel-rm (pallas_kernels/gpu/, GPU only; A
            rank-minor, transposed per call, or rank-major as the pool keeps it)
  delta   (x . A[slot]) . B[slot] -> [T, H] float32:
            reference / reference-rm (lora/reference.py on either A layout), dispatch
            (pallas_kernels.dispatch.lora_delta as the platform picks), one-hot, ragged_dot, gpu-kernel(-rm),
            gpu-per-row-rm (the kernels on one work unit per row: no sort, no gathers; GPU only), gpu-window-rm /
            gpu-unit-rm (the window-major expand, window_expand.py, for every call / for none), gpu-runs-rm (run
            units, runs.py: rows in place, no grouping, the window-major expand); on `:seg` cases
            gpu-segments-rm, shrink and delta: the tokens taken in place (row_runs = adapters, as the model passes
            a step's sequence count), no sort, no gather of x, none of the delta back
  expert delta: reference, reference-rm, dispatch, ragged_dot (one group per (slot, expert) page),
            gpu-kernel-rm, gpu-per-row-rm, gpu-grouped-rm (rows taken in place: the case's rows come sorted by
            (expert, slot), as the MoE layer sorts them),
            gpu-window-rm / gpu-window-grouped-rm and gpu-unit-rm / gpu-unit-grouped-rm (the same two with every
            unit on the window-major expand, or none, whatever the device's entry says),
            gpu-runs-rm (run units on the case's rows in place)
  qkv delta (three targets sharing x, Qwen3 attention widths; A rank-major): reference, gpu-fused (one
            add_lora_fused call: one shrink and one expand launch), gpu-fused-per-row (the same on per-row
            units), gpu-fused-window (the window-major expand), gpu-fused-runs (run
            units), gpu-separate (three add_lora calls)
Each variant runs in one jitted, unrolled loop; `us` is its device time per call (kernel time in a profiler
trace, less the loop's own), which is what it costs inside a step; the wall time per call is kept beside it.
The ceilings are measured in the same run: device copy bandwidth (read + write of a large buffer) and bf16
matmul throughput. `floor us` is the bytes each case must move (x, the distinct pages, the float32 output) at
the measured copy bandwidth. Every variant's output is checked against the reference (relative error).
Writes <out>.json and <out>.png.

    PYTHONPATH=. python3 benchmarks/lora_kernels.py --out $OUT/lora_kernels   # GPU; --profile lists kernels
    python benchmarks/lora_kernels.py --smoke       # CPU, tiny shapes: checks the script, not the numbers
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from infinilora_jax.bench import kernel_timing  # noqa: E402
from infinilora_jax.lora import reference  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.gpu import ops as gpu_ops  # noqa: E402
from pallas_kernels.layout import PageTable, a_rows_from_pool, padded_rank  # noqa: E402

F = flags.FLAGS
flags.DEFINE_list("cases", ["1:1:16", "16:16:16", "64:32:16", "256:64:16", "256:64:64", "64:32:128", "512:512:8",
                            "1024:64:64", "4096:64:64", "8192:16:64"],
                  "T:adapters:rank[:seg] per case (decode T <= 512, prefill above; the pool has max(--slots, "
                  "adapters + 1); seg: each adapter's tokens contiguous)")
flags.DEFINE_list("expert_cases", ["qwen3-gate_up:64:32:32:128:8:2048:1536", "qwen3-down:64:32:32:128:8:768:2048",
                                   "mixtral-gate_up:64:32:64:8:2:4096:28672", "mixtral-down:64:32:64:8:2:14336:4096"],
                  "per-expert delta cases name:tokens:adapters:rank:experts:top_k:d_in:d_out (rows = tokens * top_k)")
flags.DEFINE_list("qkv_cases", ["64:32:32", "256:64:32", "2048:16:32"],
                  "fused q/k/v cases T:adapters:rank at --qkv_widths (one call for three targets vs three calls)")
flags.DEFINE_list("qkv_widths", ["2048", "4096", "512", "512"], "d_in, then the q, k, v output widths (default: "
                  "Qwen3-30B-A3B: hidden 2048, 32 query and 4 KV heads of 128)")
flags.DEFINE_list("variants", None, "time only these variants (default: all; the reference output is still "
                  "computed for the error check)")
flags.DEFINE_integer("hidden", 4096, "H (input and output width)")
flags.DEFINE_integer("slots", 128, "adapter slots in the pool (slot 0 = none), at least adapters + 1")
flags.DEFINE_integer("iters", 50, "calls per timed loop")
flags.DEFINE_integer("repeats", 5, "timed loops per variant")
flags.DEFINE_bool("smoke", False, "tiny shapes, 2 iterations (CPU check of the script)")
flags.DEFINE_string("out", None, "write <out>.json")
flags.DEFINE_string("plot_from", None, "only redraw <run>.png from a recorded <run>.json")
flags.DEFINE_bool("profile", False, "also trace one timed loop per variant and print its kernels (device time per "
                  "call, by kernel): where a variant's time goes")

DT = jnp.bfloat16


def shrink_gather(x, slots, a, b):
    del b
    return jnp.einsum("ni,nir->nr", x, a[slots], preferred_element_type=jnp.float32)


def shrink_onehot(x, slots, a, b):
    del b
    s, h, r = a.shape
    full = jnp.dot(x, jnp.swapaxes(a, 0, 1).reshape(h, s * r), preferred_element_type=jnp.float32)
    return jnp.einsum("nsr,ns->nr", full.reshape(-1, s, r), jax.nn.one_hot(slots, s, dtype=jnp.float32))


def _ragged(x, slots, w, num_slots):
    order = jnp.argsort(slots)
    sizes = jnp.bincount(slots, length=num_slots).astype(jnp.int32)
    out = jax.lax.ragged_dot(x[order], w, sizes, preferred_element_type=jnp.float32)
    return jnp.zeros_like(out).at[order].set(out)


def shrink_ragged(x, slots, a, b):
    del b
    return _ragged(x, slots, a, a.shape[0])


def delta_onehot(x, slots, a, b):
    s = shrink_onehot(x, slots, a, b)  # [T, r]
    onehot = jax.nn.one_hot(slots, a.shape[0], dtype=jnp.float32)
    per_slot = jnp.einsum("nr,ns->nsr", s, onehot).reshape(x.shape[0], -1)  # [T, S*r]
    return jnp.dot(per_slot.astype(b.dtype), b.reshape(-1, b.shape[-1]), preferred_element_type=jnp.float32)


def delta_ragged(x, slots, a, b):
    s = shrink_ragged(x, slots, a, b)
    return _ragged(s.astype(b.dtype), slots, b, a.shape[0])


def shrink_gpu_kernel(x, slots, a, b):
    """The Mosaic GPU shrink (pallas_kernels/gpu/); the A arena is built per call here (one transpose), where the
    pool should keep A rank-major (gpu-kernel-rm below times it without that copy)."""
    del b
    return _shrink_gpu_rows(x, slots, a_rows_from_pool(a, padded_rank(a.shape[-1], 16)), a.shape[-1])


def _shrink_gpu_rows(x, slots, a_rows, rank, row_runs=None):
    rb = padded_rank(rank, 16)
    table = PageTable.padded(a_rows.shape[0] // rb, 1, rb, rb)
    return gpu_ops.lora_shrink(x, slots, slots > 0, a_rows, table, num_experts=1, row_runs=row_runs)[:, :rank]


def shrink_gpu_kernel_rank_major(x, slots, a, b, row_runs=None):
    """As gpu-kernel, with A stored rank-major (the arena is a free view, padded only below rank 16: pages are
    whole 16-row rank blocks; a plain reshape of rank-8 pages put two slots in one page, rel err 1.2 on the
    H200 in the seventeenth session): the kernels' own cost. row_runs: tokens in at most that many runs, taken
    in place."""
    del b
    rank = a.shape[-2]
    return _shrink_gpu_rows(x, slots, a_rows_from_pool(a, padded_rank(rank, 16), rank_major=True), rank,
                            row_runs=row_runs)


def delta_gpu_kernel(x, slots, a, b):
    return dispatch.lora_delta(x, slots, a, b, backend=dispatch.LoraBackend.GPU)


def delta_gpu_rank_major(x, slots, a, b, blocks_of=None, row_runs=None):
    """The dispatcher's kernels with A stored rank-major; blocks_of(dtype): the kernel settings (None: the
    device's entry); row_runs: tokens in at most that many runs, taken in place."""
    return dispatch.lora_delta(x, slots, a, b, backend=dispatch.LoraBackend.GPU, a_rank_major=True,
                               blocks=None if blocks_of is None else blocks_of(x.dtype), row_runs=row_runs)


def segment_variants(adapters: int) -> tuple[dict, dict]:
    """(shrink, delta) variants of a `:seg` case: the kernels on the tokens in place, row_runs = adapters."""
    if jax.default_backend() != "gpu":
        return {}, {}
    return ({"gpu-segments-rm": functools.partial(shrink_gpu_kernel_rank_major, row_runs=adapters)},
            {"gpu-segments-rm": functools.partial(delta_gpu_rank_major, row_runs=adapters)})


def delta_reference_rank_major(x, slots, a, b):
    """The reference's gather + einsum reading A stored rank-major [S, R, H]."""
    s = jnp.einsum("ni,nri->nr", x, a[slots], preferred_element_type=jnp.float32)
    return jnp.einsum("nr,nro->no", s, b[slots].astype(jnp.float32))


def expert_delta_ragged(x, slots, experts, a, b):
    """ragged_dot over (slot, expert) pages: rows sorted by slot * E + expert, one group per page of the pool (S x E
    groups); rows of padding experts sort past every group, where ragged_dot leaves zeros."""
    num_slots, num_experts = a.shape[:2]
    keys = jnp.where(experts < num_experts, slots * num_experts + experts, num_slots * num_experts)
    order = jnp.argsort(keys)
    sizes = jnp.bincount(keys, length=num_slots * num_experts).astype(jnp.int32)

    def grouped(rows, w):
        return jax.lax.ragged_dot(rows, w.reshape(-1, *w.shape[2:]), sizes, preferred_element_type=jnp.float32)

    d = grouped(grouped(x[order], a).astype(b.dtype), b)
    return jnp.zeros_like(d).at[order].set(d)


def expert_delta_reference_rank_major(x, slots, experts, a, b):
    s = jnp.einsum("mi,mri->mr", x, a[slots, experts], preferred_element_type=jnp.float32)
    return jnp.einsum("mr,mro->mo", s, b[slots, experts].astype(jnp.float32))


# variants that take A as [S, (E,) R, D_in]
RANK_MAJOR = {"gpu-kernel-rm", "gpu-per-row-rm", "gpu-grouped-rm", "gpu-window-rm", "gpu-window-grouped-rm",
              "gpu-unit-rm", "gpu-unit-grouped-rm", "gpu-runs-rm", "gpu-segments-rm", "reference-rm"}


def expert_delta_gpu_rank_major(x, slots, experts, a, b, rows_grouped=False, blocks_of=None):
    """The dispatcher's kernels per expert, A rank-major. rows_grouped: rows taken in place (the case's rows come
    sorted by (expert, slot), as the MoE layer sorts them): no sort, no gather of x, none of the delta back.
    blocks_of(dtype): the kernel settings (None: the device's entry)."""
    return dispatch.expert_lora_delta(x, slots, experts, a, b, backend=dispatch.LoraBackend.GPU, a_rank_major=True,
                                      blocks=None if blocks_of is None else blocks_of(x.dtype),
                                      rows_grouped=rows_grouped)


def forced_blocks(**fields):
    """blocks_of(dtype): the device's kernel settings with `fields` forced, and run_rows 0 unless given, so a
    variant named after a form times that form whatever the entry picks (the H200 entry puts calls of up to 512
    rows on run units, which come before per-row units and windows)."""
    fields = {"run_rows": 0, **fields}
    return lambda dtype: dataclasses.replace(gpu_ops.device_blocks(dtype, None), **fields)


per_row_blocks = forced_blocks(per_row_rows=1 << 30)  # every call on per-row units (no sort, no gathers)
window_blocks = forced_blocks(window_unit_rows=1 << 30)  # every unit on the window-major expand
run_blocks = forced_blocks(run_rows=1 << 30)  # every call on run units (runs.py)
grouped_blocks = forced_blocks()  # grouped units, the entry's expand
unit_blocks = forced_blocks(window_unit_rows=0)  # grouped units on the unit-major expand, whatever the entry says


harness = kernel_timing.identity


SHRINK = {"gather+einsum": shrink_gather, "one-hot": shrink_onehot, "ragged_dot": shrink_ragged}
DELTA = {"reference": reference.lora_delta, "reference-rm": delta_reference_rank_major,
         "dispatch": dispatch.lora_delta, "one-hot": delta_onehot, "ragged_dot": delta_ragged}
if jax.default_backend() == "gpu":  # Mosaic GPU kernels: Hopper only
    SHRINK["gpu-kernel"] = shrink_gpu_kernel
    SHRINK["gpu-kernel-rm"] = shrink_gpu_kernel_rank_major
    DELTA["gpu-kernel"] = delta_gpu_kernel
    DELTA["gpu-kernel-rm"] = delta_gpu_rank_major
    DELTA["gpu-per-row-rm"] = functools.partial(delta_gpu_rank_major, blocks_of=per_row_blocks)
    DELTA["gpu-window-rm"] = functools.partial(delta_gpu_rank_major, blocks_of=window_blocks)
    DELTA["gpu-unit-rm"] = functools.partial(delta_gpu_rank_major, blocks_of=unit_blocks)
    DELTA["gpu-runs-rm"] = functools.partial(delta_gpu_rank_major, blocks_of=run_blocks)
EXPERT_DELTA = {"reference": reference.expert_lora_delta, "reference-rm": expert_delta_reference_rank_major,
                "dispatch": dispatch.expert_lora_delta, "ragged_dot": expert_delta_ragged}
if jax.default_backend() == "gpu":
    EXPERT_DELTA["gpu-kernel-rm"] = expert_delta_gpu_rank_major
    EXPERT_DELTA["gpu-per-row-rm"] = functools.partial(expert_delta_gpu_rank_major, blocks_of=per_row_blocks)
    EXPERT_DELTA["gpu-grouped-rm"] = functools.partial(expert_delta_gpu_rank_major, rows_grouped=True,
                                                       blocks_of=grouped_blocks)
    EXPERT_DELTA["gpu-runs-rm"] = functools.partial(expert_delta_gpu_rank_major, rows_grouped=True,
                                                    blocks_of=run_blocks)
    for name, blocks_of in [("window", window_blocks), ("unit", unit_blocks)]:
        EXPERT_DELTA[f"gpu-{name}-rm"] = functools.partial(expert_delta_gpu_rank_major, blocks_of=blocks_of)
        EXPERT_DELTA[f"gpu-{name}-grouped-rm"] = functools.partial(expert_delta_gpu_rank_major, rows_grouped=True,
                                                                   blocks_of=blocks_of)


def _qkv_pairs(args):
    x, slots, *ab = args
    return x, slots, list(zip(ab[0::2], ab[1::2]))


def qkv_reference(*args):
    """q/k/v deltas (A rank-major, as the pool keeps it), concatenated: the reference, one target at a time."""
    x, slots, pairs = _qkv_pairs(args)
    return jnp.concatenate([reference.lora_delta(x, slots, a, b, a_rank_major=True) for a, b in pairs], axis=1)


def qkv_gpu_fused(*args, blocks_of=None):
    """One add_lora_fused call: one grouping, one shrink and one expand launch for the three targets.
    blocks_of(dtype): the kernel settings (None: the device's entry; per_row_blocks: per-row units, no grouping
    at all; window_blocks: the window-major expand)."""
    x, slots, pairs = _qkv_pairs(args)
    ys = tuple(jnp.zeros((x.shape[0], b.shape[-1]), jnp.float32) for _, b in pairs)
    return jnp.concatenate(dispatch.add_lora_fused(
        ys, x, slots, pairs, a_rank_major=True, blocks=None if blocks_of is None else blocks_of(x.dtype),
        backend=dispatch.LoraBackend.GPU), axis=1)


def qkv_gpu_separate(*args):
    """Three add_lora calls: what each target cost before fused launches (a grouping and two launches each)."""
    x, slots, pairs = _qkv_pairs(args)
    return jnp.concatenate([dispatch.add_lora(jnp.zeros((x.shape[0], b.shape[-1]), jnp.float32), x, slots, a, b,
                                              a_rank_major=True, backend=dispatch.LoraBackend.GPU)
                            for a, b in pairs], axis=1)


QKV_DELTA = {"reference": qkv_reference}  # A rank-major in every qkv variant (not in RANK_MAJOR)
if jax.default_backend() == "gpu":
    QKV_DELTA["gpu-fused"] = qkv_gpu_fused
    QKV_DELTA["gpu-separate"] = qkv_gpu_separate
    QKV_DELTA["gpu-fused-per-row"] = functools.partial(qkv_gpu_fused, blocks_of=per_row_blocks)
    QKV_DELTA["gpu-fused-window"] = functools.partial(qkv_gpu_fused, blocks_of=window_blocks)
    QKV_DELTA["gpu-fused-runs"] = functools.partial(qkv_gpu_fused, blocks_of=run_blocks)


def timed(fn, *args, profile: bool = False) -> dict:
    """Per call of fn(*args) over one jitted, unrolled loop of F.iters calls: wall_us and device_us
    (kernel_timing.per_call)."""
    return kernel_timing.per_call(fn, *args, iters=F.iters, repeats=F.repeats, profile=profile)


def ceilings(n_bytes: int, n: int) -> tuple[float, float]:
    """(copy bytes/s, read + write; bf16 matmul flop/s)."""
    buf = jnp.ones((n_bytes // 2 // 1024, 1024), DT)
    t_copy = timed(lambda v: v + jnp.asarray(1, DT), buf)  # reads and writes the whole buffer
    m = jnp.ones((n, n), DT)
    t_mm = timed(lambda v, w: jnp.dot(v, w, preferred_element_type=jnp.float32), m, m)
    per_call = lambda t: t["wall_us"] if t["device_us"] is None else t["device_us"]  # noqa: E731
    return 2e6 * buf.nbytes / per_call(t_copy), 2e6 * n ** 3 / per_call(t_mm)


def make_case(rng, tokens, adapters, rank, segments=False):
    h, s = F.hidden, max(F.slots, adapters + 1)  # the pool grows for cases with more adapters than its slots
    a = rng.normal(size=(s, h, rank)).astype(np.float32) / np.sqrt(h)
    b = rng.normal(size=(s, rank, h)).astype(np.float32) / np.sqrt(rank)
    a[0], b[0] = 0, 0
    used = rng.choice(np.arange(1, s), size=adapters, replace=False)
    slots = rng.choice(used, size=tokens)
    if segments:  # each adapter's tokens contiguous
        slots = np.sort(slots)
    x = rng.normal(size=(tokens, h)).astype(np.float32)
    return jnp.asarray(x, DT), jnp.asarray(slots, jnp.int32), jnp.asarray(a, DT), jnp.asarray(b, DT)


def make_expert_case(rng, tokens, adapters, rank, experts, top_k, d_in, d_out):
    """Rows = (token, expert) assignments sorted by (expert, slot) (as the MoE layer feeds them), one adapter per
    token; a pool of adapters + 1 slots. Returns (..., distinct pages the rows touch)."""
    s = adapters + 1
    a = (rng.normal(size=(s, experts, d_in, rank)) / np.sqrt(d_in)).astype(np.float32)
    b = (rng.normal(size=(s, experts, rank, d_out)) / np.sqrt(rank)).astype(np.float32)
    a[0], b[0] = 0, 0
    token_slots = rng.integers(1, s, size=tokens)
    chosen = np.stack([rng.choice(experts, size=top_k, replace=False) for _ in range(tokens)])
    order = np.argsort(chosen.reshape(-1) * s + np.repeat(token_slots, top_k), kind="stable")
    expert_ids = chosen.reshape(-1)[order]
    slots = np.repeat(token_slots, top_k)[order]
    x = rng.normal(size=(tokens * top_k, d_in)).astype(np.float32)
    pages = len(set(zip(slots.tolist(), expert_ids.tolist())))
    return (jnp.asarray(x, DT), jnp.asarray(slots, jnp.int32), jnp.asarray(expert_ids, jnp.int32),
            jnp.asarray(a, DT), jnp.asarray(b, DT), pages)


class _Runner:
    """Checks and times every variant of one case; a failing variant (a new kernel) must not stop the rest."""

    def __init__(self, rows: list, copy_bw: float):
        self.rows, self.copy_bw = rows, copy_bw

    def __call__(self, op, label, meta, variants, args, n_bytes, want):
        """Rows for each variant; `us` is its device time less the loop's own (the harness, timed first), or
        the wall time where there is no device trace (CPU)."""
        floor_us = 1e6 * n_bytes / self.copy_bw
        base = timed(harness, *args)
        print(f"  {op:12s} {label}  loop harness: device {base['device_us'] or 0:.1f} us, "
              f"wall {base['wall_us']:.1f} us")
        for name, fn in variants.items():
            if F.variants and name not in F.variants:
                continue
            call_args = list(args)
            if name in RANK_MAJOR:  # A (the pool's second-to-last operand) stored rank-major
                call_args[-2] = jnp.swapaxes(call_args[-2], -1, -2)
            try:
                err = rel_err(jax.jit(fn)(*call_args), want)
                t = timed(fn, *call_args, profile=F.profile)
            except Exception as e:  # noqa: BLE001
                print(f"  {op:12s} {label}  {name:14s} FAILED: {type(e).__name__}: {e}")
                self.rows.append(dict(op=op, **meta, variant=name, error=f"{type(e).__name__}: {e}"))
                continue
            us = (t["wall_us"] if t["device_us"] is None
                  else max(t["device_us"] - base["device_us"], 0.0))
            self.rows.append(dict(op=op, **meta, variant=name, us=us, wall_us=t["wall_us"],
                                  device_us=t["device_us"], harness_device_us=base["device_us"],
                                  floor_us=floor_us, bytes=n_bytes, rel_err=err))
            print(f"  {op:12s} {label}  {name:14s} {us:9.1f} us  floor {floor_us:7.1f} us  "
                  f"({us / floor_us:6.1f}x)  wall {t['wall_us']:8.1f} us  rel err {err:.1e}")


MAX_REL_ERR = 1e-2  # bf16 inputs, float32 outputs: every correct variant measured 1e-7 - 7e-6 on the H200


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv):
    del argv
    if F.plot_from:  # redraw the PNG of a recorded run
        with open(F.plot_from) as f:
            plot(json.load(f)["rows"], F.plot_from.removesuffix(".json") + ".png")
        return
    if F.smoke:
        F.hidden, F.slots, F.iters, F.repeats = 256, 16, 2, 1
        F.cases = ["8:4:16", "64:8:16", "64:8:16:seg"]
        F.expert_cases = ["tiny:8:4:16:4:2:128:256"]
        F.qkv_cases, F.qkv_widths = ["8:4:16"], ["128", "256", "64", "64"]
    print(f"  platform {jax.default_backend()}, device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"dispatch backend {dispatch.select_backend().value}")
    copy_bw, mm = ceilings(2**30 if not F.smoke else 2**22, 8192 if not F.smoke else 256)
    print(f"  ceilings: copy {copy_bw / 1e9:.0f} GB/s (read + write), bf16 matmul {mm / 1e12:.1f} TFLOP/s")
    rng = np.random.default_rng(0)
    rows = []
    run = _Runner(rows, copy_bw)
    for case in F.cases:
        tokens, adapters, rank, *kind = case.split(":")
        tokens, adapters, rank, segments = int(tokens), int(adapters), int(rank), kind == ["seg"]
        if kind not in ([], ["seg"]):
            raise ValueError(f"case {case!r}: T:adapters:rank or T:adapters:rank:seg")
        x, slots, a, b = make_case(rng, tokens, adapters, rank, segments)
        shrink_seg, delta_seg = segment_variants(adapters) if segments else ({}, {})
        h = F.hidden
        page = h * rank * 2
        shrink_bytes = tokens * h * 2 + adapters * page + tokens * rank * 4
        delta_bytes = shrink_bytes + adapters * page + tokens * h * 4
        label = f"T={tokens:5d} adapters={adapters:3d} r={rank:3d}{' seg' if segments else ''}"
        meta = dict(tokens=tokens, adapters=adapters, rank=rank, segments=segments)
        run("shrink", label, meta, {**SHRINK, **shrink_seg}, (x, slots, a, b), shrink_bytes,
            shrink_gather(x, slots, a, b))
        run("delta", label, meta, {**DELTA, **delta_seg}, (x, slots, a, b), delta_bytes,
            reference.lora_delta(x, slots, a, b))
    for case in F.expert_cases:
        name, *dims = case.split(":")
        tokens, adapters, rank, experts, top_k, d_in, d_out = (int(v) for v in dims)
        x, slots, expert_ids, a, b, pages = make_expert_case(rng, tokens, adapters, rank, experts, top_k, d_in,
                                                            d_out)
        m = tokens * top_k
        n_bytes = m * d_in * 2 + pages * (d_in + d_out) * rank * 2 + m * d_out * 4
        label = f"{name} rows={m} pages={pages} r={rank}"
        meta = dict(case=name, tokens=tokens, rows=m, adapters=adapters, rank=rank, experts=experts, top_k=top_k,
                    d_in=d_in, d_out=d_out, pages=pages)
        run("expert delta", label, meta, EXPERT_DELTA, (x, slots, expert_ids, a, b), n_bytes,
            reference.expert_lora_delta(x, slots, expert_ids, a, b))
    d_in, *widths = (int(w) for w in F.qkv_widths)
    for case in F.qkv_cases:
        tokens, adapters, rank = (int(v) for v in case.split(":"))
        s = adapters + 1
        x = jnp.asarray(rng.normal(size=(tokens, d_in)), DT)
        slots = jnp.asarray(rng.integers(1, s, size=tokens), jnp.int32)
        ab = []
        for w in widths:
            a = (rng.normal(size=(s, rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
            b = (rng.normal(size=(s, rank, w)) / np.sqrt(rank)).astype(np.float32)
            a[0], b[0] = 0, 0
            ab += [jnp.asarray(a, DT), jnp.asarray(b, DT)]
        pages = adapters * rank * (len(widths) * d_in + sum(widths)) * 2
        n_bytes = tokens * d_in * 2 + pages + tokens * sum(widths) * 4
        label = f"qkv T={tokens:5d} adapters={adapters:3d} r={rank:3d}"
        meta = dict(case="qkv", tokens=tokens, rows=tokens, adapters=adapters, rank=rank, d_in=d_in,
                    d_out=sum(widths))
        run("qkv delta", label, meta, QKV_DELTA, (x, slots, *ab), n_bytes, qkv_reference(x, slots, *ab))
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump({"copy_bytes_per_s": copy_bw, "matmul_flops": mm, "hidden": F.hidden, "slots": F.slots,
                       "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
        plot(rows, F.out + ".png")
    wrong = [r for r in rows if r.get("rel_err", 0.0) > MAX_REL_ERR]
    for r in wrong:
        print(f"  WRONG: {r['op']} {r['variant']} {_case_label(r).replace(chr(10), ' ')}: rel err {r['rel_err']:.1e}")
    if wrong:  # a fast wrong answer is no result: fail the run (its times are still in the JSON)
        raise SystemExit(f"{len(wrong)} variant(s) disagree with the reference by more than {MAX_REL_ERR}")


def _case_label(row: dict) -> str:
    if "case" in row:
        return f"{row['case']}\n{row['rows']} rows r{row['rank']}"
    return f"T={row['tokens']} a={row['adapters']}\nr{row['rank']}{' seg' if row.get('segments') else ''}"


def plot(rows: list[dict], path: str) -> None:
    """One panel per op: time per call of each variant (log scale) by case, with the bytes floor."""
    from infinilora_jax.bench.plots import plt, save_figure

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op and "us" in r]
        cases = list(dict.fromkeys(_case_label(r) for r in mine))
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            got = {_case_label(r): r["us"] for r in mine if r["variant"] == v}
            xs = [c + i * width for c, label in enumerate(cases) if label in got]
            ax.bar(xs, [got[label] for label in cases if label in got], width, label=v)
        floors = {_case_label(r): r["floor_us"] for r in mine}
        ax.scatter([c + 0.4 - width / 2 for c in range(len(cases))], [floors[c] for c in cases], marker="_",
                   s=600, color="k", label="bytes at copy bandwidth", zorder=3)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))], cases, fontsize=7)
        ax.set_yscale("log")
        ax.set(ylabel="us per call (device)", title=op)
        ax.legend(fontsize=7, ncol=4)
    save_figure(fig, path)


if __name__ == "__main__":
    app.run(main)
