"""One real server for every server test module of a session: the bundled tiny model (float32, so greedy tokens
compare exactly) behind uvicorn on a loopback port, with an API key and runtime adapter loading from a
temporary adapter root holding copies of the bundled adapters. Loading and compiling dominate test time, so
every module shares it (and the extra apps of the security tests share its engine thread)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time

import httpx
import numpy as np

API_KEY = "test-key-0123456789"
MAX_MODEL_LEN = 128
MAX_ADAPTER_BYTES = 400_000
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@functools.cache
def adapter_root() -> str:
    from infinilora_jax.llm import bundled_adapters

    root = tempfile.mkdtemp(prefix="infinilora-adapter-root-")
    for name, path in bundled_adapters().items():
        shutil.copytree(path, os.path.join(root, name))
    return root


@functools.cache
def shared_server():
    from infinilora_jax.serving import BackgroundServer, ServerConfig, ServerState, build_llm

    llm = build_llm(dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=16, max_num_batched_tokens=128,
                    max_adapter_bytes=MAX_ADAPTER_BYTES, progress=False)
    state = ServerState(llm, ServerConfig(model_name="tiny-qwen3-moe", api_key=API_KEY, enable_lora_loading=True,
                                          adapter_roots=(adapter_root(),)))
    return BackgroundServer(state).start()


def sibling_server(**config_changes):
    """Another HTTP front end (other security settings) on the shared server's engine thread and metrics."""
    import dataclasses

    from infinilora_jax.serving import BackgroundServer, ServerState

    base = shared_server().state
    state = ServerState(base.llm, dataclasses.replace(base.config, **config_changes), worker=base.worker,
                        metrics=base.metrics)
    return BackgroundServer(state).start()


def client(server=None, **kwargs):
    import openai

    server = server or shared_server()
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)


def post(path: str, server=None, headers=None, timeout: float = 120, **kwargs) -> httpx.Response:
    server = server or shared_server()
    return httpx.post(server.base_url + path, headers={**AUTH, **(headers or {})}, timeout=timeout, **kwargs)


def get(path: str, server=None, headers=None, timeout: float = 120, **kwargs) -> httpx.Response:
    server = server or shared_server()
    return httpx.get(server.base_url + path, headers={**AUTH, **(headers or {})}, timeout=timeout, **kwargs)


def assert_error(response: httpx.Response, status: int, match: str = "") -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert match.lower() in body["error"]["message"].lower(), body
    return body["error"]


def on_engine(fn):
    """Run fn() on the shared server's engine thread (the engine is not thread-safe) and return its result."""
    import asyncio

    return asyncio.run(shared_server().state.worker.call(fn))


def engine_idle(timeout: float = 30.0) -> None:
    """Wait until the engine has no request, every KV page is free and no adapter is pinned."""
    llm = shared_server().state.llm

    def idle():
        alloc = llm.engine.scheduler.allocator
        return (not llm.engine.has_unfinished() and alloc.num_free == alloc.capacity
                and sum(llm.runner.adapters.refcount.values()) == 0)

    deadline = time.monotonic() + timeout
    while not on_engine(idle):
        assert time.monotonic() < deadline, "the engine still holds requests, pages or adapter pins"
        time.sleep(0.05)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    """Token ids from logprob tokens returned with return_tokens_as_token_ids."""
    assert all(t.startswith("token_id:") for t in logprobs_tokens), logprobs_tokens
    return [int(t.split(":", 1)[1]) for t in logprobs_tokens]


@contextlib.contextmanager
def patched_sample(wrapper):
    """Replace the runner's sample step by wrapper(original, *args, **kwargs) for the duration."""
    runner = shared_server().state.llm.runner
    original = runner.sample
    runner.sample = lambda *args, **kwargs: wrapper(original, *args, **kwargs)
    try:
        yield
    finally:
        del runner.sample


def slow_steps(seconds: float):
    """Every engine step takes at least `seconds` (so a test can act while a request is surely in flight)."""
    def slow(original, *args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    return patched_sample(slow)


def metric(name: str, **labels) -> float:
    """A sample's value from /metrics (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
