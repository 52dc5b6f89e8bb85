"""Sampling parameters, with vLLM's names and defaults (the sampler itself runs on the device: engine/sampler.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from infinilora_jax.errors import RequestError

MAX_LOGPROBS = 20  # top logprobs per token at most (OpenAI's limit); the device always computes this many


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); not included in the output text
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the top k (0 <= k <= 20)

    def __post_init__(self):
        def bad(msg):
            raise RequestError(f"invalid sampling parameters: {msg}")

        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.stop, (str, list)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature={self.temperature!r} must be >= 0")
        if not (0 < self.top_p <= 1):
            bad(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k={self.top_k!r} must be -1 (off) or a positive integer")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids={self.stop_token_ids!r} must be non-negative integers")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad(f"stop={self.stop!r} must be non-empty strings")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or
                                          not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs={self.logprobs!r} must be an integer in [0, {MAX_LOGPROBS}]")
