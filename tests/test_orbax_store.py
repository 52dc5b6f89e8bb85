"""Converted parameters saved with Orbax reload to the same function, into another ep/tp split too."""

import os

import numpy as np
import pytest
from conftest import adapter_dirs, model_dir, reference, rel_err

from infinilora_jax import LLM
from infinilora_jax.errors import CheckpointError

MODEL = "qwen3-moe-fused"


def test_save_and_restore_converted(tmp_path):
    src = LLM(model_dir(MODEL), dtype="float32", mesh="pp2_ep2_tp2", progress=False)
    out = os.path.join(tmp_path, "converted")
    src.save_converted(out)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    prompt = reference(MODEL)["prompt_0"].tolist()
    want = src.logits(prompt)
    for layout in ("pp2_ep2_tp2", "pp2_ep4"):
        llm = LLM(out, adapters={"a": adapter_dirs(MODEL)["attn-experts-r8"]}, dtype="float32", mesh=layout,
                  progress=False)
        np.testing.assert_allclose(llm.logits(prompt), want, rtol=1e-5, atol=1e-5)
        assert rel_err(llm.logits(prompt, "a"), reference(MODEL)["logits_f32__attn-experts-r8__0"]) < 1e-4
        assert llm.tokenizer is not None
    with pytest.raises(CheckpointError, match="pp=2"):
        LLM(out, dtype="float32", mesh=None, progress=False)
