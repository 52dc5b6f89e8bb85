"""Layer-wise adapter loading: does a step that brings in a new adapter overlap the copy with its compute?

B requests decode on one resident adapter while other adapters cycle through the remaining device slots (each
trial loads an adapter that is not resident, evicting the least recently used one). The adapters' pages are
already staged in pinned host memory (the host store keeps them there once loaded), so a load is one host-to-device
copy per layer. Per trial, interleaved, each timed to the sampled tokens on the host:

    plain      a decode step, nothing to load
    layerwise  a decode step that carries the load: layer l's pages are copied inside the step (models/step.py)
    eager      the load written into the pool first (a jitted, donated write per layer slot), then the step
    copy       the host-to-device copy of one adapter's pages alone

With overlap, layerwise ~ max(plain, copy) while eager ~ plain + copy.

    python benchmarks/layerwise_loading.py --model configs/models/mixtral-8x7b.json --num_layers 8 --out $OUT/lw
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

from infinilora_jax import LLM, SamplingParams  # noqa: E402
from infinilora_jax.lora.random_adapter import random_adapter  # noqa: E402
from infinilora_jax.lora.targets import ALL_TARGETS  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("model", None, "configs/models/*.json (random weights) or an HF dir; default: bundled tiny")
flags.DEFINE_integer("num_layers", None, "cut the model to this many layers")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "")
flags.DEFINE_integer("requests", 32, "decoding requests (all on one resident adapter)")
flags.DEFINE_integer("rank", 16, "")
flags.DEFINE_list("targets", list(ALL_TARGETS), "")
flags.DEFINE_integer("slots", 4, "device adapter slots")
flags.DEFINE_integer("cycle", 8, "adapters cycled through the other slots")
flags.DEFINE_integer("trials", 12, "")
flags.DEFINE_integer("cpu_devices", 0, "on CPU, split the host into this many devices")
flags.DEFINE_string("out", None, "write <out>.json")

MODES = ("plain", "layerwise", "eager", "copy")


def main(argv):
    del argv
    if F.cpu_devices:
        jax.config.update("jax_num_cpu_devices", F.cpu_devices)
    targets = tuple(F.targets)
    llm = LLM(F.model, dtype=F.dtype, num_layers=F.num_layers, max_lora_rank=F.rank, lora_targets=targets,
              max_adapters=F.slots, max_host_adapters=F.cycle + 1, max_num_seqs=F.requests,
              max_num_batched_tokens=max(256, F.requests), max_model_len=512, progress=False)
    cache, engine = llm.runner.adapters, llm.engine
    names = [f"a{k}" for k in range(F.cycle + 1)]
    for k, name in enumerate(names):
        cache.register_weights(random_adapter(llm.config, name, F.rank, targets, seed=k, dtype=llm.runner.dtype))
    staged = {n: cache.staged_pages(n) for n in names}  # the host store's pinned copies
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(staged[names[0]]))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    for _ in range(F.requests):
        engine.add_request(rng.integers(3, llm.config.vocab_size, 32).tolist(), params, names[0])
    while any(len(r.output_token_ids) == 0 for r in engine.requests.values()):
        engine.step()
    to_device = jax.tree.map(lambda a: a.sharding.with_memory_kind("device"), staged[names[0]])
    cycle = iter(np.tile(names[1:], 1000))

    def load_next():
        name = str(next(cycle))
        cache.acquire(name)  # a miss: takes (evicts) a slot and records a pending load
        cache.release(name)
        assert cache.pending, "the adapter was already resident"

    def timed(mode: str) -> float:
        if mode == "copy":
            t = time.perf_counter()
            jax.block_until_ready(jax.device_put(staged[names[1]], to_device))
            return time.perf_counter() - t
        if mode != "plain":
            load_next()
        t = time.perf_counter()
        if mode == "eager":
            cache.flush()
        outs = engine.step()
        elapsed = time.perf_counter() - t
        assert len(outs) == F.requests and not cache.pending
        return elapsed

    for mode in MODES:  # compile
        timed(mode)
    times = {m: [] for m in MODES}
    for _ in range(F.trials):
        for mode in MODES:
            times[mode].append(timed(mode))
    ms = {m: 1e3 * float(np.median(v)) for m, v in times.items()}
    hidden = (ms["eager"] - ms["layerwise"]) / ms["copy"] if ms["copy"] > 0 else float("nan")
    print(f"  model {F.model or 'bundled tiny'} layers={F.num_layers or 'all'} dtype={F.dtype} "
          f"requests={F.requests} rank={F.rank} adapter={adapter_bytes / 2**20:.1f} MiB on {jax.devices()[0]}")
    print(f"  {'mode':10} {'ms (median)':>12}")
    for m in MODES:
        print(f"  {m:10} {ms[m]:12.2f}")
    print(f"  share of the copy hidden by layer-wise loading: {hidden:.2f} "
          f"(eager - layerwise) / copy; layerwise / plain = {ms['layerwise'] / ms['plain']:.3f}")
    if F.out:
        os.makedirs(os.path.dirname(F.out) or ".", exist_ok=True)
        with open(F.out + ".json", "w") as f:
            json.dump({"ms_median": ms, "times_s": times, "copy_hidden": hidden, "adapter_bytes": adapter_bytes,
                       "device": str(jax.devices()[0]),
                       "config": {k: getattr(F, k) for k in ("model", "num_layers", "dtype", "requests", "rank",
                                                             "slots", "cycle", "trials")}}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
