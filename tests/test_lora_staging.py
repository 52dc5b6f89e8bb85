"""Adapter staging (lora/staging.py): where an adapter's pages wait between the host store and a device slot.
Every mode must load the same pages: greedy outputs through adapters cycled through fewer device slots than
adapters equal the HF + PEFT references, coupled and disaggregated."""

import jax
import numpy as np
import pytest
from conftest import adapter_dirs, model_dir, reference
from jax.sharding import NamedSharding, PartitionSpec

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.errors import ConfigError
from infinilora_jax.lora import staging

MODEL = "qwen3-moe-fused"


@pytest.mark.parametrize("mode", staging.MODES)
def test_stage_puts_pages_in_the_modes_memory(mode):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
    tree = {"a": np.arange(32, dtype=np.float32).reshape(4, 8), "b": np.ones((4, 2), np.int32)}
    shardings = {"a": NamedSharding(mesh, PartitionSpec("x")), "b": NamedSharding(mesh, PartitionSpec())}
    for out in (staging.stage(tree, shardings, mode), staging.stage(tree, shardings["b"], mode)):
        for name, leaf in out.items():
            assert leaf.sharding.memory_kind == ("device" if mode == "device" else "pinned_host")
            np.testing.assert_array_equal(np.asarray(leaf), tree[name])
    assert staging.stage(tree, shardings, mode)["a"].sharding.spec == PartitionSpec("x")


def test_unknown_staging_mode_is_refused(monkeypatch):
    monkeypatch.setenv(staging.ENV_VAR, "hbm")
    with pytest.raises(ConfigError, match="INFINILORA_ADAPTER_STAGING"):
        staging.staging_mode()


@pytest.mark.parametrize("mode,kind", [("device", "coupled"), ("via_device", "disaggregated")])
def test_adapters_cycled_through_slots_load_the_same_pages(monkeypatch, mode, kind):
    """Two device slots for four adapters: every adapter is staged, evicted and loaded again (layer by layer,
    in the steps); greedy tokens equal HF + PEFT's."""
    monkeypatch.setenv(staging.ENV_VAR, mode)
    ref = reference(MODEL)
    names = list(adapter_dirs(MODEL))
    extra = dict(mode="disaggregated", mesh="1+1") if kind == "disaggregated" else {}
    llm = LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", max_adapters=2, max_host_adapters=4,
              max_num_seqs=2, max_model_len=64, progress=False, **extra)
    assert llm.runner.adapters.staging == mode
    prompt = ref["prompt_0"].tolist()
    for _ in range(2):  # twice: the second round loads adapters whose pages are already staged
        for name in names:
            want = ref[f"greedy__{name}__0"].tolist()
            out = llm.generate([prompt], SamplingParams(max_tokens=len(want), temperature=0.0, ignore_eos=True),
                               adapter=name)[0]
            assert out.token_ids == want, (mode, kind, name)
    staged = jax.tree.leaves(llm.runner.adapters.staged)
    assert staged and {a.sharding.memory_kind for a in staged} == {staging.memory_kind(mode)}
