"""Regenerate pallas_kernels/tpu/tuned_blocks.json by timing the TPU LoRA kernels on this TPU.

NOT RUN YET: it needs a TPU, and none has been available to this project; every entry in tuned_blocks.json
therefore says "measured": false and holds a heuristic. On a TPU VM (jax 0.11.2 with libtpu):

    PYTHONPATH=. python tools/tune_tpu_lora_blocks.py --dtypes bfloat16,float32

What it does, per activation dtype:
  1. prefill: for each candidate (token_tile, col_tile, rank_block) times `add_lora_fused` with the prefill
     variant on a few prefill-shaped problems (thousands of tokens over tens of adapters, fused q/k/v-like
     outputs, heterogeneous ranks); keeps the candidate with the lowest geometric mean of time / best time.
  2. decode: for each (decode_col_tile, rank_block) times the decode variant on decode-shaped problems.
  3. crossover: times both variants at growing row counts and sets decode_rows to the largest count where the
     decode variant is not slower.
Each timing runs the op `--iters` times inside one jitted `fori_loop` (the output feeds the next iteration),
so host dispatch stays out; it reports the median of `--repeats`. The device's entry ("<device>/<dtype>") is
rewritten with "measured": true plus the jax version and device kind; other entries are kept.

`--interpret` runs the same flow on CPU with tiny problems and the Pallas TPU interpreter: it checks the
script, not the numbers (its timings mean nothing), and writes to --out only when asked.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels import block_table_file, dispatch  # noqa: E402
from pallas_kernels.tpu import block_tables  # noqa: E402
from pallas_kernels.tpu.ops import Blocks  # noqa: E402

F = flags.FLAGS
flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "activation / page dtypes to tune")
flags.DEFINE_integer("iters", 20, "kernel calls per timed jitted loop")
flags.DEFINE_integer("repeats", 5, "timed loops per candidate (median reported)")
flags.DEFINE_string("out", block_tables.TABLE_PATH, "table to rewrite")
flags.DEFINE_bool("interpret", False, "dry run on CPU with tiny shapes (checks the script only)")
flags.DEFINE_bool("write", True, "write the table (with --interpret only if --out is given explicitly)")

# (tokens, adapters, d_in, output widths, pool rank): fused q/k/v of an H=4096 GQA model, an expert-sized down.
PREFILL_PROBLEMS = [(2048, 16, 4096, (4096, 1024, 1024), 64), (8192, 64, 4096, (4096, 1024, 1024), 64),
                    (4096, 32, 14336, (4096,), 32)]
DECODE_PROBLEMS = [(16, 8, 4096, (4096, 1024, 1024), 64), (64, 32, 4096, (4096, 1024, 1024), 64),
                   (128, 64, 4096, (4096, 1024, 1024), 16)]
CROSSOVER_ROWS = [32, 64, 128, 256, 512, 1024]
TINY_PREFILL = [(300, 4, 128, (256, 128), 16)]
TINY_DECODE = [(24, 4, 128, (256, 128), 16)]
TINY_CROSSOVER = [16, 200]


def make_problem(rng, tokens, adapters, d_in, widths, rank, dtype):
    """Random pool pages (ranks drawn from {rank/4, rank/2, rank}), inputs and outputs; ~1/8 rows slot 0.
    A is stored rank-major ([S, R, D_in]) so that the timed loop holds no transpose of the pool."""
    slots_n = adapters + 1
    ranks = np.concatenate([[0], rng.choice([max(rank // 4, 1), max(rank // 2, 1), rank], size=adapters)])
    pairs = []
    for w in widths:
        a = rng.normal(size=(slots_n, rank, d_in)).astype(np.float32) / np.sqrt(d_in)
        b = rng.normal(size=(slots_n, rank, w)).astype(np.float32)
        for s, r in enumerate(ranks):
            a[s, r:] = 0
            b[s, r:] = 0
        pairs.append((jnp.asarray(a, dtype), jnp.asarray(b, dtype)))
    x = jnp.asarray(rng.normal(size=(tokens, d_in)), dtype)
    slots = np.where(rng.random(tokens) < 0.125, 0, rng.integers(1, slots_n, size=tokens))
    ys = tuple(jnp.asarray(rng.normal(size=(tokens, w)), dtype) for w in widths)
    return ys, x, jnp.asarray(slots, jnp.int32), tuple(pairs), jnp.asarray(ranks, jnp.int32)


def time_blocks(problem, blocks: Blocks, backend) -> float:
    """Median seconds per call of add_lora_fused with these blocks."""
    ys, x, slots, pairs, ranks = problem

    def loop(ys, x, slots, pairs, ranks):
        body = lambda _, ys: dispatch.add_lora_fused(ys, x, slots, pairs, slot_ranks=ranks, a_rank_major=True,
                                                     backend=backend, blocks=blocks)
        return jax.lax.fori_loop(0, F.iters, body, ys)

    run = jax.jit(loop)
    jax.block_until_ready(run(ys, x, slots, pairs, ranks))  # compile + warm up
    times = []
    for _ in range(F.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(ys, x, slots, pairs, ranks))
        times.append((time.perf_counter() - t0) / F.iters)
    return statistics.median(times)


def best(candidates, problems, timer) -> tuple[Blocks, dict]:
    """Candidate with the lowest geometric mean of time / (best time of that problem); failures are skipped."""
    table = {}
    for cand in candidates:
        try:
            table[cand] = [timer(p, cand) for p in problems]
        except Exception as e:  # a candidate that does not compile (VMEM, layout) is simply not a choice
            logging.warning("candidate %s failed: %s", cand, str(e).splitlines()[0][:200])
    if not table:
        raise RuntimeError("no candidate ran")
    floor = np.min(np.array(list(table.values())), axis=0)
    score = {c: float(np.exp(np.mean(np.log(np.array(t) / floor)))) for c, t in table.items()}
    winner = min(score, key=score.get)
    logging.info("best %s (score %.3f); times %s", winner, score[winner], table[winner])
    return winner, {str(c): t for c, t in table.items()}


def tune(dtype, rng, backend, tiny: bool) -> dict:
    prefill = [make_problem(rng, *p, dtype) for p in (TINY_PREFILL if tiny else PREFILL_PROBLEMS)]
    decode = [make_problem(rng, *p, dtype) for p in (TINY_DECODE if tiny else DECODE_PROBLEMS)]
    rank_blocks = (8, 16) if tiny else (8, 16, 32)
    # 1. prefill tiles (decode_rows=1 forces the prefill variant)
    grid = itertools.product((128,) if tiny else (128, 256, 512), (256,) if tiny else (256, 512, 1024, 2048),
                             rank_blocks)
    cands = [Blocks(token_tile=tm, col_tile=tn, rank_block=rb, decode_rows=1) for tm, tn, rb in grid]
    pre, _ = best(cands, prefill, lambda p, b: time_blocks(p, b, backend))
    # 2. decode tiles (decode_rows large forces the decode variant)
    grid = itertools.product((256,) if tiny else (512, 1024, 2048, 4096), rank_blocks)
    cands = [Blocks(decode_col_tile=tn, rank_block=rb, decode_rows=1 << 20) for tn, rb in grid]
    dec, _ = best(cands, decode, lambda p, b: time_blocks(p, b, backend))
    # 3. crossover, with the prefill winner's rank block for both variants
    rb = pre.rank_block
    decode_rows = min(TINY_CROSSOVER if tiny else CROSSOVER_ROWS)
    shape = (TINY_DECODE if tiny else DECODE_PROBLEMS)[-1]
    for rows in TINY_CROSSOVER if tiny else CROSSOVER_ROWS:
        problem = make_problem(rng, rows, *shape[1:], dtype)
        t_dec = time_blocks(problem, Blocks(decode_col_tile=dec.decode_col_tile, rank_block=rb,
                                            decode_rows=1 << 20), backend)
        t_pre = time_blocks(problem, Blocks(token_tile=pre.token_tile, col_tile=pre.col_tile, rank_block=rb,
                                            decode_rows=1), backend)
        logging.info("rows %d: decode %.1f us, prefill %.1f us", rows, t_dec * 1e6, t_pre * 1e6)
        if t_dec <= t_pre:
            decode_rows = rows
    return dict(token_tile=pre.token_tile, col_tile=pre.col_tile, decode_col_tile=dec.decode_col_tile,
                rank_block=rb, decode_rows=decode_rows)


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    if F.interpret:
        backend, device, kind = "tpu_interpret", "interpret", "cpu (interpreter)"
        F.iters, F.repeats = 1, 1
    else:
        if jax.default_backend() != "tpu":
            raise SystemExit("tune_tpu_lora_blocks.py needs a TPU (or --interpret for a dry run on CPU)")
        backend = "tpu"
        kind = jax.devices()[0].device_kind
        device = block_tables.device_key(kind)
    rng = np.random.default_rng(0)
    entries = {}
    for name in F.dtypes:
        dtype = jnp.dtype(name)
        entry = tune(dtype, rng, backend, tiny=F.interpret)
        entry.update(measured=not F.interpret, jax=jax.__version__, device_kind=kind)
        entries[block_tables.table_key(device, dtype)] = entry
        logging.info("%s: %s", block_tables.table_key(device, dtype), entry)
    if F.write and (not F.interpret or F["out"].present):
        block_table_file.write_entries(entries, F.out)
        logging.info("wrote %s", F.out)


if __name__ == "__main__":
    app.run(main)
