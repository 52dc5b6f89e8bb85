"""The library API as users call it: bundled model, text prompts, sampling controls, and request errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import model_dir, reference, shared_llm

from infinilora_jax import LLM, SamplingParams
from infinilora_jax.engine.sampler import SamplingArrays, sample
from infinilora_jax.errors import AdapterNotFoundError, RequestError
from infinilora_jax.llm import bundled_adapters

GREEDY8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def bundled():
    return LLM(adapters=bundled_adapters(), dtype="float32", progress=False)


def test_bundled_model_generates_text_with_mixed_adapters(bundled):
    names = list(bundled_adapters())
    assert len(names) >= 3 and bundled.tokenizer is not None
    prompts = ["The quick brown fox", "Once upon a time", "Hello"] + ["The quick brown fox"] * len(names)
    adapters = [None, None, None, *names]
    out = bundled.generate(prompts, GREEDY8, adapter=adapters)
    assert [r.adapter for r in out] == adapters
    for r in out:
        assert len(r.token_ids) == 8 and isinstance(r.text, str) and r.finish_reason == "length"
        assert r.text == bundled.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    # each adapter is a different function: at least one continuation differs from the base model's
    base = out[0].token_ids
    assert any(r.token_ids != base for r in out[3:])
    # a prompt in a mixed batch gets the same tokens it gets alone
    alone = bundled.generate(prompts[3], GREEDY8, adapter=names[0])[0]
    assert alone.token_ids == out[3].token_ids


def test_stop_tokens_strings_and_eos(bundled):
    ref = bundled.generate("Once upon a time", GREEDY8)[0].token_ids
    stop_at = ref[3]
    first = ref.index(stop_at)
    out = bundled.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                               stop_token_ids=[stop_at]))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    full_text = bundled.tokenizer.decode(ref, skip_special_tokens=True)
    needle = full_text[len(full_text) // 2: len(full_text) // 2 + 2]
    if needle.strip():
        out = bundled.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                   stop=[needle]))[0]
        assert out.finish_reason == "stop" and needle not in out.text and full_text.startswith(out.text)
    eos = bundled.config.eos_token_ids[0]
    out = bundled.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[]))[0]
    assert eos not in out.token_ids[:-1]


def test_sampling_seed_topk_and_max_tokens(bundled):
    hot = SamplingParams(max_tokens=6, temperature=1.5, seed=1234, ignore_eos=True)
    a = bundled.generate("Hello", hot)[0].token_ids
    b = bundled.generate("Hello", hot)[0].token_ids
    assert a == b and len(a) == 6
    others = {tuple(bundled.generate("Hello", SamplingParams(max_tokens=6, temperature=1.5, seed=s,
                                                              ignore_eos=True))[0].token_ids) for s in range(5)}
    assert len(others) > 1
    greedy = bundled.generate("Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    top1 = bundled.generate("Hello", SamplingParams(max_tokens=6, temperature=2.0, top_k=1, seed=3,
                                                    ignore_eos=True))[0].token_ids
    assert top1 == greedy


def test_device_sampler_respects_top_p_top_k_and_temperature():
    """Frequencies over many seeds: only the nucleus / top-k set is ever drawn, in the right proportions."""
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = np.tile(np.log(probs), (1, 1))
    draws = 2000
    cases = [(SamplingParams(top_p=0.7), {0: 0.5 / 0.8, 1: 0.3 / 0.8}),
             (SamplingParams(top_k=3), {0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95}),
             (SamplingParams(top_p=0.9, top_k=2), {0: 0.5 / 0.8, 1: 0.3 / 0.8}),
             (SamplingParams(temperature=1.0), dict(enumerate(probs))),
             (SamplingParams(temperature=0.0), {0: 1.0})]
    for params, want in cases:
        arrays = SamplingArrays.build([params] * draws, list(range(draws)), [0] * draws, draws)
        tokens = np.asarray(sample(jnp.asarray(np.repeat(logits, draws, 0)), arrays, vocab_size=4))
        freq = {t: float(np.mean(tokens == t)) for t in set(tokens.tolist())}
        assert set(freq) == set(want), (params, freq)
        for t, p in want.items():
            assert abs(freq[t] - p) < 0.04, (params, freq)
    # padded vocabulary entries are never drawn, even with huge logits
    padded = np.array([[0.0, 0.0, 50.0]], np.float32)
    arrays = SamplingArrays.build([SamplingParams(temperature=1.0)], [0], [0], 1)
    assert int(sample(jnp.asarray(padded), arrays, vocab_size=2)[0]) in (0, 1)


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(stop_token_ids=[-1]), dict(stop=[""]),
                                    dict(temperature=float("nan"))])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_request_errors(bundled):
    with pytest.raises(RequestError, match="empty"):
        bundled.generate([[]], GREEDY8)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        bundled.generate([[1, 2, 10**6]], GREEDY8)
    with pytest.raises(RequestError, match="context limit"):
        bundled.generate([[1] * bundled.max_model_len], GREEDY8)
    with pytest.raises(AdapterNotFoundError, match="nope"):
        bundled.generate("Hello", GREEDY8, adapter="nope")
    with pytest.raises(RequestError, match="2 prompts"):
        bundled.generate(["a", "b"], GREEDY8, adapter=[None])


def test_generation_stops_at_context_limit():
    llm = LLM(model_dir("mixtral-fused"), dtype="float32", max_model_len=20, progress=False)
    assert llm.tokenizer is None
    out = llm.generate([list(range(3, 18))], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and out.text is None
    with pytest.raises(RequestError, match="tokenizer"):
        llm.generate("text needs a tokenizer", GREEDY8)


def test_logits_are_teacher_forced_next_token_scores():
    llm, ref = shared_llm("qwen3-moe-fused", "float32", None), reference("qwen3-moe-fused")
    prompt = ref["prompt_1"].tolist()
    logits = llm.logits(prompt)
    assert logits.shape == (len(prompt), 512) and logits.dtype == np.float32
    assert int(np.argmax(logits[-1])) == ref["greedy__base__1"][0]


def test_a_rows_sample_does_not_depend_on_its_batch_mates():
    """A seeded row draws the same token alone, beside a greedy row, beside a top-p row (which makes the batch take
    the filtering path), with the path picked on the device or on the host (SamplingArrays.work)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 64)).astype(np.float32) * 3)
    plain = SamplingParams(temperature=0.8, seed=11)
    batches = {"alone": [plain], "with greedy": [plain, SamplingParams(temperature=0.0)],
               "with top-p": [plain, SamplingParams(temperature=1.0, top_p=0.5, seed=2)],
               "with top-k": [plain, SamplingParams(temperature=1.0, top_k=3, seed=2), SamplingParams(temperature=0)]}
    for counter in range(6):
        drawn = set()
        for params in batches.values():
            rows = SamplingArrays.build(params, [p.seed or 0 for p in params], [counter] * len(params), 3)
            for work in (None, rows.work()):
                drawn.add(int(jax.jit(sample, static_argnums=(2, 3))(logits, rows, 64, work)[0]))
        assert len(drawn) == 1, (counter, drawn)
