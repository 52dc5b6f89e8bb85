"""One typed, validated model config, read from a Hugging Face `config.json`.

Both supported families reduce to the same decoder: GQA attention with RoPE, RMSNorm, and per layer either a
top-k mixture of SwiGLU experts or a dense SwiGLU MLP. What differs between them is recorded as fields here
(q/k norm, routing normalisation, which layers are sparse), so the model code never branches on the family name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from infinilora_jax.errors import ConfigError

SUPPORTED_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "mixtral" | "qwen3_moe"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # per-expert SwiGLU width
    dense_intermediate_size: int  # width of dense-MLP layers (0 when every layer is sparse)
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    moe_layers: tuple[bool, ...]  # moe_layers[i]: layer i is a mixture of experts, else a dense MLP
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"invalid model config: {msg}")

        need(self.family in SUPPORTED_ARCHITECTURES.values(), f"family={self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(len(self.moe_layers) == self.num_layers,
             f"moe_layers has {len(self.moe_layers)} entries for num_layers={self.num_layers}")
        if any(self.moe_layers):
            need(self.num_experts > 0 and self.moe_intermediate_size > 0, "sparse layers need experts")
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} with num_experts={self.num_experts}")
        if not all(self.moe_layers):
            need(self.dense_intermediate_size > 0, "dense layers need dense_intermediate_size > 0")
        need(self.sliding_window is None or self.sliding_window > 0, f"sliding_window={self.sliding_window}")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def has_dense_layers(self) -> bool:
        return not all(self.moe_layers)

    @property
    def has_moe_layers(self) -> bool:
        return any(self.moe_layers)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path) as f:
                raw = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json in model directory {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(raw, source=cfg_path)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            family = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}.get(raw.get("model_type", ""))
        if family is None:
            raise ConfigError(f"{source}: architectures={archs} model_type={raw.get('model_type')!r} is not supported; "
                              f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")

        def get(key: str, default: Any = ConfigError) -> Any:
            if key in raw and raw[key] is not None:
                return raw[key]
            if default is ConfigError:
                raise ConfigError(f"{source}: missing field {key!r}")
            return default

        if get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
        if get("attention_bias", False):
            raise ConfigError(f"{source}: attention_bias=true is not supported yet")
        rope_theta = _rope_theta(raw, source)
        num_layers = int(get("num_hidden_layers"))
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        eos = raw.get("eos_token_id")
        common = dict(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            pad_token_id=raw.get("pad_token_id"),
        )
        if family == "mixtral":
            return cls(
                family=family,
                num_experts=int(get("num_local_experts")),
                num_experts_per_tok=int(get("num_experts_per_tok")),
                moe_intermediate_size=int(get("intermediate_size")),
                dense_intermediate_size=0,
                norm_topk_prob=True,
                qk_norm=False,
                moe_layers=(True,) * num_layers,
                sliding_window=raw.get("sliding_window"),
                **common,
            )
        num_experts = int(raw["num_experts"] if raw.get("num_experts") is not None else get("num_local_experts"))
        step = int(get("decoder_sparse_step", 1))
        mlp_only = set(get("mlp_only_layers", []))
        if step <= 0:
            raise ConfigError(f"{source}: decoder_sparse_step={step} must be positive")
        moe_layers = tuple((i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
        return cls(
            family=family,
            num_experts=num_experts,
            num_experts_per_tok=int(get("num_experts_per_tok")),
            moe_intermediate_size=int(get("moe_intermediate_size")),
            dense_intermediate_size=int(get("intermediate_size", 0)) if not all(moe_layers) else 0,
            norm_topk_prob=bool(get("norm_topk_prob", False)),
            qk_norm=True,
            moe_layers=moe_layers,
            sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window") else None,
            **common,
        )


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    """RoPE base from either transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", raw.get("rope_theta"))
    else:
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = raw.get("rope_theta", 10000.0)
    if rope_type != "default":
        raise ConfigError(f"{source}: rope scaling type {rope_type!r} is not supported (only unscaled RoPE)")
    if theta is None or float(theta) <= 0:
        raise ConfigError(f"{source}: rope_theta={theta!r} is invalid")
    return float(theta)
