"""Bad adapters raise typed errors naming the file and field, and leave the loaded set exactly as it was."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import adapter_dirs, model_dir

from infinilora_jax import LLM
from infinilora_jax.errors import AdapterError, AdapterNotFoundError, UnsupportedAdapterError
from infinilora_jax.loading.peft_adapter import load_peft_adapter
from infinilora_jax.loading.safetensors_io import SafetensorsFile, save_file
from infinilora_jax.lora.adapter_cache import AdapterBusyError
from infinilora_jax.models.config import ModelConfig

MODEL = "qwen3-moe-fused"
GOOD = "attn-experts-r8"
PROMPT = [5, 17, 33, 101, 7, 250, 3]


@pytest.fixture(scope="module")
def llm():
    return LLM(model_dir(MODEL), adapters={"resident": adapter_dirs(MODEL)[GOOD]}, dtype="float32",
               max_adapters=2, max_lora_rank=16, progress=False)


@pytest.fixture(scope="module")
def baseline(llm):
    return llm.logits(PROMPT, "resident")


def _copy(tmp_path, name=GOOD, model=MODEL) -> str:
    dst = os.path.join(tmp_path, name)
    shutil.copytree(adapter_dirs(model)[name], dst)
    return dst


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(path, fn):
    file = os.path.join(path, "adapter_model.safetensors")
    st = SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    fn(tensors)
    save_file(tensors, file)


def _assert_unchanged(llm, baseline):
    assert llm.adapters == ["resident"]
    np.testing.assert_array_equal(llm.logits(PROMPT, "resident"), baseline)


CONFIG_CASES = [
    (dict(use_dora=True), UnsupportedAdapterError, "use_dora"),
    (dict(modules_to_save=["lm_head"]), UnsupportedAdapterError, "modules_to_save"),
    (dict(bias="all"), UnsupportedAdapterError, "bias"),
    (dict(rank_pattern={"q_proj": 64}), AdapterError, "rank_pattern"),
    (dict(rank_pattern={"q_proj": "x"}), AdapterError, "rank_pattern"),
    (dict(alpha_pattern={"(": 3}), AdapterError, "alpha_pattern"),
    (dict(layer_replication=[[0, 2]]), UnsupportedAdapterError, "layer_replication"),
    (dict(peft_type="IA3"), UnsupportedAdapterError, "peft_type"),
    (dict(r=32), AdapterError, "r"),
    (dict(r=0), AdapterError, "r"),
    (dict(r="8"), AdapterError, "r"),
    (dict(lora_alpha="big"), AdapterError, "lora_alpha"),
    (dict(target_modules=None, target_parameters=None), AdapterError, "target_modules"),
]


@pytest.mark.parametrize("changes,error,field", CONFIG_CASES, ids=[c[2] + str(i) for i, c in enumerate(CONFIG_CASES)])
def test_bad_config_field(llm, baseline, tmp_path, changes, error, field):
    path = _copy(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(error) as exc:
        llm.load_adapter("bad", path)
    assert exc.value.field == field and "adapter_config.json" in exc.value.path
    _assert_unchanged(llm, baseline)


def test_rank_in_config_disagrees_with_tensors(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, r=4)
    with pytest.raises(AdapterError, match="shape") as exc:
        llm.load_adapter("bad", path)
    assert exc.value.field.endswith(".weight")
    _assert_unchanged(llm, baseline)


def test_rank_pattern_disagrees_with_tensors(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    _edit_config(path, rank_pattern={"q_proj": 4})
    with pytest.raises(AdapterError, match="shape") as exc:
        llm.load_adapter("bad", path)
    assert ".q_proj.lora_A" in exc.value.field
    _assert_unchanged(llm, baseline)


def test_missing_tensor(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    victim = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    _edit_tensors(path, lambda t: t.pop(victim))
    with pytest.raises(AdapterError, match="missing tensor") as exc:
        llm.load_adapter("bad", path)
    assert exc.value.field == victim
    _assert_unchanged(llm, baseline)


def test_shape_mismatch(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_tensors(path, lambda t: t.__setitem__(key, np.zeros((8, 63), np.float32)))
    with pytest.raises(AdapterError, match="shape") as exc:
        llm.load_adapter("bad", path)
    assert exc.value.field == key
    _assert_unchanged(llm, baseline)


def test_adapter_for_another_base_model(llm, baseline, tmp_path):
    path = _copy(tmp_path, model="mixtral-fused")  # hidden 64 but head_dim 16 and experts of width 96
    with pytest.raises(AdapterError, match="base-model mismatch|fit neither"):
        llm.load_adapter("bad", path)
    _assert_unchanged(llm, baseline)


def test_truncated_safetensors(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    file = os.path.join(path, "adapter_model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(AdapterError, match="truncated") as exc:
        llm.load_adapter("bad", path)
    assert exc.value.path == file
    _assert_unchanged(llm, baseline)


def test_garbage_safetensors_and_config(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(AdapterError):
        llm.load_adapter("bad", path)
    path2 = _copy(tmp_path, name="attn-r4-rslora")
    with open(os.path.join(path2, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(AdapterError, match="JSON"):
        llm.load_adapter("bad", path2)
    with pytest.raises(AdapterError, match="does not exist"):
        llm.load_adapter("bad", os.path.join(tmp_path, "nowhere"))
    _assert_unchanged(llm, baseline)


def test_non_finite_values(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][0, 0] = np.nan
    _edit_tensors(path, poison)
    with pytest.raises(AdapterError, match="NaN") as exc:
        llm.load_adapter("bad", path)
    assert exc.value.field == key
    _assert_unchanged(llm, baseline)


def test_unsupported_module(llm, baseline, tmp_path):
    path = _copy(tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight",
                                                np.zeros((8, 64), np.float32)))
    with pytest.raises(UnsupportedAdapterError, match="lm_head"):
        llm.load_adapter("bad", path)
    _assert_unchanged(llm, baseline)


def test_oversized_adapter_file():
    cfg = ModelConfig.from_hf_dir(model_dir(MODEL))
    with pytest.raises(AdapterError, match="size limit"):
        load_peft_adapter(adapter_dirs(MODEL)[GOOD], cfg, max_rank=16, max_bytes=1000)


def test_names_cycling_busy_and_unload(llm, baseline):
    with pytest.raises(AdapterError, match="already loaded"):
        llm.load_adapter("resident", adapter_dirs(MODEL)["attn-r4-rslora"])
    for bad_name in ("", "../x", "a b", "x" * 200):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            llm.load_adapter(bad_name, adapter_dirs(MODEL)["attn-r4-rslora"])
    # three adapters registered for two device slots: they take turns in the slots
    llm.load_adapter("second", adapter_dirs(MODEL)["attn-r4-rslora"])
    llm.load_adapter("third", adapter_dirs(MODEL)["attn-layers02-r16"])
    second, third = llm.logits(PROMPT, "second"), llm.logits(PROMPT, "third")
    _assert_unchanged_after_cycling(llm, baseline, second, third)
    # unloading an adapter that a running request holds is refused; the request is unaffected
    cache = llm.runner.adapters
    cache.acquire("second")
    with pytest.raises(AdapterBusyError):
        llm.unload_adapter("second")
    cache.release("second")
    llm.unload_adapter("second")
    with pytest.raises(AdapterNotFoundError):
        llm.logits(PROMPT, "second")
    with pytest.raises(AdapterNotFoundError):
        llm.unload_adapter("second")
    llm.unload_adapter("third")
    _assert_unchanged(llm, baseline)
    # a name can be registered again and computes the same function
    llm.load_adapter("second", adapter_dirs(MODEL)["attn-r4-rslora"])
    np.testing.assert_array_equal(llm.logits(PROMPT, "second"), second)
    llm.unload_adapter("second")
    assert llm.adapters == ["resident"]


def _assert_unchanged_after_cycling(llm, baseline, second, third):
    for _ in range(2):
        for name, want in (("third", third), ("resident", baseline), ("second", second)):
            np.testing.assert_array_equal(llm.logits(PROMPT, name), want)
    assert llm.runner.adapters.stats.evictions >= 4


def test_adapter_unreadable_after_registration_fails_only_its_requests(tmp_path):
    """An adapter whose files vanish after registration, once its host copy was dropped (so its next use reads it
    again), fails only the requests that name it: finish_reason "error" with an error naming it, no slot mapped
    to it (a later request for it never runs with another adapter's pages), the requests beside it exact. The
    OpenAI server answers it with a 500 naming the adapter and keeps serving; LLM.generate raises
    AdapterLoadError; once the files are back the adapter serves again."""
    import httpx
    from conftest import reference

    from infinilora_jax import SamplingParams
    from infinilora_jax.errors import AdapterLoadError
    from infinilora_jax.serving import BackgroundServer, ServerConfig, ServerState

    ref = reference(MODEL)
    prompt = ref["prompt_0"].tolist()
    want = {a: ref[f"greedy__{a}__0"].tolist() for a in ("all-linear-r4", "attn-experts-r8", "attn-layers02-r16")}
    n = len(want["all-linear-r4"])
    dirs = {a: _copy(tmp_path, a) for a in want}
    llm = LLM(model_dir(MODEL), adapters=dirs, dtype="float32", max_adapters=1, max_host_adapters=1,
              max_lora_rank=16, progress=False)
    victim, first, last = list(want)
    cache = llm.runner.adapters
    assert victim not in cache.host, "its host copy was dropped: its next use reads it again"
    moved = str(tmp_path / "moved")
    shutil.move(dirs[victim], moved)
    greedy = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    engine = llm.engine
    ids = {engine.add_request(prompt, greedy, a): a for a in (first, victim, last)}
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    engine.pop_finished()
    assert sorted(ids) == sorted(done)
    for rid, adapter in ids.items():
        if adapter == victim:
            assert done[rid].finish_reason == "error" and done[rid].token_ids == []
            assert victim in done[rid].error and "could not be read again" in done[rid].error
        else:
            assert done[rid].token_ids == want[adapter] and done[rid].error is None
    assert victim not in cache.slot_of and cache.refcount[victim] == 0
    with pytest.raises(AdapterLoadError, match=victim):
        llm.generate([prompt], greedy, adapter=victim)
    assert llm.generate([prompt], greedy, adapter=first)[0].token_ids == want[first], "the slot holds no stale map"

    server = BackgroundServer(ServerState(llm, ServerConfig(model_name="tiny"))).start()
    try:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True}
        r = httpx.post(server.base_url + "/v1/completions", json={**body, "model": victim}, timeout=300)
        assert r.status_code == 500 and r.json()["error"]["code"] == "adapter_load_failed", r.text
        assert victim in r.json()["error"]["message"]
        r = httpx.post(server.base_url + "/v1/completions", json={**body, "model": last}, timeout=300)
        assert r.status_code == 200, r.text
        shutil.move(moved, dirs[victim])
        r = httpx.post(server.base_url + "/v1/completions", json={**body, "model": victim}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == llm.tokenizer.decode(want[victim], skip_special_tokens=True)
    finally:
        server.stop(stop_engine=True)
