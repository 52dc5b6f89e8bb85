"""Incremental detokenization: each generated token costs two decodes of a short window, not a decode of the
whole output, and text is released only once it is stable.

Byte-level BPE tokens can hold part of a UTF-8 character (decoded alone they give U+FFFD), and some decoders
change a token's text depending on what precedes it (SentencePiece drops the leading space of the first token).
So the detokenizer keeps a window of recent tokens: `_prefix` marks where the window starts and `_read` where
the already released text ends. Each new token, it decodes window[_prefix:_read] and window[_prefix:] and
releases the difference, unless that difference ends in U+FFFD (an incomplete character: wait for more bytes).
When text is released, the window slides forward. `flush` releases whatever is held at the end (replacement
characters included), so after it `text` equals `tokenizer.decode(token_ids)`.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # stable text released so far
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens whose text is in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly stable text (possibly empty)."""
        self.token_ids.append(int(token_id))
        before = self._decode(self.token_ids[self._prefix:self._read])
        after = self._decode(self.token_ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.token_ids)
        self.text += new
        return new

    def flush(self) -> str:
        """Release everything held back (the output is over); return it."""
        if self._read == len(self.token_ids):
            return ""
        before = self._decode(self.token_ids[self._prefix:self._read])
        after = self._decode(self.token_ids[self._prefix:])
        new = after[len(before):]
        self._prefix = self._read = len(self.token_ids)
        self.text += new
        return new
