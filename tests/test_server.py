"""The OpenAI-compatible server over real HTTP with the official `openai` client: models, completions and chat
(whole and streamed), logprobs against the engine's teacher-forced logits, n / seed / stop, adapters loaded and
unloaded at runtime, every bad input answered with an OpenAI error while the server keeps serving, client
disconnects, a failing engine step, metrics and the API key."""

import json
import os
import shutil

import httpx
import numpy as np
import openai
import pytest
from conftest import adapter_dirs
from server_support import (
    API_KEY,
    MAX_MODEL_LEN,
    adapter_root,
    assert_error,
    client,
    engine_idle,
    get,
    log_softmax,
    metric,
    on_engine,
    patched_sample,
    post,
    shared_server,
    slow_steps,
    token_ids,
)

from infinilora_jax.loading.safetensors_io import SafetensorsFile, save_file

BASE = "tiny-qwen3-moe"
IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def oai(server):
    return client(server)


def _greedy(oai, prompt, model=BASE, max_tokens=8, **kw):
    r = oai.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
                               extra_body={**IDS, "ignore_eos": True}, **kw)
    return r.choices[0], token_ids(r.choices[0].logprobs.tokens)


def test_models_list_base_and_adapters(server, oai):
    models = {m.id: m for m in oai.models.list().data}
    adapters = set(server.state.llm.adapters)
    assert len(adapters) >= 3 and set(models) == {BASE} | adapters
    assert models[BASE].parent is None and models[BASE].max_model_len == MAX_MODEL_LEN
    assert all(models[a].parent == BASE for a in adapters)
    assert oai.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_completion_tokens_and_logprobs_match_engine_logits(oai):
    """Greedy tokens are the argmax of the teacher-forced logits, and every reported logprob (sampled and top-5)
    is log_softmax of LLM.logits at that position, for the base model and an adapter."""
    llm = shared_server().state.llm
    prompt = "The quick brown fox"
    prompt_ids = llm.tokenizer.encode(prompt).ids
    for model in (BASE, "attn-experts-r8"):
        r = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=5,
                                   extra_body={**IDS, "ignore_eos": True})
        c = r.choices[0]
        ids = token_ids(c.logprobs.tokens)
        assert len(ids) == 6 and c.finish_reason == "length"
        assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 6
        assert c.text == llm.tokenizer.decode(ids, skip_special_tokens=True)
        adapter = None if model == BASE else model
        lp = log_softmax(on_engine(lambda a=adapter: llm.logits(prompt_ids + ids, a)))
        for t, tok in enumerate(ids):
            row = lp[len(prompt_ids) - 1 + t]
            assert tok == int(np.argmax(row))
            np.testing.assert_allclose(c.logprobs.token_logprobs[t], row[tok], atol=1e-4)
            top = c.logprobs.top_logprobs[t]
            want = np.argsort(-row)[:5]
            assert {int(k.split(":")[1]) for k in top} == set(want.tolist())
            for k, v in top.items():
                np.testing.assert_allclose(v, row[int(k.split(":")[1])], atol=1e-4)


def test_echo_prompt_logprobs_for_eval_harnesses(oai):
    """lm-eval `local-completions` style: a batch of token-id prompts, echo, logprobs=1, max_tokens=1 (and 0);
    prompt logprobs equal log_softmax of the teacher-forced logits, the first is null."""
    llm = shared_server().state.llm
    prompts = [llm.tokenizer.encode(s).ids for s in ("Once upon a time there", "Hello world, how are")]
    for max_tokens in (1, 0):
        r = oai.completions.create(model="all-linear-r4", prompt=prompts, max_tokens=max_tokens, temperature=0,
                                   logprobs=1, echo=True, seed=1234)
        assert [c.index for c in r.choices] == [0, 1]
        for c, ids in zip(r.choices, prompts):
            lp = log_softmax(on_engine(lambda i=ids: llm.logits(i, "all-linear-r4")))
            got = c.logprobs.token_logprobs
            assert got[0] is None and len(got) == len(ids) + max_tokens
            want = [lp[t - 1, ids[t]] for t in range(1, len(ids))]
            np.testing.assert_allclose(got[1:len(ids)], want, atol=1e-4)
            top1 = [max(d, key=d.get) for d in c.logprobs.top_logprobs[1:len(ids)]]
            fmt = shared_server().state.formatter
            assert top1 == [fmt.token_str(int(np.argmax(lp[t - 1]))) for t in range(1, len(ids))]
            assert c.text.startswith(llm.tokenizer.decode(ids, skip_special_tokens=False))
            assert c.logprobs.text_offset[:2] == [0, len(fmt.token_str(ids[0]))]
        assert r.usage.prompt_tokens == sum(map(len, prompts))


def test_streaming_equals_whole_response(oai):
    for kind in ("completion", "chat"):
        kwargs = dict(model="attn-r4-rslora", max_tokens=12, temperature=0)
        if kind == "completion":
            whole = oai.completions.create(prompt="Once upon a time", **kwargs).choices[0]
            chunks = list(oai.completions.create(prompt="Once upon a time", stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            want = whole.text
        else:
            messages = [{"role": "user", "content": "Tell me a story"}]
            whole = oai.chat.completions.create(messages=messages, **kwargs).choices[0]
            chunks = list(oai.chat.completions.create(messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **kwargs))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            want = whole.message.content
        assert text == want
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == [whole.finish_reason]
        usage = chunks[-1].usage
        assert not chunks[-1].choices and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_strings_cut_text_and_never_leak_into_streams(oai):
    full, ids = _greedy(oai, "Once upon a time", max_tokens=16)
    text = full.text
    needle = next((text[i:i + 3] for i in range(3, len(text) - 3) if text[i:i + 3].strip()
                   and "\ufffd" not in text[i:i + 3]), None)
    assert needle is not None, text
    cut = text.index(needle)
    kwargs = dict(model=BASE, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[needle, "zzzz"])
    r = oai.completions.create(**kwargs).choices[0]
    assert r.finish_reason == "stop" and r.text == text[:cut]
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(stream=True, **kwargs))
    assert streamed == text[:cut]
    # a stop token id ends the output at that token
    stop_id = ids[4]
    r = oai.completions.create(model=BASE, prompt="Once upon a time", max_tokens=16, temperature=0,
                               extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == ids.index(stop_id) + 1


def test_seed_and_n_choices(oai):
    kwargs = dict(model="attn-experts-r8", prompt="Hello", max_tokens=6, temperature=1.0, seed=7, logprobs=0,
                  extra_body={**IDS, "ignore_eos": True})
    a = oai.completions.create(n=3, **kwargs)
    b = oai.completions.create(n=3, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    runs = [[token_ids(c.logprobs.tokens) for c in r.choices] for r in (a, b)]
    assert runs[0] == runs[1], "a seeded request is reproducible"
    assert len({tuple(x) for x in runs[0]}) > 1, "the n choices sample differently"
    single = oai.completions.create(**kwargs).choices[0]
    assert token_ids(single.logprobs.tokens) == runs[0][0]
    assert a.usage.completion_tokens == 18
    # chat with n and logprobs
    r = oai.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2,
                                    temperature=0, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.content) == r.choices[0].logprobs.content.__len__()
        for item in c.logprobs.content:
            assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob


def test_chat_uses_the_checkpoint_template_and_adapters(oai):
    state = shared_server().state
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    rendered = state.chat_template.render(messages)
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nBe brief.<|im_end|>" in rendered
    outs = {}
    for model in (BASE, "all-linear-r4", "attn-layers02-r16"):
        r = oai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        assert r.model == model and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(state.tokenizer.encode(rendered, add_special_tokens=False).ids)
        outs[model] = r.choices[0].message.content
    assert len(set(outs.values())) > 1, "adapters change the output"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    r = oai.chat.completions.create(model=BASE, messages=parts, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(state.tokenizer.encode(state.chat_template.render(
        [{"role": "user", "content": "Hello there"}]), add_special_tokens=False).ids)


BAD_COMPLETIONS = [
    (dict(model="no-such-adapter"), 404, "does not exist"),
    (dict(prompt="word " * 200), 400, "maximum context length"),
    (dict(max_tokens=MAX_MODEL_LEN), 400, "maximum context length"),
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(max_tokens=0), 400, "echo"),
    (dict(temperature=-0.5), 400, "temperature"),
    (dict(temperature=2.5), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(n=0), 400, "n"),
    (dict(logprobs=21), 400, "logprobs"),
    (dict(presence_penalty=0.5), 400, "not supported"),
    (dict(extra_body={"top_k": -5}), 400, "top_k"),
    (dict(extra_body={"min_p": 0.1}), 400, "not supported"),
    (dict(logit_bias={"5": 1.0}), 400, "logit_bias"),
    (dict(best_of=3), 400, "best_of"),
    (dict(prompt=[]), 400, "empty"),
    (dict(prompt=""), 400, "empty"),
    (dict(prompt=[1, 2, 10**6]), 400, "token ids"),
    (dict(prompt=[[1, 2], [-3]]), 400, "token ids"),
    (dict(stop=[""]), 400, "stop"),
    (dict(seed=2**70), 400, "seed"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),
]


@pytest.mark.parametrize("change,status,match", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests_get_openai_errors(oai, change, status, match):
    kwargs = dict(model=BASE, prompt="Hello", max_tokens=4)
    kwargs.update(change)
    with pytest.raises(openai.APIStatusError) as info:
        oai.completions.create(**kwargs)
    assert info.value.status_code == status
    assert match.lower() in info.value.response.json()["error"]["message"].lower()


def test_malformed_bodies_get_400_and_the_server_keeps_serving(oai):
    cases = [
        (b"{not json", "application/json", "malformed JSON"),
        (b"[1, 2]", "application/json", ""),
        (b'"prompt"', "application/json", ""),
        (b"", "application/json", "required"),
        (b'{"prompt": "hi", "max_tokens": NaN}', "application/json", ""),
        (b'{"prompt": "hi", "temperature": Infinity}', "application/json", ""),
        (b'{"prompt": {"nested": true}}', "application/json", "prompt"),
        (b"prompt=hi", "application/x-www-form-urlencoded", ""),
    ]
    for body, ctype, match in cases:
        assert_error(post("/v1/completions", content=body, headers={"content-type": ctype}), 400, match)
    assert_error(post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(post("/v1/chat/completions", json={"messages": image}), 400)
    assert_error(post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                    "tools": [{"type": "function"}]}), 400, "tool")
    assert_error(post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}), 400, "logprobs")
    assert_error(post("/v1/no/such/route", json={}), 404)
    assert_error(get("/v1/completions"), 405)
    assert get("/health").json() == {"status": "ok"}
    assert oai.completions.create(model=BASE, prompt="Hello", max_tokens=2).choices[0].finish_reason


def _copy_adapter(name: str, new: str) -> str:
    dst = os.path.join(adapter_root(), new)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(adapter_root(), name), dst)
    return dst


def _edit_config(path, **changes):
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def test_load_and_unload_adapters_at_runtime(oai):
    _copy_adapter("attn-experts-r8", "copy-r8")
    load = dict(lora_name="runtime/copy-r8", lora_path="copy-r8")
    r = post("/v1/load_lora_adapter", json=load)
    assert r.status_code == 200 and "success" in r.text.lower()
    models = {m.id: m for m in oai.models.list().data}
    assert models["runtime/copy-r8"].parent == BASE
    _, want = _greedy(oai, "The quick brown fox", model="attn-experts-r8")
    _, got = _greedy(oai, "The quick brown fox", model="runtime/copy-r8")
    assert got == want, "the loaded copy computes what the original does"
    assert_error(post("/v1/load_lora_adapter", json=load), 400, "already been loaded")
    assert_error(post("/v1/load_lora_adapter", json=dict(lora_name=BASE, lora_path="copy-r8")), 400, "already")
    assert post("/v1/unload_lora_adapter", json={"lora_name": "runtime/copy-r8"}).status_code == 200
    assert "runtime/copy-r8" not in {m.id for m in oai.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _greedy(oai, "Hello", model="runtime/copy-r8")
    assert_error(post("/v1/unload_lora_adapter", json={"lora_name": "runtime/copy-r8"}), 404)
    assert_error(post("/v1/unload_lora_adapter", json={"lora_name": BASE}), 404)


def test_bad_adapter_files_are_refused_with_4xx(oai):
    before = sorted(m.id for m in oai.models.list().data)
    dora = _copy_adapter("attn-r4-rslora", "bad-dora")
    _edit_config(dora, use_dora=True)
    corrupt = _copy_adapter("attn-r4-rslora", "bad-corrupt")
    with open(os.path.join(corrupt, "adapter_model.safetensors"), "r+b") as f:
        f.truncate(1000)
    garbage = _copy_adapter("attn-r4-rslora", "bad-json")
    with open(os.path.join(garbage, "adapter_config.json"), "w") as f:
        f.write("{oops")
    big = _copy_adapter("attn-r4-rslora", "bad-big")
    with open(os.path.join(big, "adapter_model.safetensors"), "ab") as f:
        f.write(b"\0" * 500_000)
    rank = _copy_adapter("attn-layers02-r16", "bad-rank")
    _edit_config(rank, r=64)
    other_base = os.path.join(adapter_root(), "bad-other-base")  # an adapter for another model: wrong shapes
    shutil.rmtree(other_base, ignore_errors=True)
    shutil.copytree(adapter_dirs("mixtral-fused")[sorted(adapter_dirs("mixtral-fused"))[0]], other_base)
    nan = _copy_adapter("attn-r4-rslora", "bad-nan")
    file = os.path.join(nan, "adapter_model.safetensors")
    st = SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].copy()
    tensors[first].flat[0] = np.nan
    save_file(tensors, file)
    cases = [("bad-dora", 400, "use_dora"), ("bad-corrupt", 400, ""), ("bad-json", 400, "JSON"),
             ("bad-big", 413, "limit"), ("bad-rank", 400, "rank"), ("bad-other-base", 400, "shape"),
             ("bad-nan", 400, "NaN"), ("no-such-dir", 404, "does not exist")]
    for path, status, match in cases:
        assert_error(post("/v1/load_lora_adapter", json=dict(lora_name="x-" + path, lora_path=path)), status, match)
    assert sorted(m.id for m in oai.models.list().data) == before


def test_unload_with_requests_in_flight_is_refused_and_they_finish_intact(oai):
    _copy_adapter("all-linear-r4", "busy")
    assert post("/v1/load_lora_adapter", json=dict(lora_name="busy", lora_path="busy")).status_code == 200
    _, alone = _greedy(oai, "Once upon a time", model="busy", max_tokens=24)
    got = []
    with slow_steps(0.02):
        stream = oai.completions.create(model="busy", prompt="Once upon a time", max_tokens=24, temperature=0,
                                        stream=True, logprobs=0, extra_body={**IDS, "ignore_eos": True})
        for chunk in stream:
            got += token_ids(chunk.choices[0].logprobs.tokens)
            if len(got) == 2:
                assert_error(post("/v1/unload_lora_adapter", json={"lora_name": "busy"}), 409, "in use")
    assert got == alone
    engine_idle()
    assert post("/v1/unload_lora_adapter", json={"lora_name": "busy"}).status_code == 200


def test_client_disconnect_frees_kv_and_adapter_slot():
    """A client that leaves mid-stream, or stops waiting for a whole response, has its request aborted."""
    server = shared_server()
    body = dict(model="attn-experts-r8", prompt="Once upon a time", max_tokens=100, temperature=0,
                ignore_eos=True)
    aborted = metric("infinilora_requests_total", adapter="attn-experts-r8", finish_reason="abort")
    with slow_steps(0.02):
        with httpx.stream("POST", server.base_url + "/v1/completions", json={**body, "stream": True},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first chunk
        engine_idle(timeout=30)
        with pytest.raises(httpx.ReadTimeout):
            post("/v1/completions", json=body, timeout=0.5)
        engine_idle(timeout=30)
    assert metric("infinilora_requests_total", adapter="attn-experts-r8", finish_reason="abort") == aborted + 2
    assert not on_engine(lambda: server.state.llm.engine.requests)


def test_failed_engine_step_fails_its_requests_and_the_server_recovers(oai):
    calls = {"n": 0}

    def flaky(original, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (2, 4):  # the second step of each of the two requests
            raise RuntimeError("injected device failure")
        return original(*args, **kwargs)

    errors = metric("infinilora_engine_step_errors_total")
    with patched_sample(flaky):
        with pytest.raises(openai.InternalServerError, match="engine step failed"):
            oai.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0)
        stream = oai.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0, stream=True)
        with pytest.raises(openai.APIError, match="engine step failed"):
            list(stream)
    engine_idle()
    r = oai.completions.create(model=BASE, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert metric("infinilora_engine_step_errors_total") == errors + 2


def test_metrics_in_prometheus_format(oai):
    oai.completions.create(model="attn-r4-rslora", prompt="Hello", max_tokens=3, temperature=0)
    text = get("/metrics").text
    for name in ("infinilora_num_requests_waiting", "infinilora_num_requests_running",
                 "infinilora_time_to_first_token_seconds_bucket", "infinilora_time_per_output_token_seconds_count",
                 "infinilora_generation_tokens_total", "infinilora_generation_tokens_per_second",
                 "infinilora_adapter_cache_hits_total", "infinilora_adapter_cache_misses_total",
                 "infinilora_adapter_cache_evictions_total", "infinilora_adapter_cache_loads_total",
                 "infinilora_kv_cache_usage_ratio", "infinilora_prompt_tokens_total"):
        assert name in text, name
    assert 'infinilora_requests_total{adapter="attn-r4-rslora",finish_reason="length"}' in text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name for f in text_string_to_metric_families(text)}
    assert "infinilora_time_to_first_token_seconds" in families


def test_api_key_on_every_endpoint_but_health():
    server = shared_server()
    assert httpx.get(server.base_url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
                         ("POST", "/v1/unload_lora_adapter"), ("GET", "/openapi.json"), ("GET", "/docs")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                        {"Authorization": f"Basic {API_KEY}"}):
            r = httpx.request(method, server.base_url + path, headers=headers, json={})
            assert_error(r, 401, "api key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
