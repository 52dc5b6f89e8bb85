#!/usr/bin/env python3
"""Disaggregated 1+1 against coupled mode and the HF + PEFT references, on two real devices (the 2-GPU machine).

The CPU tests check the role layouts on fake devices; this checks that the same step, with real NCCL point-to-point
pushes between two GPUs, gives the same outputs (issue 6, item 6):
  float32, tiny Qwen3-MoE fixture with its four PEFT adapters: greedy tokens of every (prompt, adapter) pair in one
      mixed batch equal HF's; logits within 1e-4 of HF's and 1e-5 of coupled mode on one device;
  bfloat16, tiny Mixtral fixture: logits as close to HF's float32 logits as HF's own bf16 run (2e-2 or 2x HF's
      error), at positions whose routing is not fragile under bf16 rounding (as tests/test_parity_hf.py measures);
  coupled, one device: the platform's attention kernel (GPU: the Pallas paged decode kernel) in bf16 is as close
      to float32 as the reference attention in bf16 is (first decode step's top-20 logprobs; attention_rows).
Prints a table and exits non-zero on any mismatch.

    PYTHONPATH=. python3 tools/gpu_disagg_parity.py --json $OUT/disagg_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU host
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def _rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def _fixture(model: str):
    root = os.path.join(FIXTURES, "adapters", model)
    adapters = {n: os.path.join(root, n) for n in sorted(os.listdir(root))}
    with np.load(os.path.join(FIXTURES, "reference", f"{model}.npz")) as data:
        ref = dict(data)
    return os.path.join(FIXTURES, "models", model), adapters, ref


def float32_rows(layout: str) -> list[dict]:
    from infinilora_jax import LLM, SamplingParams

    model_path, adapters, ref = _fixture("qwen3-moe-fused")
    variants = ["base", *adapters]
    prompts = [ref[f"prompt_{i}"].tolist() for i in range(3)]
    kwargs = dict(adapters=adapters, dtype="float32", max_num_seqs=16, max_model_len=128, progress=False)
    disagg = LLM(model_path, mesh=layout, mode="disaggregated", **kwargs)
    coupled = LLM(model_path, mesh="single", **kwargs)
    rows = []
    for v in variants:
        name = None if v == "base" else v
        got = disagg.logits(prompts[0], name)
        rows.append({"check": f"f32 logits {v}", "vs_hf": _rel_err(got, ref[f"logits_f32__{v}__0"]),
                     "vs_coupled": _rel_err(got, coupled.logits(prompts[0], name)), "limit": 1e-4})
    jobs = [(i, v) for i in range(3) for v in variants]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = disagg.generate([prompts[i] for i, _ in jobs], greedy, adapter=[None if v == "base" else v for _, v in jobs])
    equal = sum(o.token_ids == ref[f"greedy__{v}__{i}"].tolist() for (i, v), o in zip(jobs, outs))
    rows.append({"check": "f32 greedy tokens, mixed batch", "equal": equal, "of": len(jobs)})
    return rows


def bfloat16_rows(layout: str) -> list[dict]:
    from infinilora_jax import LLM

    model_path, adapters, ref = _fixture("mixtral-fused")
    llm = LLM(model_path, adapters=adapters, dtype="bfloat16", mesh=layout, mode="disaggregated", max_model_len=64,
              max_num_seqs=2, num_pages=256, progress=False)
    rows = []
    for v in ["base", *adapters]:
        keep = ref[f"router_gap_f32__{v}__0"] >= 0.1
        keep[ref[f"bf16_route_flips__{v}__0"][:, 1]] = False
        want = ref[f"logits_f32__{v}__0"][keep]
        ours = _rel_err(llm.logits(ref["prompt_0"].tolist(), None if v == "base" else v)[keep], want)
        hf = _rel_err(ref[f"logits_bf16__{v}__0"][keep], want)
        rows.append({"check": f"bf16 logits {v}", "vs_hf": ours, "hf_bf16": hf, "limit": max(2e-2, 2 * hf)})
    return rows


def attention_rows() -> list[dict]:
    """Coupled, one device: the platform's attention kernel backend (it serves decode rows) against the reference
    backend, at the first decode step of every (prompt, adapter) pair, where both have identical inputs (the
    prefill runs the reference in both). The distance of that step's top-20 logprobs from float32's must stay
    within twice bf16's own (the reference backend in bf16): on this tiny MoE model bf16 rounding alone flips
    routing and tokens, so token equality would say nothing."""
    import jax

    from infinilora_jax import LLM, SamplingParams
    from infinilora_jax.models import attention

    kernel = {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend())
    if kernel is None:
        return []
    model_path, adapters, ref = _fixture("mixtral-fused")
    jobs = [(i, v) for i in range(3) for v in ["base", *adapters]]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=20)
    tops = {}
    for label, backend, dtype in (("f32", "reference", "float32"), ("bf16", "reference", "bfloat16"),
                                  (kernel, kernel, "bfloat16")):
        with attention.use_backend(backend):
            llm = LLM(model_path, adapters=adapters, dtype=dtype, mesh="single", max_model_len=64, max_num_seqs=16,
                      progress=False)
        ids = llm._submit([ref[f"prompt_{i}"].tolist() for i, _ in jobs], params,
                          [None if v == "base" else v for _, v in jobs])
        got = {rid: [] for rid in ids}
        for out in llm._run(ids):
            got[out.request_id].extend((lp.token_id, dict(lp.top)) for lp in out.new_logprobs or [])
        tops[label] = [got[rid] for rid in ids]
        del llm

    def distance(a: str, b: str) -> float:
        """Median over pairs whose first token agrees (else the decode steps' inputs differ) of the mean
        |logprob difference| over the tokens both top-20 lists hold."""
        per_job = [np.mean([abs(x[1][1][t] - y[1][1][t]) for t in x[1][1].keys() & y[1][1].keys()])
                   for x, y in zip(tops[a], tops[b]) if x[0][0] == y[0][0]]
        return float(np.median(per_job)) if per_job else float("inf")

    ours, bf16 = distance(kernel, "f32"), distance("bf16", "f32")
    return [{"check": f"attention {kernel}: 1st decode step", "vs_f32": ours, "bf16_vs_f32": bf16,
             "kernel_vs_bf16": distance(kernel, "bf16"), "limit": 2 * bf16 + 1e-3}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="1+1")
    parser.add_argument("--json", default=None)
    parser.add_argument("--parts", default="float32,bfloat16,attention")
    args = parser.parse_args()
    import jax

    print(f"devices: {jax.devices()}", flush=True)
    parts = args.parts.split(",")
    rows = [*(float32_rows(args.layout) if "float32" in parts else []),
            *(bfloat16_rows(args.layout) if "bfloat16" in parts else []),
            *(attention_rows() if "attention" in parts else [])]
    failed = 0
    for r in rows:
        if "bf16_vs_f32" in r:
            ok = r["vs_f32"] <= r["limit"]
            print(f"  {r['check']:40} top-20 logprobs vs f32 {r['vs_f32']:.2e} (bf16 reference {r['bf16_vs_f32']:.2e};"
                  f" vs bf16 reference {r['kernel_vs_bf16']:.2e})  {'ok' if ok else 'FAIL'}")
        elif "equal" in r:
            ok = r["equal"] == r["of"]
            print(f"  {r['check']:40} {r['equal']}/{r['of']} equal to HF  {'ok' if ok else 'FAIL'}")
        else:
            ok = r["vs_hf"] < r["limit"] and r.get("vs_coupled", 0.0) < 1e-5
            extra = f"  vs coupled {r['vs_coupled']:.2e}" if "vs_coupled" in r else f"  (HF bf16 {r['hf_bf16']:.2e})"
            print(f"  {r['check']:40} vs HF {r['vs_hf']:.2e}{extra}  {'ok' if ok else 'FAIL'}")
        r["ok"] = bool(ok)
        failed += not ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": [str(d) for d in jax.devices()], "layout": args.layout, "rows": rows}, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
