"""Tokens as clients see them: each token's bytes and display string for logprobs, character offsets, and the
text a stream may release so far.

A byte-level BPE token may hold part of a UTF-8 character: its string is then `bytes:\\xe2\\x80` (as OpenAI
shows such tokens) and its `bytes` field the exact bytes, so a client can rebuild the text.
"""

from __future__ import annotations

import codecs
import functools
import re

from tokenizers import decoders

from infinilora_jax.engine.request import TokenLogprob

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder_kind = type(tokenizer.decoder).__name__ if tokenizer.decoder is not None else ""
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one formatter per server, bounded
    def token_bytes(self, token_id: int) -> bytes:
        raw = self.tokenizer.id_to_token(token_id)
        if raw is None:
            return b""
        if token_id in self._special:
            return raw.encode()
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in raw):
                return bytes(table[c] for c in raw)
            return raw.encode()
        m = _BYTE_PIECE.fullmatch(raw)
        if m:  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        if self._decoder_kind in ("Metaspace", "Sequence"):
            return raw.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def token_str(self, token_id: int, as_id: bool = False) -> str:
        if as_id:
            return f"token_id:{token_id}"
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def offsets(self, start: int = 0, skip_special: bool = True) -> OffsetTracker:
        return OffsetTracker(self, start, skip_special)

    # ---- logprobs in the two OpenAI formats ----

    def completion_logprobs(self, entries: list[TokenLogprob | None], token_ids: list[int], offsets: OffsetTracker,
                            as_ids: bool) -> dict:
        """{tokens, token_logprobs, top_logprobs, text_offset} (legacy completions); an entry of None (the first
        prompt token) has null logprobs. `offsets` continues across the calls of one stream."""
        tokens = [self.token_str(t, as_ids) for t in token_ids]
        top: list[dict | None] = []
        for entry, tok in zip(entries, tokens):
            if entry is None:
                top.append(None)
                continue
            d = {self.token_str(i, as_ids): lp for i, lp in entry.top}
            d.setdefault(tok, entry.logprob)  # the chosen token is always listed (as vLLM does)
            top.append(d)
        return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets.next(token_ids)}

    def chat_logprobs(self, entries: list[TokenLogprob], as_ids: bool) -> list[dict]:
        """The `content` list of chat logprobs: token, logprob, bytes and top_logprobs per token."""
        def item(token_id: int, logprob: float) -> dict:
            return {"token": self.token_str(token_id, as_ids), "logprob": logprob,
                    "bytes": list(self.token_bytes(token_id))}

        return [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]


class OffsetTracker:
    """Character offsets of successive tokens in the decoded text (the tokens holding the bytes of one character
    all sit at that character's offset; skipped special tokens take no room)."""

    def __init__(self, formatter: TokenFormatter, start: int = 0, skip_special: bool = True):
        self.formatter, self.at, self.skip_special = formatter, start, skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token_ids: list[int]) -> list[int]:
        out = []
        for t in token_ids:
            out.append(self.at)
            if self.skip_special and t in self.formatter._special:
                continue
            self.at += len(self._decoder.decode(self.formatter.token_bytes(t)))
        return out


def releasable(text: str, sent: int, stops: list[str], finished: bool) -> int:
    """How far into `text` a stream may release: all of it when finished, else up to the earliest suffix that
    could still grow into a stop string (the engine cuts the text there if it does)."""
    if finished or not stops:
        return len(text)
    end = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - sent), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    return max(end, sent)
