"""Generation throughput: this engine against HF transformers + PEFT on the same requests, same GPU.

R requests (P-token prompts, G new tokens, greedy, EOS ignored) over A random rank-r adapters on attention and
experts, random weights of a published model shape (depth may be cut). HF + PEFT cannot mix adapters that use
`target_parameters` in one batch, so its best path is one batched `generate` per adapter (set_adapter, then
generate that adapter's requests together); ours is one continuous-batching run over all requests.
Each phase runs in its own process (never both frameworks on the GPU at once).

    PYTHONPATH=. python3 benchmarks/hf_baseline.py all --model configs/models/mixtral-8x7b.json --num_layers 8 \\
        --requests 64 --adapters 32 --out $OUT/hf_vs_engine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def workload(args, vocab: int):
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, vocab, (args.requests, args.prompt_len)).tolist()
    adapters = [i % args.adapters for i in range(args.requests)]
    return prompts, adapters


def hf_phase(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(args.model) as f:
        spec = json.load(f)
    if args.num_layers:
        spec["num_hidden_layers"] = args.num_layers
    spec.pop("architectures", None)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    lcfg = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, LoraConfig(**lcfg), adapter_name="a0")
    for k in range(1, args.adapters):
        peft_model.add_adapter(f"a{k}", LoraConfig(**lcfg))
    prompts, adapters = workload(args, cfg.vocab_size)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               eos_token_id=None, pad_token_id=0)

    def run_all():
        total = 0
        for k in range(args.adapters):
            rows = [p for p, a in zip(prompts, adapters) if a == k]
            if not rows:
                continue
            peft_model.set_adapter(f"a{k}")
            ids = torch.tensor(rows, device=device)
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
            total += (out.shape[1] - ids.shape[1]) * out.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return total

    with torch.no_grad():
        peft_model.set_adapter("a0")
        peft_model.generate(input_ids=torch.tensor(prompts[:1], device=device), max_new_tokens=2)  # warm-up
        t = time.perf_counter()
        tokens = run_all()
        wall = time.perf_counter() - t
    return {"framework": "hf+peft", "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "peft": __import__("peft").__version__}}


def engine_phase(args) -> dict:
    from infinilora_jax import LLM, SamplingParams
    from infinilora_jax.lora.random_adapter import random_adapter

    targets = ("q", "k", "v", "o", "expert_gate_up", "expert_down")
    llm = LLM(args.model, dtype="bfloat16", num_layers=args.num_layers, max_lora_rank=args.rank,
              lora_targets=targets, max_adapters=args.adapters, max_host_adapters=args.adapters,
              max_num_seqs=args.requests, max_num_batched_tokens=max(512, args.requests),
              max_model_len=args.prompt_len + args.new_tokens + 16, progress=False)
    for k in range(args.adapters):
        llm.runner.adapters.register_weights(random_adapter(llm.config, f"a{k}", args.rank, targets, seed=k,
                                                            dtype=llm.runner.dtype))
    prompts, adapters = workload(args, llm.config.vocab_size)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    names = [f"a{a}" for a in adapters]
    llm.generate(prompts, params, adapter=names)  # warm-up: compile every shape this workload uses
    t = time.perf_counter()
    out = llm.generate(prompts, params, adapter=names)
    wall = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in out)
    return {"framework": "infinilora-jax", "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["hf", "engine", "all"])
    p.add_argument("--model", default="configs/models/mixtral-8x7b.json")
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--out", default="out/hf_vs_engine")
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.phase != "all":
        result = hf_phase(args) if args.phase == "hf" else engine_phase(args)
        with open(f"{args.out}.{args.phase}.json", "w") as f:
            json.dump({**result, "args": vars(args)}, f, indent=1)
        print(json.dumps(result))
        return
    for phase in ("engine", "hf"):
        subprocess.run([sys.executable, __file__, phase, *sys.argv[2:]], check=True)
    res = {ph: json.load(open(f"{args.out}.{ph}.json")) for ph in ("engine", "hf")}
    print(f"  {'':16} {'tokens':>8} {'wall s':>8} {'tokens/s':>10}")
    for ph in ("engine", "hf"):
        r = res[ph]
        print(f"  {r['framework']:16} {r['tokens']:8d} {r['wall_s']:8.2f} {r['tokens_per_s']:10.1f}")
    print(f"  speed-up: {res['engine']['tokens_per_s'] / res['hf']['tokens_per_s']:.1f}x")


if __name__ == "__main__":
    main()
