"""Load on the real server: many concurrent streaming clients lose and duplicate no token (each stream equals the
same request run alone, greedy), and a steady stream of varied requests compiles nothing after warm-up."""

import asyncio
import random

import openai
from server_support import API_KEY, client, engine_idle, metric, shared_server, token_ids

from infinilora_jax.bench.compilations import CompileCounter

BASE = "tiny-qwen3-moe"
WORDS = "the quick brown fox jumps over a lazy dog once upon time there was king who loved music".split()


def _requests(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    models = [BASE, *shared_server().state.llm.adapters[:4]]
    return [dict(model=models[i % len(models)], prompt=" ".join(rng.choices(WORDS, k=rng.randint(1, 5))),
                 max_tokens=rng.randint(4, 10)) for i in range(count)]


def test_concurrent_streams_lose_and_duplicate_no_token():
    reqs = _requests(0, 32)
    oai = client()
    extra = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    alone = []
    for r in reqs:  # each request alone, whole response
        c = oai.completions.create(temperature=0, logprobs=0, extra_body=extra, **r).choices[0]
        alone.append((token_ids(c.logprobs.tokens), c.text))

    async def stream(aoai, r):
        ids, text, finishes, usage = [], "", [], None
        chunks = await aoai.completions.create(temperature=0, logprobs=0, extra_body=extra, stream=True,
                                               stream_options={"include_usage": True}, **r)
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                text += ch.text
                ids += token_ids(ch.logprobs.tokens)
                if ch.finish_reason:
                    finishes.append(ch.finish_reason)
        return ids, text, finishes, usage

    async def all_streams():
        aoai = openai.AsyncOpenAI(base_url=shared_server().base_url + "/v1", api_key=API_KEY, max_retries=0,
                                  timeout=300)
        try:
            return await asyncio.gather(*(stream(aoai, r) for r in reqs))
        finally:
            await aoai.close()

    ran_concurrently = metric("infinilora_engine_step_seconds_count")
    results = asyncio.run(all_streams())
    steps = metric("infinilora_engine_step_seconds_count") - ran_concurrently
    assert steps < sum(r["max_tokens"] for r in reqs) / 2, "the streams were not batched together"
    for r, (want_ids, want_text), (ids, text, finishes, usage) in zip(reqs, alone, results):
        assert ids == want_ids and text == want_text, r
        assert finishes == ["length"] and usage.completion_tokens == len(ids) == r["max_tokens"]
    engine_idle()
    assert metric("infinilora_num_requests_running") == 0


def _varied(seed: int, count: int, warm: bool) -> list[tuple[str, dict]]:
    """Sequential requests mixing every feature; prompts of 1-24 tokens, n of 1-2, up to 8 new tokens (the warm-up
    also visits each length bucket's edges)."""
    rng = random.Random(seed)
    models = [BASE, *shared_server().state.llm.adapters[:4]]
    lengths = [rng.randint(1, 24) for _ in range(count)]
    if warm:
        lengths = [1, 2, 8, 16, 17, 24] * 2 + lengths
    out = []
    for i, length in enumerate(lengths):
        n = (i % 2) + 1 if warm and i < 12 else rng.choice([1, 2])
        common = dict(model=rng.choice(models), n=n, max_tokens=rng.randint(1, 8), seed=rng.randrange(1000),
                      temperature=rng.choice([0.0, 0.8]), top_p=rng.choice([1.0, 0.9]), stream=rng.random() < 0.5)
        prompt = [rng.randrange(3, 500) for _ in range(length)]
        kind = "echo" if (warm and i < 12 and i % 4 < 2) else rng.choice(["completion", "echo", "chat"])
        if kind == "chat":
            out.append(("chat", dict(messages=[{"role": "user", "content": " ".join(rng.choices(WORDS, k=3))}],
                                     logprobs=rng.random() < 0.5, **common)))
        else:
            extra = dict(echo=True, logprobs=rng.randint(0, 5)) if kind == "echo" else dict(
                logprobs=rng.choice([None, 0, 3]), stop=rng.choice([None, ["the"]]))
            out.append(("completion", dict(prompt=prompt, **extra, **common)))
    return out


def _run(oai, reqs) -> None:
    for kind, r in reqs:
        api = oai.completions if kind == "completion" else oai.chat.completions
        out = api.create(**r)
        if r["stream"]:
            finishes = [c.finish_reason for chunk in out for c in chunk.choices if c.finish_reason]
            assert len(finishes) == r["n"]
        else:
            assert len(out.choices) == r["n"] and all(c.finish_reason for c in out.choices)


def test_steady_stream_of_requests_does_not_recompile():
    oai = client()
    counter = CompileCounter()
    _run(oai, _varied(1, 30, warm=True))
    warm = counter.count
    _run(oai, _varied(2, 40, warm=False))
    assert counter.count == warm, f"{counter.count - warm} new compilations in steady state"
