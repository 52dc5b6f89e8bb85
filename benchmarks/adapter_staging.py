"""First-time staging of an adapter: the host work before its first load (its pool pages built on the host and
put in pinned host memory, `AdapterCache.staged_pages`), coupled against disaggregated (1+1: the LoRA device's
block, plus the base device's zero block).

The host store keeps an adapter's staged pages, so only the first load of each adapter (or the first after the
host store dropped it) pays this; with step loading the step that carries that load waits for it. Random weights
at a model's widths, cut to --num_layers; each adapter is staged once, the median over --adapters is reported.

    python benchmarks/adapter_staging.py --model configs/models/mixtral-8x7b.json --num_layers 1 --rank 64 \\
        --out out/adapter_staging
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", "configs/models/mixtral-8x7b.json", "configs/models/*.json (random weights)")
flags.DEFINE_integer("num_layers", 1, "cut the model to this many layers")
flags.DEFINE_integer("rank", 64, "")
flags.DEFINE_integer("adapters", 4, "adapters staged per mode (each once)")
flags.DEFINE_list("modes", ["coupled", "disaggregated"], "")
flags.DEFINE_string("out", "out/adapter_staging", "output prefix (.json)")


def stage_seconds(mode: str) -> list[float]:
    from infinilora_jax.bench import replay

    kwargs = dict(mode="disaggregated", mesh="1+1") if mode == "disaggregated" else {}
    llm, names = replay.benchmark_llm(F.model, F.adapters, F.rank, F.adapters, dtype="bfloat16",
                                      num_layers=F.num_layers, precompile=False, distinct=1, max_num_seqs=4,
                                      max_model_len=128, **kwargs)
    cache = replay.adapter_caches(llm.engine)[0]
    out = []
    for name in names:
        start = time.perf_counter()
        jax.block_until_ready(cache.staged_pages(name))
        out.append(time.perf_counter() - start)
    return out


def main(argv):
    del argv
    if "disaggregated" in F.modes:
        jax.config.update("jax_num_cpu_devices", 2)  # the CPU backend only; before any backend starts
    rows = {mode: stage_seconds(mode) for mode in F.modes}
    print(f"\n  first-time staging per adapter ({F.model}, {F.num_layers} layer(s), rank {F.rank}), seconds")
    print(f"  {'mode':>14} {'median':>8} {'min':>8} {'max':>8}")
    for mode, secs in rows.items():
        print(f"  {mode:>14} {np.median(secs):8.3f} {min(secs):8.3f} {max(secs):8.3f}")
    os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
    with open(F.out + ".json", "w") as f:
        json.dump({"config": {k: getattr(F, k) for k in ("model", "num_layers", "rank", "adapters")},
                   "device": str(jax.devices()[0].device_kind), "seconds": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
