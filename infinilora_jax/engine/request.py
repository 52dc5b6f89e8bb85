"""A generation request as the engine tracks it, and what the engine reports back per step."""

from __future__ import annotations

import dataclasses
import enum
import time

from infinilora_jax.engine.detokenizer import IncrementalDetokenizer
from infinilora_jax.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None
    seed: int  # the sampler's stream: params.seed, or one the engine drew
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" (see `error`)
    error: str | None = None  # why the request failed (finish_reason "error": its adapter could not be read)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or will be, once the queued steps run)
    num_pending: int = 0  # tokens sampled by steps on the device, not yet appended (async scheduling)
    pages: list[int] = dataclasses.field(default_factory=list)
    adapter_slot: int | None = None  # pool slot while running, or queued for its adapter's background load
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    text: str = ""  # detokenized output so far (when the engine has a tokenizer): stable text only
    detokenizer: IncrementalDetokenizer | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """all_token_ids[start:start + n] without building all_token_ids (the engine asks every step, and a
        decode row's one token is the last output)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start:start + n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens including those still on the device: what the scheduler plans the next step from."""
        return self.num_tokens + self.num_pending

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob under the model's distribution (before temperature, top-k/top-p) and the top ones."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; as many as the request asked for


@dataclasses.dataclass
class RequestOutput:
    """One request's state after a step: tokens (and text) so far, and what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    adapter: str | None
    new_logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for logprobs
    error: str | None = None  # finish_reason "error": why the request failed
