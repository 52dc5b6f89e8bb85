#!/usr/bin/env python3
"""Correctness oracle: build tiny random HF MoE checkpoints + PEFT adapters and record reference outputs.

The JAX tests (which run without torch) compare against the files written here.

Regenerate everything (one entry point; the legacy part re-invokes this script under a transformers-4 venv):

    .venv-oracle/bin/python tools/make_fixtures.py

Options: ``--legacy-python PATH`` (default: ``$INFINILORA_LEGACY_PYTHON`` or ``.venv-oracle-legacy/bin/python``),
``--skip-legacy`` (only the transformers-5 part; legacy checks re-use the legacy files already on disk),
``--out DIR`` (default ``tests/fixtures``), ``--assets DIR`` (default ``infinilora_jax/assets/tiny-qwen3-moe``).
``--legacy`` is internal: it runs only the transformers-4 part and must run under the legacy venv.

Venvs (python3.11, both git-ignored via ``.git/info/exclude``):
    .venv-oracle         torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2, safetensors, tokenizers, numpy
    .venv-oracle-legacy  torch 2.13.0+cpu, transformers 4.57.6, peft 0.17.1, safetensors, numpy
        python3.11 -m venv .venv-oracle-legacy
        .venv-oracle-legacy/bin/pip install torch==2.13.0 transformers==4.57.6 peft==0.17.1 safetensors numpy

Layout (see tests/fixtures/README.md): models/<name>/ (bf16 safetensors), adapters/<name>/<adapter>/ (PEFT dirs,
bf16 LoRA weights), reference/<name>.npz + .json, manifest.json.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("make_fixtures")
REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
PROMPT_LENS = (11, 6, 17)
NEW_TOKENS = 8
INIT_STD = 0.15  # linear weights ~N(0, 0.15): O(1) logits and varied (non-repeating) greedy continuations
EMBED_STD = 0.1
NORM_STD = 0.1  # RMSNorm weights ~1 + N(0, 0.1), so a mis-applied norm weight shows up
ROUTER_STD = 0.5  # peakier router: fewer near-ties in the top-k choice, so bf16 flips routing less often
REL_CHANGE_RANGE = (0.05, 0.50)  # adapter must change the logits by this relative L2 amount
REL_CHANGE_TARGET = 0.2  # lora_B is rescaled (calibrated) towards this relative change
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              rope_theta=1e6, max_position_embeddings=2048, rms_norm_eps=1e-6)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Adapters of both fused (transformers 5) models. Dense-MLP targets (gate_proj/up_proj/down_proj) are not possible
# there: PEFT 0.21 rewrites those names into expert target_parameters for MoE models (its v4->v5 conversion).
FUSED_ADAPTERS = {
    "attn-experts-r8": dict(r=8, lora_alpha=16, target_modules=ATTN,
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "attn-r4-rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                           target_parameters=["mlp.experts.down_proj"]),
    "attn-layers02-r16": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj"], layers_to_transform=[0, 2]),
    # PEFT 0.21 expands all-linear on transformers 5 into attention + router (`gate.weight`) + experts.
    "all-linear-r4": dict(r=4, lora_alpha=8, target_modules="all-linear"),
}

# name -> spec. "adapters": name -> LoraConfig kwargs.
MODELS = {
    "mixtral-fused": dict(
        family="mixtral", layout="fused", sharded=False, seed=1001,
        config=dict(COMMON, head_dim=16, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False, sliding_window=None),
        adapters=FUSED_ADAPTERS),
    "qwen3-moe-fused": dict(
        family="qwen3_moe", layout="fused", sharded=False, seed=2002,
        config=dict(COMMON, head_dim=32, moe_intermediate_size=48, intermediate_size=128, num_experts=8,
                    num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0),
        generation=dict(bos_token_id=0, eos_token_id=[2, 0], pad_token_id=0),
        adapters=FUSED_ADAPTERS),
    "mixtral-legacy": dict(
        family="mixtral", layout="legacy", sharded=True, seed=3003,
        config=dict(COMMON, head_dim=16, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False, sliding_window=None),
        adapters={
            "experts-legacy-r8": dict(r=8, lora_alpha=32,  # "gate": the router, an nn.Linear in transformers 4
                                      target_modules=["q_proj", "v_proj", "w1", "w2", "w3", "gate"]),
            "attn-legacy-r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"]),
        }),
    "qwen3-moe-legacy": dict(
        family="qwen3_moe", layout="legacy", sharded=True, seed=4004,
        config=dict(COMMON, head_dim=16, moe_intermediate_size=48, intermediate_size=128, num_experts=8,
                    num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                    tie_word_embeddings=False),
        adapters={
            "experts-legacy-r8": dict(r=8, lora_alpha=32,  # "gate": the router, an nn.Linear in transformers 4
                                      target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj",
                                                      "gate"]),
            "attn-legacy-r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj"]),
        }),
}

TOKENIZER_TEXT = """\
InfiniLoRA serves many low-rank adapters on top of one shared mixture-of-experts model. Each request names the
adapter it wants, and the server batches requests for different adapters together so the expensive base weights
are read once per step. The router of every sparse layer sends each token to a few experts; the adapters may touch
the attention projections, the experts, or both.
The quick brown fox jumps over the lazy dog. A small model with random weights cannot say anything useful, but it
can still be exact: the same prompt must give the same tokens on every machine, in every precision we claim to
support, with or without the adapter cache being warm.
Hello, world! How are you today? I am fine, thank you. What is the weather like? It is sunny with a light breeze,
and the temperature is twenty-one degrees. Numbers such as 0, 1, 2, 3, 42, 100, 2024 and 3.14159 appear in text too.
def add(a, b):
    return a + b
print(add(2, 3))  # prints 5
The system prompt says: you are a helpful assistant. The user asks a question and the assistant answers it politely,
briefly and correctly. When the answer is not known, the assistant says so instead of making something up.
"""


# ----------------------------------------------------------------------------------------------------- helpers
def hf_major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def versions() -> dict:
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def make_prompts(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in PROMPT_LENS]


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps, so re-runs are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def model_class(family: str):
    import transformers
    return {"mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
            "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}[family]


def load_model(spec: dict, path: Path, dtype=torch.float32):
    kw = dict(dtype=dtype, attn_implementation="eager")
    if hf_major() >= 5:
        kw["experts_implementation"] = "eager"
    model = model_class(spec["family"])[1].from_pretrained(str(path), **kw)
    return model.eval()


def reset_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------------- model building
@torch.no_grad()
def build_model(name: str, spec: dict, out_dir: Path) -> None:
    """Random model (seeded, in named_parameters order), stored as bf16 safetensors."""
    torch.manual_seed(spec["seed"])
    cfg_cls, model_cls = model_class(spec["family"])
    config = cfg_cls(**spec["config"])
    model = model_cls(config)
    gen = torch.Generator().manual_seed(spec["seed"])
    for pname, p in model.named_parameters():  # tied lm_head is skipped (deduplicated)
        noise = torch.randn(p.shape, generator=gen)
        std = ROUTER_STD if pname.endswith(".gate.weight") else EMBED_STD if "embed_tokens" in pname else INIT_STD
        p.copy_(1.0 + NORM_STD * noise if p.ndim == 1 else std * noise)
    model = model.to(torch.bfloat16)
    for k, v in spec.get("generation", {}).items():
        setattr(model.generation_config, k, v)
    kw = {"max_shard_size": "600KB" if spec["sharded"] else "100MB"}  # sharded: 2..3 files + index.json
    if spec["layout"] == "fused":
        # transformers 5 save_pretrained defaults to save_original_format=True, which *reverts* the fused experts
        # to the legacy per-expert keys; keep the v5-native fused layout instead.
        kw["save_original_format"] = False
    model.save_pretrained(str(out_dir), **kw)
    files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    if spec["sharded"]:
        assert 2 <= len(files) <= 3 and (out_dir / "model.safetensors.index.json").exists(), files
    else:
        assert files == ["model.safetensors"], files
    keys = checkpoint_keys(out_dir)
    if spec["layout"] == "fused":
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "model.layers.0.mlp.gate.weight" in keys
    elif spec["family"] == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in keys
        assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    else:
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys and "model.layers.0.mlp.gate_proj.weight" in keys
    log.info("%s: %d tensors in %s", name, len(keys), files)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def checkpoint_keys(path: Path) -> list[str]:
    return sorted(checkpoint_tensors(path))


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    tok.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "model_max_length": 2048,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE})
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(out_dir))
    text = "Hello, world! The quick brown fox."
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", chat
    ids = hf_tok(chat)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1, ids  # specials are single tokens


# ------------------------------------------------------------------------------------------------- adapters
@torch.no_grad()
def fill_lora_(peft_model, seed: int) -> None:
    """Random non-zero A ~ N(0, 1/in), B ~ N(0, 0.01) (B gets calibrated later)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            std = 1.0 / math.sqrt(p.shape[1]) if ".lora_A." in name else 0.01
            p.copy_((std * torch.randn(p.shape, generator=gen)).to(torch.bfloat16).float())


def rel_change(model, prompts, base_logits: np.ndarray) -> float:
    new = np.concatenate([logits(model, p) for p in prompts])
    return float(np.linalg.norm(new - base_logits) / np.linalg.norm(base_logits))


def make_adapter(spec: dict, model_dir: Path, adapter_dir: Path, ad: dict, seed: int, prompts,
                 base_logits: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Create + save one adapter with PEFT (LoRA weights stored as bf16).

    lora_B is rescaled (up to 4 proportional steps) so the logits move by ~REL_CHANGE_TARGET relative L2.
    Returns the in-memory f32 logits (for the save/load round-trip check) and the final lora_B std.
    """
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(load_model(spec, model_dir), LoraConfig(init_lora_weights=False, **ad))
    fill_lora_(peft_model, seed)
    lora_b = [p for n, p in peft_model.named_parameters() if ".lora_B." in n]
    with torch.no_grad():
        for _ in range(4):
            rel = rel_change(peft_model, prompts, base_logits)
            if 0.75 * REL_CHANGE_TARGET <= rel <= 1.5 * REL_CHANGE_TARGET:
                break
            for p in lora_b:
                p.copy_((p * (REL_CHANGE_TARGET / rel)).to(torch.bfloat16).float())
    b_std = float(torch.cat([p.detach().flatten() for p in lora_b]).std())
    in_memory = [logits(peft_model, p) for p in prompts]
    for n, p in peft_model.named_parameters():
        if ".lora_" in n:
            p.data = p.data.to(torch.bfloat16)
    peft_model.peft_config["default"].base_model_name_or_path = os.path.relpath(model_dir, REPO)  # not a /abs path
    peft_model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink()  # PEFT's boilerplate model card (holds absolute paths)
    return in_memory, b_std


def manual_merge_logits(spec: dict, model_dir: Path, adapter_dir: Path, prompts) -> list[np.ndarray]:
    """Independent re-implementation of the LoRA semantics, read from the saved files only.

    Plain module:  W[out, in] += s * B[out, r] @ A[r, in].
    Fused expert param W[E, out, in] (PEFT ParamWrapper): A [E*r, in] -> (E, r, in) (expert-major rows),
    B [out, E*r] -> (out, r, E) (expert = fast index of the columns), W[e] += s * B[:, :, e] @ A[e].
    Two targeted params on one experts module are nested wrappers: the param registered last (down_proj) is the
    outermost (`...experts.lora_A.weight`), the earlier one (gate_up_proj) gets `...experts.base_layer.lora_A.weight`.
    s = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha per module from rank_pattern / alpha_pattern.
    """
    from safetensors.torch import load_file
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())

    def rank_scale(key: str) -> tuple[int, float]:
        """Per-module r and alpha: first rank_pattern / alpha_pattern entry p with re.match(rf"(.*\\.)?({p})$")."""
        def pick(patterns: dict, default):
            return next((v for p, v in (patterns or {}).items() if re.match(rf"(.*\\.)?({p})$", key)), default)
        r, alpha = pick(cfg.get("rank_pattern"), cfg["r"]), pick(cfg.get("alpha_pattern"), cfg["lora_alpha"])
        return r, (alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r)

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    model = load_model(spec, model_dir)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    prefixes = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    assert len(tensors) == 2 * len(prefixes), sorted(tensors)
    with torch.no_grad():
        for prefix in prefixes:
            a, b = (tensors[f"{prefix}.lora_{x}.weight"].float() for x in "AB")
            path = prefix.removeprefix("base_model.model.")
            if f"{path}.weight" in params and params[f"{path}.weight"].ndim == 2:
                # a plain module, or a 2-D parameter (the router's `gate.weight` under target_parameters)
                key = f"{path}.weight" if any(f"{path}.weight".endswith(t) for t in cfg.get("target_parameters")
                                              or []) else path
                params[f"{path}.weight"] += rank_scale(key)[1] * (b @ a)
                continue
            depth = path.count(".base_layer")
            mod_path = path.replace(".base_layer", "")
            order = [n for n, _ in modules[mod_path].named_parameters(recurse=False)
                     if any(f"{mod_path}.{n}".endswith(t) for t in cfg["target_parameters"])]
            name = order[len(order) - 1 - depth]
            r, scale = rank_scale(f"{mod_path}.{name}")
            w = params[f"{mod_path}.{name}"]  # [E, out, in]
            n_exp, out_f, in_f = w.shape
            a3 = a.reshape(n_exp, r, in_f)
            b3 = b.reshape(out_f, r, n_exp).permute(2, 0, 1)
            w += scale * torch.bmm(b3, a3)
    return [logits(model, p) for p in prompts]


# ----------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def logits(model, prompt: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(prompt).long()[None], use_cache=False)
    return out.logits[0].float().numpy()


@torch.no_grad()
def greedy(model, prompt: np.ndarray) -> tuple[np.ndarray, float]:
    """8 greedy tokens via generate() with EOS disabled; checked against teacher-forced argmax."""
    from transformers import GenerationConfig
    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          eos_token_id=None, bos_token_id=None, pad_token_id=0)
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved, target.generation_config = target.generation_config, gc
    try:
        ids = torch.from_numpy(prompt).long()[None]
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    finally:
        target.generation_config = saved
    new = seq[0, len(prompt):].numpy().astype(np.int32)
    assert len(new) == NEW_TOKENS
    full = logits(model, seq[0].numpy())[len(prompt) - 1: -1]
    assert (full.argmax(-1) == new).all(), (full.argmax(-1), new)
    top2 = np.sort(full, axis=-1)[:, -2:]
    return new, float((top2[:, 1] - top2[:, 0]).min())


def moe_layers(spec: dict) -> list[int]:
    c = spec["config"]
    if spec["family"] == "mixtral":
        return list(range(c["num_hidden_layers"]))
    return [i for i in range(c["num_hidden_layers"])
            if i not in c["mlp_only_layers"] and (i + 1) % c["decoder_sparse_step"] == 0]


@torch.no_grad()
def routing(model, prompt: np.ndarray, top_k: int) -> torch.Tensor:
    """Sorted top-k expert ids, [num_moe_layers, T, top_k]."""
    out = model(input_ids=torch.from_numpy(prompt).long()[None], output_router_logits=True, use_cache=False)
    return torch.stack([torch.topk(rl.float(), top_k, dim=-1).indices.sort(-1).values for rl in out.router_logits])


@torch.no_grad()
def router_gaps(spec: dict, model, prompt: np.ndarray) -> np.ndarray:
    """Per position, the smallest gap over sparse layers between the k-th and (k+1)-th router logit: [T] float32.

    A small gap marks a near-tie where any low-precision implementation may pick a different expert set.
    """
    k = spec["config"]["num_experts_per_tok"]
    out = model(input_ids=torch.from_numpy(prompt).long()[None], output_router_logits=True, use_cache=False)
    top = torch.stack([torch.topk(rl.float(), k + 1, dim=-1).values for rl in out.router_logits])  # [L, T, k+1]
    return (top[..., k - 1] - top[..., k]).min(0).values.numpy().astype(np.float32)


def route_flips(spec: dict, f32_model, bf16_model, prompt: np.ndarray) -> np.ndarray:
    """(decoder layer, position) pairs where bf16 picks a different expert set than f32: [n, 2] int32."""
    k = spec["config"]["num_experts_per_tok"]
    diff = (routing(f32_model, prompt, k) != routing(bf16_model, prompt, k)).any(-1)
    layers = moe_layers(spec)
    return np.array([[layers[m], t] for m, t in diff.nonzero().tolist()], dtype=np.int32).reshape(-1, 2)


def record_model(name: str, spec: dict, out: Path) -> None:
    """Build model + adapters with the running transformers, then write reference/<name>.npz/.json."""
    from peft import PeftModel
    from safetensors.torch import load_file
    model_dir = reset_dir(out / "models" / name)
    build_model(name, spec, model_dir)
    if name == "qwen3-moe-fused":
        build_tokenizer(model_dir)
    prompts = make_prompts(spec["seed"])
    arrays = {f"prompt_{i}": p for i, p in enumerate(prompts)}
    info = {"variants": {}, "greedy_min_top2_margin": {}, "bf16_vs_f32": {}}

    def record(variant: str, f32_model, bf16_model) -> None:
        for i, p in enumerate(prompts):
            arrays[f"logits_f32__{variant}__{i}"] = logits(f32_model, p)
            arrays[f"greedy__{variant}__{i}"], margin = greedy(f32_model, p)
            info["greedy_min_top2_margin"][f"{variant}__{i}"] = round(margin, 5)
        arrays[f"logits_bf16__{variant}__0"] = logits(bf16_model, prompts[0])
        arrays[f"bf16_route_flips__{variant}__0"] = flips = route_flips(spec, f32_model, bf16_model, prompts[0])
        arrays[f"router_gap_f32__{variant}__0"] = router_gaps(spec, f32_model, prompts[0])
        lo, hi = arrays[f"logits_bf16__{variant}__0"], arrays[f"logits_f32__{variant}__0"]
        err = np.abs(lo - hi).max(-1)
        ok = np.setdiff1d(np.arange(len(err)), flips[:, 1])
        rel = float(np.linalg.norm(lo - hi) / np.linalg.norm(hi))
        info["bf16_vs_f32"][variant] = {"rel_l2": round(rel, 4), "max_abs_diff": round(float(err.max()), 4),
                                        "max_abs_diff_unflipped_positions": round(float(err[ok].max()), 4)}
        log.info("%s/%s: bf16 vs f32 rel %.3g, max|diff| %.3g (%.3g w/o route flips %s), greedy %s", name, variant,
                 rel, err.max(), err[ok].max(), flips.tolist(), arrays[f"greedy__{variant}__0"])

    base = load_model(spec, model_dir)
    k = spec["config"]["num_experts_per_tok"]
    used = [len(set(torch.cat([routing(base, p, k)[m].flatten() for p in prompts]).tolist()))
            for m in range(len(moe_layers(spec)))]
    assert min(used) >= 6, f"degenerate routing: experts used per MoE layer {used}"
    record("base", base, load_model(spec, model_dir, torch.bfloat16))
    base_all = np.concatenate([arrays[f"logits_f32__base__{i}"] for i in range(len(prompts))])
    info["moe_layers"] = moe_layers(spec)
    info["experts_used_per_moe_layer"] = used
    info["base_logit_std"] = round(float(base_all.std()), 4)

    for j, (ad_name, ad) in enumerate(spec["adapters"].items()):
        ad_dir = reset_dir(out / "adapters" / name / ad_name)
        in_memory, b_std = make_adapter(spec, model_dir, ad_dir, ad, spec["seed"] * 100 + j, prompts, base_all)
        f32 = PeftModel.from_pretrained(load_model(spec, model_dir), str(ad_dir)).eval()
        bf16 = PeftModel.from_pretrained(load_model(spec, model_dir, torch.bfloat16), str(ad_dir),
                                         autocast_adapter_dtype=False).eval()
        record(ad_name, f32, bf16)
        got = [arrays[f"logits_f32__{ad_name}__{i}"] for i in range(len(prompts))]
        for i in range(len(prompts)):  # save/load round trip is exact
            assert np.abs(got[i] - in_memory[i]).max() < 1e-5, (ad_name, "round trip")
        manual = manual_merge_logits(spec, model_dir, ad_dir, prompts)
        merge_err = max(float(np.abs(g - m).max()) for g, m in zip(got, manual, strict=True))
        assert merge_err < 1e-4, (ad_name, "manual merge differs from PEFT", merge_err)
        rel = float(np.linalg.norm(np.concatenate(got) - base_all) / np.linalg.norm(base_all))
        assert REL_CHANGE_RANGE[0] <= rel <= REL_CHANGE_RANGE[1], (ad_name, rel)
        keys = sorted(load_file(str(ad_dir / "adapter_model.safetensors")).items())
        info["variants"][ad_name] = {
            "rel_l2_logit_change_vs_base": round(rel, 4), "lora_B_std": round(b_std, 5),
            "manual_merge_max_abs_diff": merge_err,
            "num_tensors": len(keys),
            "example_keys": {k: list(v.shape) for k, v in keys
                             if ".layers.0." in k and not any(f"experts.{e}." in k for e in range(1, 8))}}
        log.info("%s/%s: rel change %.3f, manual-merge diff %.2g, %d tensors", name, ad_name, rel, merge_err, len(keys))

    save_npz(out / "reference" / f"{name}.npz", arrays)
    variants = ["base", *spec["adapters"]]
    write_json(out / "reference" / f"{name}.json", {
        "model": name, "model_dir": f"models/{name}", "adapters_dir": f"adapters/{name}",
        "family": spec["family"], "layout": spec["layout"], "variants": variants,
        "prompts": {f"prompt_{i}": p.tolist() for i, p in enumerate(prompts)},
        "keys": {
            "prompt_{i}": "int32 [T_i] prompt token ids (random in [3, vocab))",
            "logits_f32__{variant}__{i}": "float32 [T_i, vocab]; float32 weights, eager attention/experts",
            "logits_bf16__{variant}__0": "float32 [T_0, vocab]; model (and adapter) weights in bfloat16, cast to f32",
            "greedy__{variant}__{i}": f"int32 [{NEW_TOKENS}] NEW tokens of greedy decoding in float32, EOS disabled",
            "bf16_route_flips__{variant}__0": "int32 [n, 2] (decoder layer, position) where the bf16 model routes a "
                                              "token to a different expert set than f32; logits there differ a lot",
            "router_gap_f32__{variant}__0": "float32 [T_0] per position, min over sparse layers of the gap between "
                                            "the k-th and (k+1)-th router logit in float32 (near-ties are fragile)",
        },
        "dtypes": {"checkpoint": "bfloat16", "adapters": "bfloat16", "logits_f32": "float32 compute",
                   "logits_bf16": "bfloat16 compute"},
        "each_prompt_single_adapter": True,
        "lora_conventions": inspect.cleandoc(manual_merge_logits.__doc__).split("\n\n", 1)[1],
        "versions": versions(),
        "checks": info,
    })


# ----------------------------------------------------------------------------------- transformers-5 checks
def check_legacy_with_tf5(name: str, spec: dict, out: Path) -> dict:
    """transformers 5 must load the legacy (per-expert, sharded) checkpoint to the same logits as transformers 4."""
    ref = np.load(out / "reference" / f"{name}.npz")
    model_dir = out / "models" / name
    model = load_model(spec, model_dir)
    raw = checkpoint_tensors(model_dir)
    sd = model.state_dict()
    mixtral = spec["family"] == "mixtral"
    names = ("block_sparse_moe.", "w1", "w3", "w2") if mixtral else ("mlp.", "gate_proj", "up_proj", "down_proj")
    for i in moe_layers(spec):
        n_exp = sd[f"model.layers.{i}.mlp.experts.down_proj"].shape[0]
        pre = f"model.layers.{i}.{names[0]}experts"
        gate_up = torch.stack([torch.cat([raw[f"{pre}.{e}.{names[1]}.weight"], raw[f"{pre}.{e}.{names[2]}.weight"]])
                               for e in range(n_exp)]).float()
        down = torch.stack([raw[f"{pre}.{e}.{names[3]}.weight"] for e in range(n_exp)]).float()
        assert torch.equal(sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], gate_up)
        assert torch.equal(sd[f"model.layers.{i}.mlp.experts.down_proj"], down)
        router = raw[f"model.layers.{i}.{names[0]}gate.weight"].float()
        assert torch.equal(sd[f"model.layers.{i}.mlp.gate.weight"], router)
    prompts = [ref[f"prompt_{i}"] for i in range(len(PROMPT_LENS))]
    err = 0.0
    for i, p in enumerate(prompts):
        err = max(err, float(np.abs(logits(model, p) - ref[f"logits_f32__base__{i}"]).max()))
        assert (greedy(model, p)[0] == ref[f"greedy__base__{i}"]).all()
    assert err < 1e-4, (name, err)
    result = {"tf5_loads_legacy_checkpoint": True, "tf5_vs_tf4_base_max_abs_diff": err, "tf5_versions": versions(),
              "tf5_peft_loads_legacy_adapter": {}}
    log.info("%s: transformers 5 loads legacy checkpoint; base logits max|diff| vs transformers 4 = %.3g", name, err)
    # Informational: PEFT 0.21 converts v4 per-expert adapters to the fused layout when loading on transformers 5.
    from peft import PeftModel
    for ad_name in spec["adapters"]:
        try:
            pm = PeftModel.from_pretrained(load_model(spec, model_dir), str(out / "adapters" / name / ad_name)).eval()
            d = max(float(np.abs(logits(pm, p) - ref[f"logits_f32__{ad_name}__{i}"]).max())
                    for i, p in enumerate(prompts))
            result["tf5_peft_loads_legacy_adapter"][ad_name] = {"max_abs_diff_vs_tf4": d, "matches": d < 1e-4}
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            result["tf5_peft_loads_legacy_adapter"][ad_name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        log.info("%s/%s on transformers 5 + PEFT: %s", name, ad_name, result["tf5_peft_loads_legacy_adapter"][ad_name])
    return result


def check_layers_to_transform_with_target_parameters(spec: dict, model_dir: Path) -> bool:
    """Does PEFT honour layers_to_transform for target_parameters? (It did not in peft 0.21.2.)"""
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(load_model(spec, model_dir), LoraConfig(
        r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"], layers_to_transform=[0, 2]))
    layers = sorted({int(n.split(".layers.")[1].split(".")[0])
                     for n, _ in pm.named_parameters() if "experts.lora_A" in n})
    log.info("layers_to_transform=[0,2] + target_parameters -> expert LoRA in layers %s", layers)
    return layers == [0, 2]


def write_manifest(out: Path, extra: dict) -> None:
    models = {}
    for name, spec in MODELS.items():
        d = out / "models" / name
        models[name] = {
            "path": f"models/{name}", "family": spec["family"], "layout": spec["layout"], "sharded": spec["sharded"],
            "files": sorted(p.name for p in d.iterdir()), "reference": f"reference/{name}.npz",
            "config": {k: v for k, v in spec["config"].items() if k != "vocab_size"},
            "adapters": {},
        }
        for ad_name in spec["adapters"]:
            cfg = json.loads((out / "adapters" / name / ad_name / "adapter_config.json").read_text())
            models[name]["adapters"][ad_name] = {
                "path": f"adapters/{name}/{ad_name}", "r": cfg["r"], "alpha": cfg["lora_alpha"],
                "rslora": cfg["use_rslora"], "target_modules": sorted(cfg["target_modules"] or []),
                "target_parameters": sorted(cfg.get("target_parameters") or []),
                "layers_to_transform": cfg.get("layers_to_transform")}
    write_json(out / "manifest.json", {"vocab_size": VOCAB, "models": models, "notes": extra})


def copy_assets(out: Path, assets: Path) -> None:
    reset_dir(assets)
    shutil.copytree(out / "models" / "qwen3-moe-fused", assets / "model")
    shutil.copytree(out / "adapters" / "qwen3-moe-fused", assets / "adapters")
    size = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    assert size < 2 * 2**20, size
    log.info("bundled demo model in %s (%.2f MB)", assets, size / 2**20)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--assets", type=Path, default=REPO / "infinilora_jax" / "assets" / "tiny-qwen3-moe")
    ap.add_argument("--legacy-python", default=os.environ.get("INFINILORA_LEGACY_PYTHON",
                                                              str(REPO / ".venv-oracle-legacy" / "bin" / "python")))
    ap.add_argument("--legacy", action="store_true", help="internal: transformers-4 part only")
    ap.add_argument("--skip-legacy", action="store_true", help="do not re-run the transformers-4 part")
    args = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT writes target_modules from a set: fix its order
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-stable reductions
    out = args.out.resolve()
    for sub in ("models", "adapters", "reference"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    layouts = "legacy" if args.legacy else "fused"
    want_major = 4 if args.legacy else 5
    assert hf_major() == want_major, f"{layouts} part needs transformers {want_major}.x, found {versions()}"

    for name, spec in MODELS.items():
        if spec["layout"] == layouts:
            log.info("=== %s (%s)", name, versions())
            record_model(name, spec, out)
    if args.legacy:
        return

    if not args.skip_legacy:
        log.info("=== legacy part via %s", args.legacy_python)
        if not Path(args.legacy_python).exists():
            sys.exit(f"legacy python {args.legacy_python} not found; see the header of {__file__}")
        subprocess.run([args.legacy_python, __file__, "--legacy", "--out", str(out)], check=True)
    notes = {
        "layers_to_transform_applies_to_target_parameters":
            check_layers_to_transform_with_target_parameters(MODELS["mixtral-fused"], out / "models" / "mixtral-fused"),
        "fused_checkpoints": "written by transformers 5 with save_pretrained(save_original_format=False); the default "
                             "(True) reverts Mixtral/Qwen3-MoE experts to the legacy per-expert keys",
        "config_keys": "transformers 5 writes rope_parameters={rope_theta, rope_type} (no top-level rope_theta) and, "
                       "for qwen3_moe, num_local_experts instead of num_experts; transformers 4 writes rope_theta and "
                       "num_experts",
        "peft_v5_conversion": (
            "on transformers 5, PEFT 0.21 maps target_modules gate_proj/up_proj/down_proj (qwen3_moe) and w1/w2/w3 "
            "(mixtral) to expert target_parameters, so LoRA on the dense MLP of mlp_only/sparse-step layers is "
            "dropped; reference logits of legacy adapters come from transformers 4, where it is applied"),
    }
    for name, spec in MODELS.items():
        if spec["layout"] == "legacy":
            if not (out / "reference" / f"{name}.npz").exists():
                sys.exit(f"{name}: no legacy fixtures on disk; run without --skip-legacy")
            res = check_legacy_with_tf5(name, spec, out)
            ref_json = out / "reference" / f"{name}.json"
            meta = json.loads(ref_json.read_text())
            meta["checks"]["transformers5"] = res
            write_json(ref_json, meta)
    write_manifest(out, notes)
    copy_assets(out, args.assets.resolve())
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("fixtures total %.2f MB in %s", total / 2**20, out)
    assert total < 8 * 2**20, total


if __name__ == "__main__":
    main()
