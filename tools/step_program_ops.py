"""What a compiled decode step is made of: the optimized HLO of the `logits` program, its top-level instructions
counted by kind (each fusion, custom call, GEMM or copy is a kernel launch or a CUDA-graph node), per depth and
with or without LoRA, so the per-layer cost in kernels can be read off two depths.

Why: on one H200 the async decode step at 8 layers (Qwen3 widths) stays at ~5.6-5.8 ms whether the host queues
it in 4.7 ms (no CUDA graphs), 3.3 ms (default) or 2.6 ms (SKIP_TEMP update mode) (fifteenth session): the step
is bound by the device working through ~600 small kernels, so the lever is fewer kernels per layer.

    PYTHONPATH=. python3 tools/step_program_ops.py --layers 2,8 --out $OUT/step_program_ops.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "opt-barrier",
               "partition-id", "replica-id"}
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+ = .*?\s([a-z][\w\-]*)\(")


def entry_ops(hlo: str) -> collections.Counter:
    """Top-level instructions of the ENTRY computation by kind: fusions by their kind (`fusion:kLoop`,
    `fusion:__cublas$gemm`...), custom calls by target, other ops by opcode."""
    counts: collections.Counter = collections.Counter()
    in_entry = False
    for line in hlo.splitlines():
        if line.startswith("ENTRY "):
            in_entry = True
            continue
        if in_entry and line.startswith("}"):
            break
        if not in_entry:
            continue
        m = _INSTR.match(line)
        if not m or m.group(1) in NOT_KERNELS:
            continue
        op = m.group(1)
        if op == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            target = re.search(r'"(?:name|kind)":"([^"]+)"', line)
            op = f"fusion:{target.group(1) if target else (kind.group(1) if kind else '?')}"
        elif op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            op = f"custom-call:{target.group(1) if target else '?'}"
        counts[op] += 1
    return counts


def program_ops(model: str, layers: int, lora: bool, requests: int, rank: int) -> dict:
    from infinilora_jax import LLM
    from infinilora_jax.lora.targets import ALL_TARGETS
    from infinilora_jax.models.batch import padding_batch

    llm = LLM(model, dtype="bfloat16", num_layers=layers, max_lora_rank=rank,
              lora_targets=ALL_TARGETS if lora else (), max_adapters=32, max_host_adapters=32,
              max_num_seqs=requests, max_num_batched_tokens=max(256, requests), max_model_len=512, progress=False)
    engine = llm.engine
    shapes = engine.shapes
    batch = padding_batch(shapes, shapes.tokens(requests), shapes.pages(min(9, shapes.max_pages)), False)
    runner = llm.runner
    t = time.perf_counter()
    compiled = runner.steps.logits.lower(*runner.logits_args(batch, engine.rows_out)).compile()
    seconds = time.perf_counter() - t
    counts = entry_ops(compiled.as_text())
    return {"layers": layers, "lora": lora, "kernels": sum(counts.values()), "compile_s": seconds,
            "by_kind": dict(counts.most_common())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="configs/models/qwen3-30b-a3b.json")
    parser.add_argument("--layers", default="2,8")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        for lora in (False, True):
            rows.append(program_ops(args.model, layers, lora, args.requests, args.rank))
            r = rows[-1]
            print(f"  layers {layers} lora {str(lora):5}: {r['kernels']} kernels (compile {r['compile_s']:.1f} s)",
                  flush=True)
    if len(rows) == 4:  # per layer: the difference between the two depths
        (a0, a1), (b0, b1) = rows[:2], rows[2:]
        span = b0["layers"] - a0["layers"]
        print(f"  per layer: {(b0['kernels'] - a0['kernels']) / span:.1f} kernels without LoRA, "
              f"{(b1['kernels'] - a1['kernels']) / span:.1f} with")
        kinds = sorted(set(b1["by_kind"]) | set(a1["by_kind"]))
        per_layer = {k: (b1["by_kind"].get(k, 0) - a1["by_kind"].get(k, 0)) / span for k in kinds}
        base = {k: (b0["by_kind"].get(k, 0) - a0["by_kind"].get(k, 0)) / span for k in kinds}
        print(f"  {'kind':44} {'per layer':>9} {'of it LoRA':>10}")
        for k in sorted(kinds, key=lambda k: -per_layer[k]):
            if per_layer[k]:
                print(f"  {k[:44]:44} {per_layer[k]:9.1f} {per_layer[k] - base[k]:10.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
