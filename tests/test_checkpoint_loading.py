"""Safetensors reading, checkpoint layouts and their failure modes, and placement straight into the sharding."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import model_dir

from infinilora_jax import LLM
from infinilora_jax.errors import CheckpointError, ConfigError
from infinilora_jax.loading.hf_checkpoint import HFCheckpoint
from infinilora_jax.loading.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from infinilora_jax.models.config import ModelConfig


def test_safetensors_roundtrip_and_lazy_slices(tmp_path, rng):
    tensors = {"a": rng.normal(size=(5, 7)).astype(np.float32),
               "b": rng.normal(size=(3, 4, 2)).astype(ml_dtypes.bfloat16),
               "c": np.arange(6, dtype=np.int32)}
    path = os.path.join(tmp_path, "x.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    st = SafetensorsFile(path)
    assert sorted(st.keys()) == ["a", "b", "c"] and st.metadata == {"format": "pt"}
    for k, v in tensors.items():
        np.testing.assert_array_equal(st.get(k), v)
        assert st.dtype(k) == v.dtype and st.shape(k) == v.shape
    np.testing.assert_array_equal(st.get("a")[1:3, ::2], tensors["a"][1:3, ::2])


def test_safetensors_reads_files_written_by_torch():
    """The fixtures were written by torch/safetensors; bfloat16 and float32 both read."""
    st = SafetensorsFile(os.path.join(model_dir("qwen3-moe-fused"), "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert st.shape(name) == (512, 64)
    assert np.isfinite(np.asarray(st.get(name), np.float32)).all()


@pytest.mark.parametrize("damage", ["truncate", "header_len", "bad_json", "offsets"])
def test_safetensors_damage_is_reported(tmp_path, damage):
    path = os.path.join(tmp_path, "x.safetensors")
    save_file({"w": np.ones((64, 64), np.float32)}, path)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[:-10]
    elif damage == "header_len":
        data[:8] = (10**9).to_bytes(8, "little")
    elif damage == "bad_json":
        data[8:12] = b"\x00\x01{{"
    else:
        data = data.replace(b'"data_offsets":[0,16384]', b'"data_offsets":[0,16380]')
    open(path, "wb").write(bytes(data))
    with pytest.raises(SafetensorsError, match="x.safetensors"):
        SafetensorsFile(path)


def test_sharded_index_reads_every_shard():
    ckpt = HFCheckpoint(model_dir("mixtral-legacy"))
    with open(os.path.join(model_dir("mixtral-legacy"), "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert sorted(ckpt.names()) == sorted(weight_map)
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in ckpt


def _copy_model(tmp_path, name):
    dst = os.path.join(tmp_path, name)
    shutil.copytree(model_dir(name), dst)
    return dst


def test_missing_shard_file(tmp_path):
    path = _copy_model(tmp_path, "qwen3-moe-legacy")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=shard):
        LLM(path, dtype="float32", progress=False)


def test_truncated_checkpoint(tmp_path):
    path = _copy_model(tmp_path, "mixtral-fused")
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        LLM(path, dtype="float32", progress=False)


def test_missing_tensor_and_shape_mismatch(tmp_path):
    path = _copy_model(tmp_path, "mixtral-fused")
    file = os.path.join(path, "model.safetensors")
    st = SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    victim = "model.layers.3.self_attn.k_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != victim}, file)
    with pytest.raises(CheckpointError, match=victim):
        LLM(path, dtype="float32", progress=False)
    tensors[victim] = tensors[victim][:, :32]
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match="shape"):
        LLM(path, dtype="float32", progress=False)


def test_config_errors(tmp_path):
    path = _copy_model(tmp_path, "qwen3-moe-fused")
    cfg_path = os.path.join(path, "config.json")
    raw = json.load(open(cfg_path))
    for change, match in [({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "yarn"),
                          ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "not supported"),
                          ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"num_key_value_heads": 3}, "num_kv_heads")]:
        json.dump({**raw, **change}, open(cfg_path, "w"))
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_hf_dir(path)
    with open(cfg_path, "w") as f:
        f.write("{")
    with pytest.raises(ConfigError, match="JSON"):
        ModelConfig.from_hf_dir(path)


def test_config_fields_of_both_families():
    q = ModelConfig.from_hf_dir(model_dir("qwen3-moe-fused"))
    assert (q.family, q.head_dim, q.qk_norm, q.tie_word_embeddings, q.norm_topk_prob) == ("qwen3_moe", 32, True,
                                                                                           True, True)
    assert q.moe_layers == (True, False, True, True)  # mlp_only_layers=[1]
    assert q.head_dim != q.hidden_size // q.num_heads
    ql = ModelConfig.from_hf_dir(model_dir("qwen3-moe-legacy"))
    assert ql.moe_layers == (False, True, False, True) and not ql.norm_topk_prob  # decoder_sparse_step=2
    m = ModelConfig.from_hf_dir(model_dir("mixtral-fused"))
    assert (m.family, m.num_experts, m.num_experts_per_tok, m.qk_norm) == ("mixtral", 8, 2, False)
    assert all(m.moe_layers) and m.rope_theta == 1e6


def test_weights_land_sharded_not_replicated():
    """With ep8, each device holds 1/8 of every expert weight and of the vocab rows."""
    llm = LLM(model_dir("mixtral-fused"), dtype="float32", mesh="ep8", progress=False)
    layer = llm.runner.model.layers[0]
    w = layer.moe.w_gate_up[...]
    assert w.shape == (1, 8, 64, 2, 96)
    assert {s.data.shape for s in w.addressable_shards} == {(1, 1, 64, 2, 96)}
    embed = llm.runner.model.embed[...]
    assert {s.data.shape for s in embed.addressable_shards} == {(512 // 8, 64)}
    per_device = llm.runner.live_bytes_per_device()
    assert len(per_device) == 8 and max(per_device.values()) < 1.2 * min(per_device.values())
    assert len(jax.devices()) == 8
