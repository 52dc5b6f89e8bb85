"""Model shapes for sizing: weight, KV-cache and adapter bytes of the MoE families the evaluation uses.

The engine's ModelConfig (models/config.py) covers the families the model code serves (Mixtral, Qwen3-MoE);
provisioning and the cluster simulator also need GPT-OSS and DBRX, whose configs are read here for their shapes
only (widths, layers, experts, heads). A Hugging Face config.json (or configs/models/*.json) goes in;
`ModelShape` comes out.

Adapter bytes follow the engine's pool layout (lora/targets.py): attention A [in, r] / B [r, out]; the router
A [H, r] / B [r, E]; experts `expert_gate_up` A [E, H, r] / B [E, r, 2, I] (one A shared by gate and up, as
PEFT's `target_parameters` form stores it; per-expert PEFT adapters with separate gate and up A matrices are
converted to rank 2r: `gate_up_rank_factor=2`) and `expert_down` A [E, I, r] / B [E, r, H]; dense-MLP layers
gate/up/down. No rank padding (a pool padded to a larger max rank holds more).
"""

from __future__ import annotations

import dataclasses
import json
import os

from infinilora_jax.lora.targets import ALL_TARGETS, ATTENTION_TARGETS, DENSE_MLP_TARGETS

EXPERT_TARGETS = ("router", "expert_gate_up", "expert_down")
DEFAULT_TARGETS = ATTENTION_TARGETS + ("expert_gate_up", "expert_down")  # attention and every expert


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # "mixtral" | "qwen3_moe" | "gpt_oss" | "dbrx"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    dense_intermediate: int  # width of dense-MLP layers (0 if none)
    moe_layers: tuple[bool, ...]
    vocab_size: int
    tie_word_embeddings: bool = False

    # ---- base model ----

    def attention_params(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    def layer_params(self, layer: int) -> int:
        h = self.hidden_size
        if self.moe_layers[layer]:
            mlp = self.num_experts * 3 * h * self.expert_intermediate + h * self.num_experts
        else:
            mlp = 3 * h * self.dense_intermediate
        return self.attention_params() + mlp

    def active_layer_params(self, layer: int) -> int:
        """Parameters one token multiplies with in a layer (top-k experts)."""
        h = self.hidden_size
        if self.moe_layers[layer]:
            mlp = self.top_k * 3 * h * self.expert_intermediate + h * self.num_experts
        else:
            mlp = 3 * h * self.dense_intermediate
        return self.attention_params() + mlp

    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embed + sum(self.layer_params(i) for i in range(self.num_layers))

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        return self.total_params() * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over every layer (sliding-window layers counted in full)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- adapters ----

    def adapter_layer_params(self, layer: int, rank: int, targets=DEFAULT_TARGETS,
                             gate_up_rank_factor: int = 1) -> dict[str, int]:
        """Adapter parameters of one layer, per target (targets that do not apply to the layer are left out)."""
        h, e = self.hidden_size, self.num_experts
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        i, d = self.expert_intermediate, self.dense_intermediate
        sizes = {"q": h + q, "k": h + kv, "v": h + kv, "o": q + h, "gate": h + d, "up": h + d, "down": d + h,
                 "router": h + e, "expert_gate_up": e * gate_up_rank_factor * (h + 2 * i), "expert_down": e * (i + h)}
        sparse = self.moe_layers[layer]
        out = {}
        for t in targets:
            if t not in ALL_TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; known: {ALL_TARGETS}")
            if (t in DENSE_MLP_TARGETS and sparse) or (t in EXPERT_TARGETS and not sparse):
                continue
            out[t] = rank * sizes[t]
        return out

    def adapter_bytes(self, rank: int, targets=DEFAULT_TARGETS, dtype_bytes: int = 2,
                      gate_up_rank_factor: int = 1) -> int:
        return dtype_bytes * sum(sum(self.adapter_layer_params(layer, rank, targets, gate_up_rank_factor).values())
                                 for layer in range(self.num_layers))

    def adapter_layer_split(self, layer: int, rank: int, targets=DEFAULT_TARGETS, dtype_bytes: int = 2,
                            gate_up_rank_factor: int = 1) -> tuple[int, int]:
        """(bytes replicated across expert parallelism, bytes split over it) of one layer of one adapter: expert
        pages are sharded by expert like the experts; attention, router and dense pages are not."""
        per = self.adapter_layer_params(layer, rank, targets, gate_up_rank_factor)
        split = sum(v for t, v in per.items() if t in ("expert_gate_up", "expert_down"))
        return dtype_bytes * (sum(per.values()) - split), dtype_bytes * split


def from_hf_dict(raw: dict, name: str = "model") -> ModelShape:
    """The shape of a Hugging Face config (mixtral, qwen3_moe, gpt_oss or dbrx)."""
    model_type = raw.get("model_type", "")
    if model_type == "dbrx":
        ffn, attn = raw["ffn_config"], raw.get("attn_config", {})
        layers, h, heads = raw["n_layers"], raw["d_model"], raw["n_heads"]
        return ModelShape(name, "dbrx", layers, h, heads, attn.get("kv_n_heads", heads), h // heads,
                          ffn["moe_num_experts"], ffn["moe_top_k"], ffn["ffn_hidden_size"], 0, (True,) * layers,
                          raw["vocab_size"], bool(raw.get("tie_word_embeddings", False)))
    if model_type not in ("mixtral", "qwen3_moe", "gpt_oss"):
        raise ValueError(f"{name}: model_type={model_type!r} is not one of mixtral, qwen3_moe, gpt_oss, dbrx")
    layers, h, heads = raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"]
    experts = raw.get("num_experts") or raw.get("num_local_experts")
    if model_type == "qwen3_moe":
        step, dense = raw.get("decoder_sparse_step", 1), set(raw.get("mlp_only_layers", []))
        moe = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
        expert_i, dense_i = raw["moe_intermediate_size"], raw["intermediate_size"] if not all(moe) else 0
    else:  # mixtral and gpt_oss: every layer sparse, intermediate_size is the expert width
        moe, expert_i, dense_i = (True,) * layers, raw["intermediate_size"], 0
    return ModelShape(name, model_type, layers, h, heads, raw.get("num_key_value_heads", heads),
                      raw.get("head_dim") or h // heads, experts,
                      raw.get("num_experts_per_tok") or raw.get("experts_per_token"), expert_i, dense_i, moe,
                      raw["vocab_size"], bool(raw.get("tie_word_embeddings", False)))


def load(path: str) -> ModelShape:
    """A config.json file, or a model directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        raw = json.load(f)
    name = os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "config.json" else \
        os.path.splitext(os.path.basename(path))[0]
    return from_hf_dict(raw, name)
