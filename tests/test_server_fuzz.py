"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): schema-conforming and
schema-violating requests to every operation get no 5xx, every error is in OpenAI's format, no request hangs,
and afterwards the engine holds no request, KV page or adapter pin.

Generated generation requests are clamped (n <= 2, <= 4 prompts, <= 6 new tokens) so the run stays bounded on
CPU; the limits themselves are tested in test_server.py."""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from server_support import AUTH, engine_idle, get, shared_server

POS, NEG = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CASES = [  # (path, method, mode, examples); operations without inputs have no schema-violating requests
    ("/v1/completions", "POST", POS, 25), ("/v1/completions", "POST", NEG, 25),
    ("/v1/chat/completions", "POST", POS, 25), ("/v1/chat/completions", "POST", NEG, 25),
    ("/v1/load_lora_adapter", "POST", POS, 15), ("/v1/load_lora_adapter", "POST", NEG, 15),
    ("/v1/unload_lora_adapter", "POST", POS, 15), ("/v1/unload_lora_adapter", "POST", NEG, 15),
    ("/v1/models/{model}", "GET", POS, 15),  # a string path parameter: nothing violates its schema
    ("/v1/models", "GET", POS, 2), ("/health", "GET", POS, 2), ("/metrics", "GET", POS, 2),
]


@pytest.fixture(scope="module")
def schema():
    server = shared_server()
    return schemathesis.openapi.from_dict(server.app.openapi())


def _bounded(case):
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > 6:
                body[key] = 6
        if case.path == "/v1/chat/completions" and body.get("max_tokens") is None:
            body.setdefault("max_completion_tokens", 6)
            if body["max_completion_tokens"] is None:
                body["max_completion_tokens"] = 6
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > 4:
            body["prompt"] = prompt[:4]
        if case.path == "/v1/unload_lora_adapter" and isinstance(body.get("lora_name"), str):
            body["lora_name"] = "fuzz-" + body["lora_name"]  # only adapters the fuzzer itself loaded
    return case


@pytest.mark.parametrize("path,method,mode,examples", CASES, ids=[f"{p}-{m.value}" for p, _, m, _ in CASES])
def test_fuzz_api_from_its_openapi_schema(schema, path, method, mode, examples):
    server = shared_server()
    operation = schema[path][method]
    seen: dict[int, int] = {}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode).map(_bounded))
    def run(case):
        response = case.call(base_url=server.base_url, headers=AUTH, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text, case.body)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["type"], response.text

    run()
    assert seen, "no request was made"
    engine_idle()
    assert get("/health").status_code == 200
