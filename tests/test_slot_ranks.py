"""The adapter pool keeps each slot's page rank per layer and target (LoraPool "rank"), written with the pages, and
the model passes it to the LoRA kernels (`slot_ranks`), which skip the zero padding above it. The fixture's
adapters have ranks 4, 8 and 16 in one pool and some lack targets or layers (rank 0 there)."""

import numpy as np
import pytest
from conftest import adapter_dirs, model_dir

from infinilora_jax import LLM
from pallas_kernels import dispatch

MODEL = "qwen3-moe-fused"


@pytest.fixture(scope="module")
def llm():
    return LLM(model_dir(MODEL), adapters=adapter_dirs(MODEL), dtype="float32", progress=False)


def test_pool_ranks_follow_the_resident_adapters(llm):
    tokens = list(range(3, 12))
    names = list(adapter_dirs(MODEL))
    for name in names:
        llm.logits(tokens, name)  # makes it resident
    cache, plan = llm.engine.runner.adapters, llm.engine.runner.model.plan
    resident = {name: cache.slot_of[name] for name in names if name in cache.slot_of}
    assert resident, "no adapter stayed resident"
    layers = cache.pool_state["layers"]
    checked = 0
    for name, slot in resident.items():
        pages = cache.info(name).pages
        for layer in range(llm.engine.runner.cfg.num_layers):
            stage, j = divmod(layer, plan.layers_per_stage)
            for target, page in layers[j].items():
                want = pages[(layer, target)][0].shape[-2] if (layer, target) in pages else 0
                assert int(np.asarray(page["rank"])[stage, slot]) == want, (name, layer, target)
                assert int(np.asarray(page["rank"])[stage, 0]) == 0  # slot 0: no adapter
                checked += want > 0
    assert checked  # some pages have a rank, and (attn-layers02-r16: layers 0 and 2 only) some have none


def test_kernels_skipping_padding_match_the_reference(monkeypatch):
    """Teacher-forced logits with every LoRA call on the TPU kernels (interpreter), which now skip the rank
    blocks above each slot's page rank and every page of rank 0, against the reference: the same within float32
    rounding (tools/check_lora_kernels_in_model.py prints the same comparison per adapter)."""
    tokens = list(range(3, 20))
    names = ["attn-layers02-r16"]  # rank 16 on layers 0 and 2, nothing (rank 0) on the others
    seen = []  # each kernel call's slot_ranks, at trace time: the model must pass the pool's ranks
    kernel_apply = dispatch._kernel_apply

    def recording(*args, slot_ranks, **kwargs):
        seen.append(slot_ranks)
        return kernel_apply(*args, slot_ranks=slot_ranks, **kwargs)

    monkeypatch.setattr(dispatch, "_kernel_apply", recording)
    got = {}
    for backend in ("reference", "tpu_interpret"):
        with dispatch.use_backend(backend):
            llm = LLM(model_dir(MODEL), adapters={n: adapter_dirs(MODEL)[n] for n in names}, dtype="float32",
                      progress=False)
            got[backend] = {n: np.asarray(llm.logits(tokens, n), np.float64) for n in names}
    assert seen and all(r is not None and all(x is not None for x in (r if isinstance(r, tuple) else (r,)))
                        for r in seen)
    for n in names:
        want = got["reference"][n]
        err = np.linalg.norm(got["tpu_interpret"][n] - want) / np.linalg.norm(want)
        assert err < 1e-5, (n, err)
