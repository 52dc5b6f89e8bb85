"""Hugging Face safetensors checkpoints -> model parameters, read straight into their target sharding.

Each parameter is built with `jax.make_array_from_callback`: every device asks for exactly its own block,
which is read from memory-mapped safetensors (single file or sharded index), transposed into this project's
"x @ W" layout and cast. No device, and no host buffer, ever holds the whole model.

Expert weights come in three layouts, all accepted:
  fused (transformers >= 5):  mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]
  Mixtral per-expert (older): block_sparse_moe.experts.{e}.w1 / w3 [I, H] (gate / up), w2 [H, I] (down)
  Qwen per-expert (older):    mlp.experts.{e}.gate_proj / up_proj [I, H], down_proj [H, I]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from infinilora_jax.errors import CheckpointError
from infinilora_jax.loading.safetensors_io import SafetensorsError, SafetensorsFile
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import ParamDecl

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint:
    """Tensor name -> lazily read array, over one safetensors file or a sharded index."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = os.fspath(model_dir)
        index_path = os.path.join(self.model_dir, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index: {e}") from e
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(n for n in os.listdir(self.model_dir) if n.endswith(".safetensors"))
            weight_map = None
        if not names:
            raise CheckpointError(f"{self.model_dir}: no *.safetensors files (and no {INDEX_FILE})")
        self._files: dict[str, SafetensorsFile] = {}
        for name in names:
            path = os.path.join(self.model_dir, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: lists shard {name}, which does not exist")
            try:
                self._files[name] = SafetensorsFile(path)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from e
        if weight_map is None:
            weight_map = {t: name for name, f in self._files.items() for t in f.keys()}
        for tensor, name in weight_map.items():
            if tensor not in self._files[name]:
                raise CheckpointError(f"{index_path}: maps {tensor!r} to {name}, which does not contain it")
        self._where = weight_map
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._files[self._where[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        self._require(name)
        self.used.add(name)
        return self._files[self._where[name]].get(name)

    def _require(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name!r}")


def _rng(s: slice, n: int) -> np.ndarray:
    return np.arange(*s.indices(n))


class WeightMap:
    """Reads each parameter of our layout (see models/transformer.py) from the checkpoint's tensor names."""

    def __init__(self, cfg: ModelConfig, ckpt: HFCheckpoint):
        self.cfg, self.ckpt = cfg, ckpt
        self.prefix = "model." if "model.embed_tokens.weight" in ckpt else ""
        if f"{self.prefix}embed_tokens.weight" not in ckpt:
            raise CheckpointError(f"{ckpt.model_dir}: no embed_tokens.weight: not a {cfg.family} checkpoint?")
        self._expect(f"{self.prefix}embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))

    def _expect(self, name: str, shape: tuple[int, ...]):
        found = self.ckpt.shape(name)
        if tuple(found) != tuple(shape):
            raise CheckpointError(f"{self.ckpt.model_dir}: tensor {name!r} has shape {tuple(found)}, "
                                  f"the config implies {tuple(shape)}")

    def _tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self._expect(name, shape)
        return self.ckpt.get(name)

    def _layer(self, layer: int) -> str:
        return f"{self.prefix}layers.{layer}."

    def _moe_prefix(self, layer: int) -> str:
        for block in ("mlp.", "block_sparse_moe."):
            if f"{self._layer(layer)}{block}gate.weight" in self.ckpt:
                return f"{self._layer(layer)}{block}"
        raise CheckpointError(f"{self.ckpt.model_dir}: layer {layer} is sparse but has no router "
                              f"({self._layer(layer)}mlp.gate.weight)")

    def _expert_names(self, layer: int) -> tuple[str, str, str] | None:
        """(gate, up, down) per-expert name templates with '{e}', or None for the fused layout."""
        p = self._moe_prefix(layer)
        if f"{p}experts.gate_up_proj" in self.ckpt:
            return None
        for gate, up, down in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
            if f"{p}experts.0.{gate}.weight" in self.ckpt:
                return tuple(f"{p}experts.{{e}}.{n}.weight" for n in (gate, up, down))
        raise CheckpointError(f"{self.ckpt.model_dir}: layer {layer}: no expert weights found under {p}experts")

    # ---- readers: (layer or None, index into our layout without the stage dim) -> np.ndarray ----

    def applies(self, key: str, layer: int) -> bool:
        """False for the unused half of a layer slot that mixes dense and sparse layers (it stays zero)."""
        if key.startswith("moe."):
            return self.cfg.moe_layers[layer]
        if key.startswith("mlp."):
            return not self.cfg.moe_layers[layer]
        return True

    def read(self, key: str, layer: int | None, idx: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
        """Our-layout block `idx` of parameter `key` (of layer `layer`), whose full our-layout shape is `shape`."""
        cfg = self.cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        lp = self._layer(layer) if layer is not None else ""
        transposed = {  # our [in, out] = HF Linear weight [out, in].T
            "attn.wq": (f"{lp}self_attn.q_proj.weight", (cfg.num_heads * hd, h)),
            "attn.wk": (f"{lp}self_attn.k_proj.weight", (cfg.num_kv_heads * hd, h)),
            "attn.wv": (f"{lp}self_attn.v_proj.weight", (cfg.num_kv_heads * hd, h)),
            "attn.wo": (f"{lp}self_attn.o_proj.weight", (h, cfg.num_heads * hd)),
        }
        vectors = {
            "attn_norm": (f"{lp}input_layernorm.weight", (h,)),
            "mlp_norm": (f"{lp}post_attention_layernorm.weight", (h,)),
            "attn.q_norm": (f"{lp}self_attn.q_norm.weight", (hd,)),
            "attn.k_norm": (f"{lp}self_attn.k_norm.weight", (hd,)),
            "final_norm": (f"{self.prefix}norm.weight", (h,)),
        }
        if key in transposed:
            name, shape = transposed[key]
            return self._tensor(name, shape)[idx[1], idx[0]].T
        if key in vectors:
            name, shape = vectors[key]
            return self._tensor(name, shape)[idx]
        if key in ("embed", "lm_head"):
            name = f"{self.prefix}embed_tokens.weight" if key == "embed" else "lm_head.weight"
            table = self._tensor(name, (cfg.vocab_size, h))
            rows = _rng(idx[0], shape[0])  # rows past vocab_size are padding, kept zero
            out = np.zeros((len(rows), len(_rng(idx[1], h))), table.dtype)
            real = rows < cfg.vocab_size
            out[real] = table[rows[real]][:, idx[1]]
            return out
        if key == "moe.router":
            p = self._moe_prefix(layer)
            return self._tensor(f"{p}gate.weight", (cfg.num_experts, h))[idx[1], idx[0]].T
        if key == "moe.w_gate_up":
            return self._expert_gate_up(layer, idx)
        if key == "moe.w_down":
            return self._expert_down(layer, idx)
        if key == "mlp.w_gate_up":  # our [H, 2, I] from gate_proj / up_proj [I, H]
            i = cfg.dense_intermediate_size
            parts = [self._tensor(f"{lp}mlp.{n}.weight", (i, h))[idx[2], idx[0]].T
                     for n in np.array(["gate_proj", "up_proj"])[idx[1]]]
            return np.stack(parts, axis=1)
        if key == "mlp.w_down":
            i = cfg.dense_intermediate_size
            return self._tensor(f"{lp}mlp.down_proj.weight", (h, i))[idx[1], idx[0]].T
        raise KeyError(f"no checkpoint mapping for parameter {key!r}")

    def _expert_gate_up(self, layer: int, idx) -> np.ndarray:
        """Our [E, H, 2, I] block from fused [E, 2I, H] or per-expert gate/up [I, H]."""
        cfg = self.cfg
        e_all, h, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        experts, halves, cols = _rng(idx[0], e_all), _rng(idx[2], 2), _rng(idx[3], inter)
        names = self._expert_names(layer)
        if names is None:
            fused = self._tensor(f"{self._moe_prefix(layer)}experts.gate_up_proj", (e_all, 2 * inter, h))
            rows = np.concatenate([g * inter + cols for g in halves])
            block = fused[experts[0]: experts[-1] + 1][:, rows][:, :, idx[1]]  # [e, g*i, h]
            return block.reshape(len(experts), len(halves), len(cols), -1).transpose(0, 3, 1, 2)
        out = []
        for e in experts:
            parts = [self._tensor(names[g].format(e=e), (inter, h))[cols][:, idx[1]].T for g in halves]
            out.append(np.stack(parts, axis=1))  # [h, g, i]
        return np.stack(out)

    def _expert_down(self, layer: int, idx) -> np.ndarray:
        """Our [E, I, H] block from fused [E, H, I] or per-expert down [H, I]."""
        cfg = self.cfg
        e_all, h, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        experts = _rng(idx[0], e_all)
        names = self._expert_names(layer)
        if names is None:
            fused = self._tensor(f"{self._moe_prefix(layer)}experts.down_proj", (e_all, h, inter))
            return fused[experts[0]: experts[-1] + 1][:, idx[2], idx[1]].transpose(0, 2, 1)
        return np.stack([self._tensor(names[2].format(e=e), (h, inter))[idx[2], idx[1]].T for e in experts])


def checkpoint_factory(weights: WeightMap, mesh: Mesh, on_param: Callable[[ParamDecl], None] | None = None):
    """A ParamFactory that reads each device's block of each parameter from the checkpoint."""

    def make(decl: ParamDecl) -> jax.Array:
        def block(index: tuple[slice, ...]) -> np.ndarray:
            if decl.layers:
                parts = []
                for s in _rng(index[0], decl.shape[0]):
                    layer = decl.layers[s]
                    if weights.applies(decl.key, layer):
                        parts.append(weights.read(decl.key, layer, index[1:], decl.shape[1:]))
                    else:
                        parts.append(np.zeros([len(_rng(i, n)) for i, n in zip(index[1:], decl.shape[1:])]))
                data = np.stack(parts)
            else:
                data = weights.read(decl.name, None, index, decl.shape)
            return np.ascontiguousarray(data).astype(decl.dtype)

        try:
            array = jax.make_array_from_callback(decl.shape, decl.sharding(mesh), block)
        except CheckpointError:
            raise
        except (ValueError, IndexError) as e:  # shape bugs surface here; name the parameter
            raise CheckpointError(f"{weights.ckpt.model_dir}: cannot build parameter {decl.name} "
                                  f"{decl.shape}: {e}") from e
        if on_param is not None:
            on_param(decl)
        return array

    return make
