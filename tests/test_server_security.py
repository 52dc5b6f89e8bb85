"""Security of the server: adapter loads read only inside the operator's roots (every escape tried: `..`,
absolute paths, symlinked directories and files, NUL bytes, FIFOs), loading is off unless enabled, adapter names
are validated, request bodies are capped, and the API key guards everything but /health."""

import os
import shutil
import tempfile

import httpx
import pytest
from server_support import AUTH, adapter_root, assert_error, get, post, shared_server, sibling_server

from infinilora_jax.llm import bundled_adapters
from infinilora_jax.serving.protocol import APIError
from infinilora_jax.serving.security import resolve_adapter_dir

GOOD = "attn-r4-rslora"


@pytest.fixture(scope="module")
def outside():
    """A valid adapter outside every root, and a root with every kind of escape planted in it."""
    out = tempfile.mkdtemp(prefix="infinilora-outside-")
    shutil.copytree(bundled_adapters()[GOOD], os.path.join(out, "secret-adapter"))
    root = adapter_root()
    links = os.path.join(root, "escapes")
    shutil.rmtree(links, ignore_errors=True)
    os.makedirs(links)
    os.symlink(os.path.join(out, "secret-adapter"), os.path.join(links, "dir-link"))  # a symlinked directory
    half = os.path.join(links, "file-link")  # a real directory whose weights file links outside
    os.makedirs(half)
    shutil.copy(os.path.join(root, GOOD, "adapter_config.json"), half)
    os.symlink(os.path.join(out, "secret-adapter", "adapter_model.safetensors"),
               os.path.join(half, "adapter_model.safetensors"))
    fifo = os.path.join(links, "fifo")  # reading a FIFO would block forever
    os.makedirs(fifo)
    os.mkfifo(os.path.join(fifo, "adapter_config.json"))
    shutil.copy(os.path.join(root, GOOD, "adapter_model.safetensors"), fifo)
    os.symlink(os.path.join(root, GOOD), os.path.join(links, "inside-link"))  # stays inside: allowed
    return out


def _load(name: str, path: str, server=None) -> httpx.Response:
    return post("/v1/load_lora_adapter", server=server, json={"lora_name": name, "lora_path": path}, timeout=30)


@pytest.mark.parametrize("path,status,match", [
    ("../outside", 403, ".."),
    (f"{GOOD}/../../../etc", 403, ".."),
    ("..\\..\\etc", 403, ".."),
    ("/etc", 403, "outside"),
    ("/", 403, "outside"),
    ("escapes/dir-link", 403, "outside"),
    ("escapes/file-link", 403, "links outside"),
    ("escapes/fifo", 400, "regular file"),
    ("escapes\x00/x", 400, "NUL"),
    ("~", 404, "does not exist"),
    ("%2e%2e/%2e%2e", 404, "does not exist"),
    (".", 400, "not a PEFT adapter"),
    ("escapes", 400, "not a PEFT adapter"),
])
def test_adapter_path_escapes_are_refused(outside, path, status, match):
    before = get("/v1/models").json()
    assert_error(_load("escape-attempt", path), status, match)
    assert get("/v1/models").json()["data"] == before["data"]


def test_absolute_paths_outside_the_root_are_refused_inside_allowed(outside):
    assert_error(_load("escape-abs", os.path.join(outside, "secret-adapter")), 403, "outside")
    assert_error(_load("escape-abs", os.path.realpath(os.path.join(outside, "secret-adapter"))), 403, "outside")
    inside = os.path.join(adapter_root(), GOOD)
    assert _load("sec-abs-inside", inside).status_code == 200
    assert _load("sec-link-inside", "escapes/inside-link").status_code == 200
    for name in ("sec-abs-inside", "sec-link-inside"):
        assert post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_resolve_adapter_dir_directly(outside, tmp_path):
    root = adapter_root()
    assert resolve_adapter_dir(GOOD, [root], None) == os.path.realpath(os.path.join(root, GOOD))
    with pytest.raises(APIError) as info:
        resolve_adapter_dir(GOOD, [], None)
    assert info.value.status == 403
    # a root that is itself reached through a symlink still works, and a sibling sharing its prefix does not
    link_root = tmp_path / "root-link"
    os.symlink(root, link_root)
    assert resolve_adapter_dir(GOOD, [str(link_root)], None) == os.path.realpath(os.path.join(root, GOOD))
    sibling = root.rstrip("/") + "-sibling"
    os.makedirs(sibling, exist_ok=True)
    shutil.copytree(os.path.join(root, GOOD), os.path.join(sibling, GOOD), dirs_exist_ok=True)
    with pytest.raises(APIError) as info:
        resolve_adapter_dir(os.path.join(sibling, GOOD), [root], None)
    assert info.value.status == 403
    with pytest.raises(APIError) as info:
        resolve_adapter_dir(GOOD, [root], 1000)
    assert info.value.status == 413


@pytest.mark.parametrize("name", ["../evil", "a b", "-leading", "x" * 129, "name\n", "ü", "a" + "\x00"])
def test_adapter_names_are_validated(name):
    error = assert_error(_load(name, GOOD), 400)
    assert error["param"] in ("lora_name", None)


def test_loading_is_off_unless_enabled():
    server = sibling_server(enable_lora_loading=False)
    try:
        assert_error(_load("off", GOOD, server=server), 403, "disabled")
        assert_error(post("/v1/unload_lora_adapter", server=server, json={"lora_name": GOOD}), 403, "disabled")
        assert GOOD in {m["id"] for m in get("/v1/models", server=server).json()["data"]}
    finally:
        server.stop()


def test_request_body_limit():
    server = sibling_server(max_request_bytes=4096)
    try:
        ok = post("/v1/completions", server=server, json={"prompt": "Hello", "max_tokens": 1})
        assert ok.status_code == 200
        assert_error(post("/v1/completions", server=server, json={"prompt": "x" * 5000, "max_tokens": 1}), 413,
                     "limit")

        def chunks():  # no Content-Length: the limit counts what arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'", "max_tokens": 1}'

        r = httpx.post(server.base_url + "/v1/completions", content=chunks(),
                       headers={**AUTH, "content-type": "application/json"}, timeout=30)
        assert_error(r, 413, "limit")
        assert get("/health", server=server).status_code == 200
    finally:
        server.stop()


def test_no_api_key_configured_means_open_access():
    server = sibling_server(api_key=None)
    try:
        assert httpx.get(server.base_url + "/v1/models").status_code == 200
    finally:
        server.stop()
    assert httpx.get(shared_server().base_url + "/v1/models").status_code == 401
