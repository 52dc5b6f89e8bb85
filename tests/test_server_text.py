"""Text as streams release it, without a server: incremental detokenization equals a full decode and never
releases half a character, stream hold-back never leaks the start of a stop string, token bytes rebuild the
text, and the `serve` binary starts with the README's command."""

import os
import random
import socket
import subprocess
import sys
import time

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from infinilora_jax.engine.detokenizer import IncrementalDetokenizer
from infinilora_jax.llm import BUNDLED_MODEL, _load_tokenizer
from infinilora_jax.serve import normalize_argv, parse_adapters
from infinilora_jax.serving.chat import ChatTemplate
from infinilora_jax.serving.tokens import TokenFormatter, releasable

TOKENIZER = _load_tokenizer(BUNDLED_MODEL)
VOCAB = TOKENIZER.get_vocab_size()
TEXTS = ["héllo wörld ✓ 日本語 🙂 naïve café", "plain ascii text, with punctuation!", "ÿ€😀 mixed ☃ bytes"]


def _sequences():
    rng = random.Random(0)
    seqs = [TOKENIZER.encode(t).ids for t in TEXTS]
    seqs += [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(200)]
    return seqs


def test_incremental_detokenizer_equals_full_decode_and_holds_partial_characters():
    for ids in _sequences():
        detok = IncrementalDetokenizer(TOKENIZER)
        released = ""
        for i, t in enumerate(ids):
            new = detok.push(t)
            released += new
            assert not new.endswith("\ufffd") or i == len(ids) - 1 or new == ""
            full = TOKENIZER.decode(ids[: i + 1], skip_special_tokens=True)
            assert full.startswith(released), (ids, i)
        released += detok.flush()
        assert released == detok.text == TOKENIZER.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_released_whole():
    ids = TOKENIZER.encode("日本語🙂").ids
    assert len(ids) > 4  # byte-level pieces: several tokens per character
    detok = IncrementalDetokenizer(TOKENIZER)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == "日本語🙂" and all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces), "some tokens held a partial character"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet="abc ", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
       st.integers(1, 5))
def test_stream_holdback_never_leaks_a_stop_string(text, stops, step):
    """Releasing growing prefixes of `text` in steps, as the engine would (cut at the first stop string), the
    stream's concatenation equals the final text and never contains a stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    final = text[:cut]
    sent, out = 0, ""
    for end in range(step, len(text) + step, step):
        visible = text[:end]
        stopped = any(s in visible for s in stops)
        current = final if stopped else visible
        done = stopped or end >= len(text)
        upto = releasable(current, sent, stops, done)
        out += current[sent:upto]
        sent = upto
        assert not any(s in out for s in stops)
        if done:
            break
    assert out == final


def test_token_bytes_and_strings_rebuild_the_text():
    fmt = TokenFormatter(TOKENIZER)
    for text in TEXTS:
        ids = TOKENIZER.encode(text).ids
        assert b"".join(fmt.token_bytes(t) for t in ids).decode() == text
        strings = [fmt.token_str(t) for t in ids]
        if not text.isascii():  # a partial character is shown as its bytes
            assert any(s.startswith("bytes:\\x") for s in strings)
        offsets = fmt.offsets().next(ids)
        assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    assert fmt.token_str(2) == "<|im_end|>" and fmt.token_str(7, as_id=True) == "token_id:7"


def test_chat_template_is_sandboxed():
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    try:
        evil.render([{"role": "user", "content": "x"}])
        raise AssertionError("the sandbox let a template reach Python internals")
    except Exception as e:  # APIError 400
        assert getattr(e, "status", None) == 400
    template = ChatTemplate.from_model_dir(BUNDLED_MODEL)
    out = template.render([{"role": "user", "content": "{{ 7 * 7 }}"}])
    assert "{{ 7 * 7 }}" in out and "49" not in out  # client text is data, never template code


def test_flag_spellings_and_adapter_specs():
    assert normalize_argv(["prog", "--max-model-len=64", "--adapter-root", "/x", "-v", "--api_key=a-b"]) == [
        "prog", "--max_model_len=64", "--adapter_root", "/x", "-v", "--api_key=a-b"]
    assert parse_adapters("a=/p/a,b=/p/b") == {"a": "/p/a", "b": "/p/b"}
    assert parse_adapters(None) is None


def test_serve_binary_starts_the_bundled_model(tmp_path):
    """`python -m infinilora_jax.serve` with no --model serves the bundled model and its adapters, with the
    persistent compilation cache in $INFINILORA_COMPILATION_CACHE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "INFINILORA_COMPILATION_CACHE": str(cache)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "infinilora_jax.serve", f"--port={port}", "--max-model-len=64",
                             "--log_level=warning"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert models[0]["id"] == "tiny-qwen3-moe" and len(models) >= 4
        assert all(m["parent"] == "tiny-qwen3-moe" for m in models[1:])
        assert cache.is_dir()
    finally:
        proc.terminate()
        proc.wait(30)
