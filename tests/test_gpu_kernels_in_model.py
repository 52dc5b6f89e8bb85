"""The Mosaic GPU LoRA kernels (run by the Mosaic GPU interpreter on CPU) inside whole models: a Qwen3-MoE-shaped
model with random weights whose widths the kernels take (multiples of 64; the bundled tiny models' expert widths
are not, so their LoRA runs the reference), random adapters on every target, bf16. The logits of one prefill step
mixing adapters, with the kernels for every LoRA call, equal those of the reference LoRA math in coupled mode,
the MoE layer's rows taken in place (sorted by (expert, slot)).

Disaggregated mode is not run this way: on CPU the interpreted kernels on the LoRA device outlast XLA:CPU's
40-second rendezvous limit for the base device's collective permute, which aborts the process. The LoRA server's
paged deltas through the kernels are checked op by op (tests/test_gpu_kernels.py), and disaggregated outputs
equal coupled ones with the reference (tests/test_disagg.py) and on two H200s."""

import json

import numpy as np
import pytest

from infinilora_jax.bench.replay import benchmark_llm
from infinilora_jax.models.batch import RowSpec, build_step_batch
from pallas_kernels import dispatch

CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256,
          "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
          "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
          "hidden_act": "silu", "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "qwen3-moe-64.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _mixed_batch_logits(config_path, backend) -> list[np.ndarray]:
    """Logits of one prefill step whose rows are 8 short prompts under 3 random rank-16 adapters and none, taken
    in turn, so that in every expert the rows of one adapter come in several runs (token order), more runs than
    the grouping has room for unless the MoE layer sorts them by (expert, slot); the last row repeats the first
    prompt without an adapter. Every program is traced inside `use_backend`, so its LoRA calls use that
    backend."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, CONFIG["vocab_size"], size=n).tolist() for n in (6, 5, 7, 5, 6, 5, 7)]
    with dispatch.use_backend(backend):
        llm, names = benchmark_llm(config_path, 3, 16, 4, dtype="bfloat16", precompile=False,
                                   max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
        engine, runner = llm.engine, llm.runner
        cache, specs = engine.cache_config, []
        adapters = [(*names, None)[i % 4] for i in range(len(prompts))]
        for prompt, name in zip((*prompts, prompts[0]), (*adapters, None)):
            pages = engine.scheduler.allocator.allocate(cache.pages_for(len(prompt)))
            specs.append(RowSpec(prompt, 0, runner.adapters.acquire(name), pages, "all"))
        batch, row_logits = build_step_batch(specs, cache.page_size, cache.num_pages)
        logits, _ = runner.score(batch, runner.new_kv_cache(cache))
    return [np.asarray(logits[idx], np.float32) for idx in row_logits]


def test_kernels_equal_the_reference_in_the_whole_model(config_path):
    want = _mixed_batch_logits(config_path, "reference")
    got = _mixed_batch_logits(config_path, "gpu_interpret")
    errs = []
    for g, w in zip(got, want):
        assert np.all(np.isfinite(g))
        errs.append(np.linalg.norm(g - w) / np.linalg.norm(w))
    assert max(errs) < 2e-2, errs
    # the adapter changes the first prompt's logits far more than kernels and reference differ
    assert np.linalg.norm(want[0] - want[-1]) / np.linalg.norm(want[-1]) > 5 * max(errs)
