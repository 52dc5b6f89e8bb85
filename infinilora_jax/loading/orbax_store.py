"""Orbax save/restore of converted, sharded parameters: reload without re-reading and transposing safetensors.

A converted directory holds `infinilora_checkpoint.json` (the model config and the pipeline depth the arrays
are stacked for), `params/` (an Orbax checkpoint of the parameter tree) and any tokenizer files. Restoring
reads each device's shards straight into the requested layout's sharding; the expert and tensor split (ep, tp)
may differ from the one saved, the pipeline depth may not (per-layer arrays are stacked over stages).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from infinilora_jax.errors import CheckpointError
from infinilora_jax.models.config import ModelConfig
from infinilora_jax.models.params import abstract_factory
from infinilora_jax.models.transformer import CausalLM
from meshes.layouts import MeshLayout

MARKER = "infinilora_checkpoint.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _read_marker(path: str) -> dict:
    try:
        with open(os.path.join(path, MARKER)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/{MARKER}: unreadable: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}/{MARKER}: format_version={meta.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    return meta


def read_config(path: str) -> ModelConfig:
    raw = _read_marker(path)["config"]
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return ModelConfig(**raw)


def save(path: str, cfg: ModelConfig, model_state: dict, layout: MeshLayout, source_dir: str | None = None):
    """model_state: the pure dict of parameters (nnx.to_pure_dict)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), model_state, force=True)
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "pp": layout.pp}
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(meta, f, indent=1)
    for name in TOKENIZER_FILES if source_dir else ():
        if os.path.exists(os.path.join(source_dir, name)):
            shutil.copy(os.path.join(source_dir, name), os.path.join(path, name))


def restore_factory(path: str, layout: MeshLayout, dtype):
    """make_factory(mesh, on_param) for ModelRunner: one Orbax restore, then parameters served by name."""
    path = os.path.abspath(path)
    saved_pp = _read_marker(path)["pp"]
    if saved_pp != layout.pp:
        raise CheckpointError(f"{path} was converted for pp={saved_pp}; layout {layout.name!r} has pp={layout.pp}. "
                              "Convert again from the Hugging Face checkpoint for this pipeline depth.")
    cfg = read_config(path)

    def make_factory(mesh, on_param):
        target = nnx.to_pure_dict(nnx.state(CausalLM(cfg, layout, dtype, abstract_factory(mesh))))
        try:
            with ocp.StandardCheckpointer() as ckptr:
                restored = ckptr.restore(os.path.join(path, "params"), target)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot restore parameters: {e}") from e
        by_name = {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v
                   for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}

        def make(decl):
            on_param(decl)
            return by_name[decl.name]

        return make

    return make_factory
