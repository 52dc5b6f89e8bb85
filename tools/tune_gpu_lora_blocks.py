"""Regenerate this GPU's entry of pallas_kernels/gpu/tuned_blocks.json by timing the Mosaic GPU LoRA kernels.

On an H200 (docs/benchmarks.md) the prefill phase ran in the eleventh session (stages 6, expand tile 128), the
decode, buckets and crossover phases in the twelfth (ksplit 4, buckets on, decode_rows 2048); the dispatch phase
ran there in an older single-rank form, not yet per rank. On the GPU machine (one H200; each candidate x
problem costs ~5 s, mostly compiling):

    PYTHONPATH=. python tools/tune_gpu_lora_blocks.py --phases dispatch --log $OUT/t.json

(or `OUT=$OUT ./tools/gpu_runbook.sh tune_gpu_blocks`). Phases, each rewriting only its own fields of the entry
"<device>/<dtype>" (block_tables.py), so they can run in separate calls and in this order:
  prefill    stages x expand_cols on prefill-shaped problems (thousands of rows, dense and per-expert);
  decode     decode_ksplit (the D_in split of the decode variant) on decode-shaped problems, with the entry's
             stages and expand_cols;
  expand     expand_tiles (column tiles per expand CTA, pipelined `stages` deep: 1, 2, 4 or all of a target's)
             on the decode and the prefill problems;
  window     window_unit_rows (0: the unit-major expand, 64: every unit on the window-major expand) on the
             decode and prefill problems and two with few adapters (long groups: where windows lose);
  runs       run_rows (calls of up to 0 / 512 / 2048 rows on run units, runs.py: no grouping, a page read once
             per run in an 8-row window) on the decode problems, the one-adapter Mixtral decode and the
             2,048-row prefill problems (long runs: where run units lose);
  buckets    rank_buckets on or off, on decode and prefill problems whose adapters have mixed ranks (a quarter,
             half or all of a rank-64 pool, the slots' ranks passed as the models would);
  crossover  decode_rows: the largest probed row count up to which the decode variant is not slower than the
             prefill variant at every probed count (geometric mean over the problems of its time / the
             prefill variant's: a tie on one problem does not outweigh a clear gain on another);
  dispatch   kernel_min_rows_by_rank: per pool rank (16, 32, 64, 128), the smallest probed row count from
             which the kernels beat the reference's gather + einsum on every problem of that rank (a dense
             4096 x 4096 projection, Qwen3's expert gate_up) at that count and above
             ("kernel_crossover_rows_by_rank"), raised to --kernel_min_rows_floor (compile cost: every kernel
             instance adds to an engine's start-up; see dispatch.gpu_kernel_min_rows); kernel_min_rows is the
             smallest rank's (ranks below it, and calls of unknown rank, use it). A rank stops probing after
             two wins in a row (the kernels' lead grows with the rows). --dispatch_ranks probes some ranks
             only (a call's time limit); their results replace those ranks' in the entry, others are kept.
A candidate's score is the geometric mean over problems of its time / the best time on that problem; the lowest
wins. Times are device time per call (infinilora_jax/bench/kernel_timing.py: an unrolled jitted loop, kernel
busy time from a profiler trace, less the loop's own), and every candidate's output is checked against the
reference first (a wrong candidate is dropped). The entry gets "measured": true once all eight phases have run
on this device, with the jax version, the device kind and the date; --log keeps every timing.

`--interpret` runs the same flow on CPU with tiny problems in the Mosaic GPU interpreter: it checks the script,
not the numbers (interpreter timings mean nothing), and writes only to an --out given explicitly.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from infinilora_jax.bench import kernel_timing  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.gpu import block_tables  # noqa: E402
from pallas_kernels.gpu.block_tables import GpuBlocks  # noqa: E402

PHASES = ("prefill", "decode", "expand", "window", "runs", "buckets", "crossover", "dispatch")
F = flags.FLAGS
flags.DEFINE_list("phases", list(PHASES), f"which of {PHASES} to run (in that order)")
flags.DEFINE_list("dtypes", ["bfloat16"], "activation / page dtypes to tune (bfloat16, float16)")
flags.DEFINE_integer("iters", 5, "calls per timed loop (unrolled: each adds to the loop's compile time)")
flags.DEFINE_integer("repeats", 3, "wall-clock loops per candidate (kept beside the device time)")
flags.DEFINE_integer("kernel_min_rows_floor", 1024, "kernel_min_rows is at least this (compile cost)")
flags.DEFINE_list("dispatch_ranks", None, "pool ranks the dispatch phase probes (default: 16, 32, 64, 128)")
flags.DEFINE_string("out", block_tables.TABLE_PATH, "table to rewrite")
flags.DEFINE_string("log", None, "write every timing to this JSON file")
flags.DEFINE_bool("interpret", False, "dry run on CPU with tiny shapes in the Mosaic GPU interpreter")
flags.DEFINE_bool("write", True, "write the table (with --interpret only if --out is given explicitly)")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A LoRA call: `rows` rows (tokens, or token x expert assignments) over `adapters` adapters of rank `rank`,
    d_in -> d_out; per-expert when experts > 0 (rows = tokens x top_k, sorted by expert as the MoE feeds them)."""
    name: str
    rows: int
    adapters: int
    rank: int
    d_in: int
    d_out: int
    experts: int = 0
    top_k: int = 1
    mixed: bool = False  # adapters of ranks rank/4, rank/2 and rank (slot ranks passed); else all of `rank`

    def with_rows(self, rows: int) -> Shape:
        return dataclasses.replace(self, rows=rows)


# Real widths: a dense 4096 x 4096 projection; Qwen3-30B-A3B expert gate_up (2048 -> 2 x 768, 128 experts
# top-8, r 32); Mixtral-8x7B expert down (14336 -> 4096, 8 experts top-2, r 64).
PREFILL = [Shape("dense r64", 4096, 16, 64, 4096, 4096), Shape("dense r16", 2048, 64, 16, 4096, 4096),
           Shape("qwen3 gate_up", 8192, 32, 32, 2048, 1536, 128, 8),
           Shape("mixtral down", 2048, 16, 64, 14336, 4096, 8, 2)]
DECODE = [Shape("dense r16", 64, 32, 16, 4096, 4096), Shape("dense r64", 256, 64, 64, 4096, 4096),
          Shape("qwen3 gate_up", 512, 32, 32, 2048, 1536, 128, 8),
          Shape("mixtral gate_up", 128, 32, 64, 4096, 28672, 8, 2)]
CROSSOVER_ROWS = (128, 256, 512, 1024, 2048)
EXPAND_TILES = (1, 2, 4, 0)  # expand column tiles per CTA (0: all of a target's)
# window_unit_rows: no unit on windows, every unit (units hold at most 64 rows). Units of up to 4 / 8 rows on
# windows and the rest unit-major in one launch lost to both on every problem (H200, sessions 19 and 20).
WINDOW_UNIT_ROWS = (0, 64)
# Few adapters make long groups (rows per page), where windows lose: Mixtral decode with one adapter (16 rows
# per page), Qwen3 prefill with four (16); with the decode and prefill problems (1-2 rows per page at decode,
# 2-64 at prefill)
FEW_ADAPTERS = [Shape("mixtral gate_up, 1 adapter", 128, 1, 64, 4096, 28672, 8, 2),
                Shape("qwen3 gate_up, 4 adapters", 8192, 4, 32, 2048, 1536, 128, 8)]
DISPATCH_RANKS = (16, 32, 64, 128)
DISPATCH_ROWS = (64, 128, 256, 512, 1024, 2048, 4096)
TINY_PREFILL = [Shape("tiny dense", 80, 3, 16, 128, 128), Shape("tiny expert", 80, 3, 16, 128, 128, 4, 2)]
TINY_DECODE = [Shape("tiny dense", 16, 3, 16, 256, 128)]
TINY_ROWS = (80,)
TINY_DISPATCH_RANKS = (16, 32)
BUCKET_SHAPES = [dataclasses.replace(s, mixed=True) for s in (DECODE[1], DECODE[3], PREFILL[0], PREFILL[3])]
TINY_BUCKETS = [Shape("tiny mixed", 40, 4, 32, 128, 128, mixed=True)]
RUN_ROWS = (0, 512, 2048)  # the runs phase's run_rows candidates
TINY_WINDOW = [Shape("tiny expert, 1 adapter", 80, 1, 16, 128, 128, 4, 2), TINY_DECODE[0]]


_PROBLEM_IDS = itertools.count()


def make_problem(rng, shape: Shape, dtype) -> dict:
    """Random pool pages (A rank-major [S, (E,) R, D_in], as the pool keeps it; B [S, (E,) R, D_out]; slot 0
    empty), x, and each row's slot (and expert). Expert rows come sorted by (expert, slot), as the MoE layer
    sorts them, and are taken in place (rows_grouped)."""
    s = shape.adapters + 1
    lead = (s,) if not shape.experts else (s, shape.experts)
    a = (rng.normal(size=(*lead, shape.rank, shape.d_in)) / np.sqrt(shape.d_in)).astype(np.float32)
    b = (rng.normal(size=(*lead, shape.rank, shape.d_out)) / np.sqrt(shape.rank)).astype(np.float32)
    a[0], b[0] = 0, 0
    ranks = np.full(s, shape.rank)
    if shape.mixed:
        ranks = rng.choice([max(shape.rank // 4, 1), max(shape.rank // 2, 1), shape.rank], size=s)
        for slot, r in enumerate(ranks):
            a[slot, ..., r:, :], b[slot, ..., r:, :] = 0, 0
    ranks[0] = 0
    problem = dict(id=next(_PROBLEM_IDS), shape=shape, slot_ranks=jnp.asarray(ranks, jnp.int32),
                   a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype),
                   x=jnp.asarray(rng.normal(size=(shape.rows, shape.d_in)), dtype))
    if not shape.experts:
        problem["slots"] = jnp.asarray(rng.integers(1, s, size=shape.rows), jnp.int32)
        return problem
    tokens = -(-shape.rows // shape.top_k)
    chosen = np.stack([rng.choice(shape.experts, size=shape.top_k, replace=False) for _ in range(tokens)])
    token_slots = rng.integers(1, s, size=tokens)
    order = np.argsort(chosen.reshape(-1) * s + np.repeat(token_slots, shape.top_k), kind="stable")[: shape.rows]
    problem["slots"] = jnp.asarray(np.repeat(token_slots, shape.top_k)[order], jnp.int32)
    problem["experts"] = jnp.asarray(chosen.reshape(-1)[order], jnp.int32)
    return problem


def delta_fn(problem: dict, backend, blocks: GpuBlocks | None):
    """(fn, args) computing the problem's float32 delta; x first (the timing loop feeds back into it)."""
    kw = dict(a_rank_major=True, backend=backend, blocks=blocks, slot_ranks=problem["slot_ranks"])
    if "experts" in problem:
        fn = lambda x, s, e, a, b: dispatch.expert_lora_delta(x, s, e, a, b, rows_grouped=True, **kw)
        return fn, (problem["x"], problem["slots"], problem["experts"], problem["a"], problem["b"])
    fn = lambda x, s, a, b: dispatch.lora_delta(x, s, a, b, **kw)
    return fn, (problem["x"], problem["slots"], problem["a"], problem["b"])


class Timer:
    """Device time per call less the loop's own, after checking the output against the reference."""

    def __init__(self, kernels_backend: str, on_device: bool):
        self.kernels, self.on_device = kernels_backend, on_device
        self.base, self.want, self.log = {}, {}, []

    def __call__(self, problem: dict, blocks: GpuBlocks | None, tag: str) -> float:
        """us per call of the kernels with `blocks` (None: the reference's gather + einsum)."""
        key = problem["id"]
        fn, args = delta_fn(problem, self.kernels if blocks is not None else "reference", blocks)
        if key not in self.base:
            self.base[key] = self._time(kernel_timing.identity, args)
            ref, _ = delta_fn(problem, "reference", None)
            self.want[key] = np.asarray(jax.jit(ref)(*args), np.float64)
        got = np.asarray(jax.jit(fn)(*args), np.float64)
        err = float(np.linalg.norm(got - self.want[key]) / max(np.linalg.norm(self.want[key]), 1e-30))
        if not err < 1e-3:
            raise ValueError(f"{tag} on {problem['shape'].name}: relative error {err:.2e} against the reference")
        us = kernel_timing.net_us(self._time(fn, args), self.base[key])
        self.log.append(dict(tag=tag, problem=dataclasses.asdict(problem["shape"]),
                             blocks=None if blocks is None else dataclasses.asdict(blocks), us=us, rel_err=err))
        logging.info("  %-34s %-16s %5d rows %9.1f us", tag, problem["shape"].name, problem["shape"].rows, us)
        return us

    def _time(self, fn, args):
        return kernel_timing.per_call(fn, *args, iters=F.iters, repeats=F.repeats, trace=self.on_device)


def best(candidates: list[GpuBlocks], problems: list[dict], timer: Timer, phase: str) -> GpuBlocks:
    """The candidate with the lowest geometric mean of time / best time per problem; failing candidates (a
    lowering or SMEM limit, a wrong result) are logged and skipped."""
    times = {}
    for cand in candidates:
        try:
            times[cand] = [timer(p, cand, f"{phase} {_short(cand)}") for p in problems]
        except Exception as e:  # noqa: BLE001 (a candidate that cannot run is simply not a choice)
            logging.warning("%s candidate %s failed: %s", phase, _short(cand), str(e).splitlines()[0][:300])
    if not times:
        raise RuntimeError(f"{phase}: no candidate ran")
    floor = np.min(np.array(list(times.values())), axis=0)
    score = {c: float(np.exp(np.mean(np.log(np.maximum(t, 1e-3) / np.maximum(floor, 1e-3)))))
             for c, t in times.items()}
    winner = min(score, key=score.get)
    logging.info("%s: best %s (score %.3f; %d of %d candidates ran)", phase, _short(winner), score[winner],
                 len(times), len(candidates))
    return winner


def _short(b: GpuBlocks) -> str:
    return (f"stages={b.stages} cols={b.expand_cols} tiles={b.expand_tiles} ksplit={b.decode_ksplit} "
            f"decode_rows={b.decode_rows} buckets={b.rank_buckets} window_unit_rows={b.window_unit_rows} "
            f"run_rows={b.run_rows}")


def winning_from(counts, wins) -> int:
    """The smallest probed count from which the kernels won at every larger probed count too; twice the largest
    count when they lost at the largest (past the probes)."""
    crossover = 2 * counts[-1]
    for rows, won in zip(reversed(counts), reversed(wins)):
        if not won:
            break
        crossover = rows
    return crossover


def decode_rows_from(counts, ratios) -> int:
    """The largest probed count up to which the decode variant was not slower at every probed count: at each
    count, the geometric mean over its problems of decode time / prefill time is <= 1. 0: it lost at the
    smallest."""
    decode_rows = 0
    for rows, per_problem in zip(counts, ratios):
        if np.exp(np.mean(np.log(np.maximum(per_problem, 1e-9)))) > 1:
            break
        decode_rows = rows
    return decode_rows


def tune(dtype, entry: GpuBlocks, phases, rng, timer: Timer, tiny: bool) -> dict:
    """The fields each phase settles, starting from `entry` (the table's current settings)."""
    decode_shapes = TINY_DECODE if tiny else DECODE
    fields = {}
    if "prefill" in phases:  # decode_rows=0: every call runs the prefill variant
        prefill = [make_problem(rng, s, dtype) for s in (TINY_PREFILL if tiny else PREFILL)]
        grid = ([(2, 64), (3, 128)] if tiny
                else [(s, c) for s in block_tables.STAGE_CHOICES for c in block_tables.EXPAND_COL_CHOICES])
        cands = [dataclasses.replace(entry, stages=s, expand_cols=c, decode_rows=0) for s, c in grid]
        won = best(cands, prefill, timer, "prefill")
        fields.update(stages=won.stages, expand_cols=won.expand_cols)
        entry = dataclasses.replace(entry, **fields)
    if "decode" in phases:  # decode_rows past every problem: the decode variant
        decode = [make_problem(rng, s, dtype) for s in decode_shapes]
        ksplits = (1, 2) if tiny else block_tables.KSPLIT_CHOICES
        cands = [dataclasses.replace(entry, decode_ksplit=k, decode_rows=1 << 30) for k in ksplits]
        fields["decode_ksplit"] = best(cands, decode, timer, "decode").decode_ksplit
        entry = dataclasses.replace(entry, **fields)
    if "expand" in phases:
        problems = [make_problem(rng, s, dtype) for s in decode_shapes + ([] if tiny else PREFILL)]
        # run_rows 0: the unit-major expand these settings tune (calls on run units take the window-major one)
        cands = [dataclasses.replace(entry, expand_tiles=k, run_rows=0) for k in ((1, 0) if tiny else EXPAND_TILES)]
        fields["expand_tiles"] = best(cands, problems, timer, "expand").expand_tiles
        entry = dataclasses.replace(entry, **fields)
    if "window" in phases:
        shapes = TINY_WINDOW if tiny else decode_shapes + PREFILL + FEW_ADAPTERS
        problems = [make_problem(rng, s, dtype) for s in shapes]
        cands = [dataclasses.replace(entry, window_unit_rows=n, run_rows=0)  # grouped units (run units come first)
                 for n in WINDOW_UNIT_ROWS]
        fields["window_unit_rows"] = best(cands, problems, timer, "window").window_unit_rows
        entry = dataclasses.replace(entry, **fields)
    if "runs" in phases:
        shapes = (TINY_WINDOW if tiny else
                  decode_shapes + FEW_ADAPTERS[:1] + [s for s in PREFILL if s.rows == 2048])
        problems = [make_problem(rng, s, dtype) for s in shapes]
        cands = [dataclasses.replace(entry, run_rows=n) for n in ((0, 1 << 20) if tiny else RUN_ROWS)]
        fields["run_rows"] = best(cands, problems, timer, "runs").run_rows
        entry = dataclasses.replace(entry, **fields)
    if "buckets" in phases:
        problems = [make_problem(rng, s, dtype) for s in (TINY_BUCKETS if tiny else BUCKET_SHAPES)]
        cands = [dataclasses.replace(entry, rank_buckets=on) for on in (False, True)]
        fields["rank_buckets"] = best(cands, problems, timer, "buckets").rank_buckets
        entry = dataclasses.replace(entry, **fields)
    if "crossover" in phases:
        dec, pre = dataclasses.replace(entry, decode_rows=1 << 30), dataclasses.replace(entry, decode_rows=0)
        counts, ratios = TINY_ROWS if tiny else CROSSOVER_ROWS, []
        for rows in counts:
            problems = [make_problem(rng, s.with_rows(rows), dtype) for s in decode_shapes]
            ratios.append([timer(p, dec, "crossover decode") / max(timer(p, pre, "crossover prefill"), 1e-3)
                           for p in problems])
        fields["decode_rows"] = decode_rows_from(counts, ratios)
        entry = dataclasses.replace(entry, **fields)
    if "dispatch" in phases:
        ranks = TINY_DISPATCH_RANKS if tiny else tuple(int(r) for r in F.dispatch_ranks or DISPATCH_RANKS)
        crossovers = [(rank, dispatch_crossover(rng, dtype, entry, timer, rank, tiny)) for rank in ranks]
        floored = merge_by_rank(entry.kernel_min_rows_by_rank,
                                [(rank, max(rows, F.kernel_min_rows_floor)) for rank, rows in crossovers])
        fields.update(kernel_crossover_rows_by_rank=crossovers, kernel_min_rows_by_rank=floored,
                      kernel_min_rows=floored[0][1])
    return fields


def merge_by_rank(old, new) -> list[tuple[int, int]]:
    """(rank, rows) pairs of `new` over those of `old` for the same rank, by rising rank."""
    return sorted({**{int(r): int(n) for r, n in old}, **{int(r): int(n) for r, n in new}}.items())


def dispatch_shapes(rank: int, tiny: bool) -> list[Shape]:
    """The dispatch phase's problems at one pool rank: a dense projection and a per-expert one."""
    if tiny:
        return [Shape("tiny dense", 80, 3, rank, 256, 128)]
    return [Shape(f"dense r{rank}", 64, 32, rank, 4096, 4096),
            Shape(f"qwen3 gate_up r{rank}", 64, 32, rank, 2048, 1536, 128, 8)]


def dispatch_crossover(rng, dtype, entry: GpuBlocks, timer: Timer, rank: int, tiny: bool) -> int:
    """The smallest probed row count from which the kernels beat the reference on every problem of this rank
    (winning_from), probing rising counts until two wins in a row."""
    counts, wins = [], []
    for rows in TINY_ROWS if tiny else DISPATCH_ROWS:
        problems = [make_problem(rng, s.with_rows(rows), dtype) for s in dispatch_shapes(rank, tiny)]
        counts.append(rows)
        wins.append(all(timer(p, entry, "dispatch kernels") < timer(p, None, "dispatch reference")
                        for p in problems))
        if wins[-2:] == [True, True]:
            break
    return winning_from(counts, wins)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    phases = [p for p in PHASES if p in F.phases]
    if unknown := set(F.phases) - set(PHASES):
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    if F.interpret:
        backend, device, kind, on_device = "gpu_interpret", block_tables.INTERPRET, "cpu (interpreter)", False
        F.iters, F.repeats = 1, 1
    else:
        if jax.default_backend() != "gpu":
            raise SystemExit("tune_gpu_lora_blocks.py needs a Hopper GPU (or --interpret for a dry run on CPU)")
        backend, kind, on_device = "gpu", jax.devices()[0].device_kind, True
        device = block_tables.device_key(kind)
    rng = np.random.default_rng(0)
    timer = Timer(backend, on_device)
    table = block_tables.load_table(F.out) if os.path.exists(F.out) else {}
    entries = {}
    for name in F.dtypes:
        key = block_tables.table_key(device, name)
        old = table.get(key, {})
        start = GpuBlocks(**{k: v for k, v in old.items() if k in block_tables.FIELDS})
        done = set(old.get("measured_phases", [])) if not F.interpret else set()
        fields = {}
        for phase in phases:  # each phase's result is written before the next starts (a call may time out)
            fields.update(tune(jnp.dtype(name), start, [phase], rng, timer, tiny=F.interpret))
            if "kernel_crossover_rows_by_rank" in fields:  # the measured crossovers, unfloored, of every rank
                fields["kernel_crossover_rows_by_rank"] = merge_by_rank(
                    old.get("kernel_crossover_rows_by_rank", []), fields["kernel_crossover_rows_by_rank"])
            start = dataclasses.replace(start, **{k: v for k, v in fields.items() if k in block_tables.FIELDS})
            done |= {phase} if not F.interpret else set()
            entries[key] = dict(fields, measured=done == set(PHASES), measured_phases=sorted(done),
                                jax=jax.__version__, device_kind=kind, date=datetime.date.today().isoformat(),
                                source="tools/tune_gpu_lora_blocks.py"
                                + (" --interpret (dry run)" if F.interpret else ""))
            logging.info("%s after %s: %s", key, phase, entries[key])
            _save(entries, kind, phases, timer)


def _save(entries: dict, kind: str, phases, timer: Timer) -> None:
    """The log and the table as they stand (after each phase)."""
    if F.log:
        os.makedirs(os.path.dirname(F.log) or ".", exist_ok=True)
        with open(F.log, "w") as f:
            json.dump(dict(device_kind=kind, jax=jax.__version__, phases=phases, entries=entries,
                           timings=timer.log), f, indent=1)
    if F.write and (not F.interpret or F["out"].present):
        block_tables.write_entries(entries, F.out)
        logging.info("wrote %s", F.out)


if __name__ == "__main__":
    app.run(main)
