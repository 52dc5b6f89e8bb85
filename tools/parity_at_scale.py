#!/usr/bin/env python3
"""Parity with HF transformers + PEFT at real model widths (random weights, few layers), on the GPU machine.

The tiny CPU fixtures cannot show that the model is right at real shapes (128 experts top-8, head_dim 128, 32k-152k
vocabularies, GQA 8:1 ...). This builds random-weight checkpoints with real widths and a couple of layers, a random
PEFT adapter on attention, router and experts, records HF's logits and greedy tokens, then loads both with this
project's `LLM` and compares.

Two phases, so that torch and JAX never hold the GPU at once (and so the HF part can run in a torch-only venv):
    python tools/parity_at_scale.py hf  --work DIR [--models qwen3-30b-a3b,mixtral-8x7b] [--layers 2]
    python tools/parity_at_scale.py jax --work DIR --json OUT.json
    python tools/parity_at_scale.py all --work DIR --json OUT.json     # both, in subprocesses
On the GPU machine: `PYTHONPATH=. python3 tools/parity_at_scale.py all --work /tmp/pas --json $OUT/parity.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# Real widths of each model (configs/models/*.json, from their published config.json); only the depth is cut.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "models")
MODELS = {name: os.path.join(CONFIG_DIR, f"{name}.json") for name in ("qwen3-30b-a3b", "mixtral-8x7b")}
PROMPT_LEN, NEW_TOKENS, RANK = 48, 12, 16


def hf_phase(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in args.models.split(","):
        with open(MODELS[name]) as f:
            spec = dict(json.load(f), num_hidden_layers=args.layers)
        out = os.path.join(args.work, name)
        os.makedirs(out, exist_ok=True)
        cfg = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "architectures"})
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
                else:
                    std = 0.5 / np.sqrt(cfg.hidden_size) * (4 if ".gate." in pname else 1)
                    p.copy_(std * torch.randn(p.shape, generator=gen, device=device))
        model.eval()
        model.save_pretrained(os.path.join(out, "model"), save_original_format=False)
        lcfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          init_lora_weights=False)
        peft_model = get_peft_model(model, lcfg)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.15 / np.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=gen, device=device))
        peft_model.save_pretrained(os.path.join(out, "adapter"))
        prompt = torch.randint(3, cfg.vocab_size, (1, PROMPT_LEN), generator=gen, device=device)
        ref = {"prompt": prompt[0].cpu().numpy()}
        with torch.no_grad():
            for variant in ("adapter", "base"):
                if variant == "base":
                    peft_model.disable_adapter_layers()
                run = peft_model
                ref[f"logits_{variant}"] = run(input_ids=prompt).logits[0].float().cpu().numpy()
                seq = prompt
                for _ in range(NEW_TOKENS):  # greedy by teacher-forced argmax: no cache, no generate() quirks
                    nxt = run(input_ids=seq).logits[0, -1].argmax().view(1, 1)
                    seq = torch.cat([seq, nxt], dim=1)
                ref[f"greedy_{variant}"] = seq[0, PROMPT_LEN:].cpu().numpy()
        np.savez(os.path.join(out, "reference.npz"), **ref)
        print(f"[hf] {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, reference written",
              flush=True)
        del model, peft_model
        torch.cuda.empty_cache() if device == "cuda" else None


def jax_phase(args):
    import jax

    from infinilora_jax import LLM, SamplingParams

    print(f"[jax] devices: {jax.devices()}", flush=True)
    rows = []
    for name in args.models.split(","):
        work = os.path.join(args.work, name)
        ref = dict(np.load(os.path.join(work, "reference.npz")))
        prompt = ref["prompt"].tolist()
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            llm = LLM(os.path.join(work, "model"), adapters={"a": os.path.join(work, "adapter")}, dtype=dtype,
                      max_lora_rank=2 * RANK, progress=False)
            load_s = time.perf_counter() - t0
            for variant, adapter in (("base", None), ("adapter", "a")):
                want = ref[f"logits_{variant}"]
                got = llm.logits(prompt, adapter)
                err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
                greedy = llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0,
                                                               ignore_eos=True), adapter=adapter)[0].token_ids
                same = int(np.argmin(np.asarray(greedy) == ref[f"greedy_{variant}"])) if greedy != ref[
                    f"greedy_{variant}"].tolist() else NEW_TOKENS
                rows.append(dict(model=name, dtype=dtype, variant=variant, rel_err=err, top1_agree=top1,
                                 greedy_prefix_match=same, load_s=round(load_s, 1)))
                print(f"[jax] {name:14s} {dtype:8s} {variant:7s} rel_err={err:.2e} top1={top1:.3f} "
                      f"greedy_match={same}/{NEW_TOKENS}", flush=True)
            del llm
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["hf", "jax", "all"])
    p.add_argument("--work", required=True)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.phase == "hf":
        hf_phase(args)
    elif args.phase == "jax":
        jax_phase(args)
    else:
        base = [sys.executable, __file__, "--work", args.work, "--models", args.models]
        subprocess.run(base[:2] + ["hf"] + base[2:] + ["--layers", str(args.layers)], check=True)
        subprocess.run(base[:2] + ["jax"] + base[2:] + (["--json", args.json] if args.json else []), check=True)


if __name__ == "__main__":
    main()
