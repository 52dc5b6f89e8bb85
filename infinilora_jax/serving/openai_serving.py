"""`/v1/completions` and `/v1/chat/completions`: requests in OpenAI's format to engine requests and back, whole or
as server-sent events.

One HTTP request becomes `len(prompts) * n` engine requests (choice index = prompt index * n + j; choice j > 0
gets a seed derived from the request's seed). `echo` with `logprobs` adds the prompt's teacher-forced logprobs
(engine.prompt_logprobs, on the engine thread). Streams release text only when it is stable: the engine holds back
an incomplete UTF-8 character, and the stream holds back a suffix that may still become a stop string. A client
that disconnects has its engine requests aborted (KV pages and adapter pins freed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from infinilora_jax.engine.request import RequestOutput, TokenLogprob
from infinilora_jax.errors import RequestError
from infinilora_jax.sampling import SamplingParams
from infinilora_jax.serving.protocol import (
    MAX_CHOICES,
    MAX_PROMPTS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    api_error,
)
from infinilora_jax.serving.tokens import OffsetTracker, releasable
from infinilora_jax.serving.worker import Job, Stream

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
SEED_STRIDE = 0x9E3779B97F4A7C15  # choice j of a seeded request samples with seed + j * stride (mod 2**64)
ENCODE_IN_THREAD_CHARS = 16384


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    text: str  # as the client sent it, or the decoded ids (only decoded for echo)
    logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs: [None, lp(token 1), ...]


@dataclasses.dataclass
class Choice:
    index: int
    prompt: Prompt
    request_id: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    finished: bool = False
    sent_chars: int = 0  # streaming: text released so far
    sent_tokens: int = 0  # streaming: tokens whose logprobs were sent
    offsets: OffsetTracker | None = None

    def update(self, out: RequestOutput) -> None:
        self.token_ids = out.token_ids
        self.logprobs.extend(out.new_logprobs or ())
        self.text = out.text or ""
        self.finished, self.finish_reason = out.finished, out.finish_reason


@dataclasses.dataclass
class Generation:
    """Everything about one HTTP generation request once validated."""

    kind: str  # "completion" | "chat"
    model: str
    adapter: str | None
    prompts: list[Prompt]
    params: list[SamplingParams]  # one per choice
    choices: list[Choice]
    stops: list[str]
    logprobs: int | None  # top logprobs per token (None: no logprobs)
    echo: bool
    as_ids: bool
    include_usage: bool
    arrival: float
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIServing:
    def __init__(self, server):
        self.server = server  # serving.app.ServerState
        self.worker = server.worker
        self.tokenizer = server.tokenizer
        self.fmt = server.formatter
        self.max_model_len = server.llm.max_model_len

    # ---- entry points ----

    async def completions(self, body: CompletionRequest, request: Request):
        arrival = time.monotonic()
        body.check_supported()
        adapter = self.server.resolve_model(body.model)
        prompts = await self._completion_prompts(body.prompt, body.echo)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 is only allowed with echo=true (prompt logprobs only)",
                           param="max_tokens")
        gen = self._generation("completion", body, adapter, prompts, body.max_tokens, body.logprobs, body.echo,
                               arrival)
        return await self._respond(gen, body.stream, request)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        arrival = time.monotonic()
        body.check_supported()
        adapter = self.server.resolve_model(body.model)
        template = self.server.chat_template
        if template is None:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text() or "", **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        text = template.render(messages, body.add_generation_prompt)
        ids = await self._encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        gen = self._generation("chat", body, adapter, [Prompt(ids, text)], max_tokens, top, False, arrival)
        return await self._respond(gen, body.stream, request)

    # ---- validation ----

    async def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > ENCODE_IN_THREAD_CHARS:
            enc = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        else:
            enc = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids

    async def _completion_prompts(self, prompt, echo: bool) -> list[Prompt]:
        if isinstance(prompt, str):
            batch: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            batch = [prompt]
        else:
            batch = list(prompt)
        if not batch:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if len(batch) > MAX_PROMPTS:
            raise APIError(400, f"{len(batch)} prompts in one request; at most {MAX_PROMPTS}", param="prompt")
        out = []
        for p in batch:
            if isinstance(p, str):
                out.append(Prompt(await self._encode(p), p))
            else:
                ids = [int(t) for t in p]
                vocab = self.server.llm.config.vocab_size
                if any(not 0 <= t < vocab for t in ids):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
                out.append(Prompt(ids, self.tokenizer.decode(ids, skip_special_tokens=False) if echo else ""))
        return out

    def _generation(self, kind, body, adapter, prompts: list[Prompt], max_tokens: int | None,
                    logprobs: int | None, echo: bool, arrival: float) -> Generation:
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} choices is over the limit of {MAX_CHOICES}",
                           param="n")
        limit = self.max_model_len
        for i, p in enumerate(prompts):
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if not p.ids:
                raise APIError(400, f"{where} is empty", param="prompt" if kind == "completion" else "messages")
            room = limit - len(p.ids)
            if room < (1 if max_tokens != 0 else 0):
                raise APIError(400, f"This model's maximum context length is {limit} tokens, and {where} has "
                                    f"{len(p.ids)} tokens, which leaves no room to generate.",
                               param="prompt" if kind == "completion" else "messages", code="context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                    f"{len(p.ids) + max_tokens} tokens ({len(p.ids)} in {where}, {max_tokens} for "
                                    "the completion). Please reduce the prompt or max_tokens.",
                               param="max_tokens", code="context_length_exceeded")
        stops = body.stop_list
        params, choices = [], []
        for i, p in enumerate(prompts):
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j * SEED_STRIDE) % (1 << 64)
                try:
                    params.append(SamplingParams(
                        max_tokens=max_tokens if max_tokens is not None else limit - len(p.ids),
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        top_k=-1 if body.top_k is None else body.top_k, seed=seed,
                        stop_token_ids=tuple(body.stop_token_ids or ()), stop=tuple(stops),
                        ignore_eos=body.ignore_eos, logprobs=logprobs)
                        if max_tokens != 0 else None)
                except RequestError as e:
                    raise APIError(400, str(e)) from e
                choices.append(Choice(i * body.n + j, p))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Generation(kind, body.model or self.server.model_name, adapter, prompts, params, choices, stops,
                          logprobs, echo, body.return_tokens_as_token_ids, include_usage, arrival)

    # ---- running ----

    async def _respond(self, gen: Generation, stream: bool, request: Request):
        want_prompt_logprobs = gen.echo and gen.logprobs is not None
        jobs = [Job(c.prompt.ids, p, gen.adapter) for c, p in zip(gen.choices, gen.params) if p is not None]
        ids, out_stream = (await self.worker.submit(jobs, gen.arrival)) if jobs else ([], None)
        for c, rid in zip(gen.choices, ids):
            c.request_id = rid
        scoring = None
        if want_prompt_logprobs:
            scoring = asyncio.ensure_future(self._prompt_logprobs(gen))
        if stream:
            return _SSEResponse(self._stream(gen, ids, out_stream, scoring), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            if scoring is not None:
                await scoring
            by_id = {c.request_id: c for c in gen.choices}
            async for rid, out in self._outputs(ids, out_stream, request):
                by_id[rid].update(out)
        finally:
            self._cleanup(gen, scoring)
        for c in gen.choices:
            if not c.request_id:  # echo-only choices (max_tokens=0)
                c.finished, c.finish_reason = True, "length"
        return JSONResponse(self._final(gen))

    async def _prompt_logprobs(self, gen: Generation) -> None:
        for p in gen.prompts:
            entries = await self.worker.prompt_logprobs(p.ids, gen.adapter)
            p.logprobs = [None, *entries]

    async def _outputs(self, ids: list[str], stream: Stream | None,
                       request: Request | None = None) -> AsyncIterator[tuple[str, RequestOutput]]:
        """Each engine output of these requests until all finish; aborts the rest if the consumer goes away."""
        left = set(ids)
        checked = time.monotonic()
        try:
            while left:
                if request is not None:  # a plain response: poll for a client that gave up waiting
                    try:
                        rid, item = await asyncio.wait_for(stream.queue.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        rid, item = "", None
                    if time.monotonic() - checked >= DISCONNECT_POLL_S:
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            log.info("client disconnected; aborting %d request(s)", len(left))
                            return
                    if item is None:
                        continue
                else:
                    rid, item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    left.discard(rid)
                yield rid, item
        finally:
            if left:
                self.worker.abort(sorted(left))

    # ---- whole responses ----

    def _final(self, gen: Generation) -> dict:
        choices = []
        for c in gen.choices:
            if gen.kind == "completion":
                text, logprobs = c.text, None
                if gen.echo:
                    text = c.prompt.text + c.text
                if gen.logprobs is not None:
                    logprobs = self._completion_logprobs(gen, c, c.token_ids, c.logprobs, prompt=gen.echo)
                choices.append({"index": c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": None})
            else:
                logprobs = None
                if gen.logprobs is not None:
                    logprobs = {"content": self.fmt.chat_logprobs(c.logprobs, gen.as_ids)}
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": None})
        return {"id": _id(gen), "object": gen.object, "created": gen.created, "model": gen.model,
                "choices": choices, "usage": gen.usage(), "system_fingerprint": None}

    def _completion_logprobs(self, gen: Generation, c: Choice, token_ids, entries, prompt: bool) -> dict:
        """Logprobs of generated tokens (offsets continuing across a stream's chunks), preceded by the prompt's
        when `prompt` (echo)."""
        if c.offsets is None:
            c.offsets = self.fmt.offsets(len(c.prompt.text) if gen.echo else 0)
        out = self.fmt.completion_logprobs(entries, token_ids, c.offsets, gen.as_ids)
        if not prompt:
            return out
        k = gen.logprobs or 0
        head_entries = [None if e is None else dataclasses.replace(e, top=e.top[:k]) for e in c.prompt.logprobs]
        head = self.fmt.completion_logprobs(head_entries, c.prompt.ids, self.fmt.offsets(0, skip_special=False),
                                            gen.as_ids)
        return {key: head[key] + out[key] for key in head}

    # ---- streams ----

    async def _stream(self, gen: Generation, ids: list[str], stream: Stream | None,
                      scoring: asyncio.Future | None) -> AsyncIterator[str]:
        by_id = {c.request_id: c for c in gen.choices}
        try:
            if gen.kind == "chat":
                for c in gen.choices:
                    yield _sse(self._chunk(gen, c, {"role": "assistant", "content": ""}, None, None))
            if gen.echo:
                if scoring is not None:
                    await scoring
                for c in gen.choices:
                    logprobs = None
                    if gen.logprobs is not None:
                        logprobs = self._completion_logprobs(gen, c, [], [], prompt=True)
                    done = not c.request_id
                    yield _sse(self._chunk(gen, c, c.prompt.text, logprobs, "length" if done else None))
            if ids:
                async for rid, out in self._outputs(ids, stream):
                    c = by_id[rid]
                    c.update(out)
                    chunk = self._delta(gen, c)
                    if chunk is not None:
                        yield _sse(chunk)
            if gen.include_usage:
                yield _sse({"id": _id(gen), "object": _chunk_object(gen), "created": gen.created,
                            "model": gen.model, "choices": [], "usage": gen.usage()})
        except Exception as e:  # the stream has started: report the error in it
            error = api_error(e)
            if error.status >= 500:
                log.error("stream failed: %s", error.message)
            yield _sse(error.body())
        finally:
            self._cleanup(gen, scoring)
        yield "data: [DONE]\n\n"

    def _cleanup(self, gen: Generation, scoring: asyncio.Future | None) -> None:
        """However a response ends (done, error, disconnect), no engine request of it keeps running."""
        if scoring is not None and not scoring.done():
            scoring.cancel()
        left = [c.request_id for c in gen.choices if c.request_id and not c.finished]
        if left:
            self.worker.abort(left)

    def _delta(self, gen: Generation, c: Choice) -> dict | None:
        end = releasable(c.text, c.sent_chars, gen.stops, c.finished)
        text = c.text[c.sent_chars:end]
        if not text and not c.finished:
            return None  # nothing stable yet: keep the tokens for the next chunk
        new_ids, new_lps = c.token_ids[c.sent_tokens:], c.logprobs[c.sent_tokens:]
        c.sent_chars, c.sent_tokens = end, len(c.token_ids)
        logprobs = None
        if gen.logprobs is not None:
            if gen.kind == "completion":
                logprobs = self._completion_logprobs(gen, c, new_ids, new_lps, prompt=False)
            else:
                logprobs = {"content": self.fmt.chat_logprobs(new_lps, gen.as_ids)}
        if gen.kind == "chat":
            return self._chunk(gen, c, {"content": text} if text or not c.finished else {}, logprobs,
                               c.finish_reason if c.finished else None)
        return self._chunk(gen, c, text, logprobs, c.finish_reason if c.finished else None)

    def _chunk(self, gen: Generation, c: Choice, delta, logprobs, finish_reason) -> dict:
        if gen.kind == "completion":
            choice = {"index": c.index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                      "stop_reason": None}
        else:
            choice = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {"id": _id(gen), "object": _chunk_object(gen), "created": gen.created, "model": gen.model,
                 "choices": [choice]}
        if gen.include_usage:
            chunk["usage"] = None
        return chunk


class _SSEResponse(StreamingResponse):
    """A streaming response that notices a client going away even while it waits for the next token (it listens
    for the disconnect beside the stream), then closes the body iterator so its `finally` aborts the requests."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            async def run_stream():
                try:
                    await self.stream_response(send)
                except OSError:  # the client is gone
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(run_stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()
        await self.body_iterator.aclose()


def _id(gen: Generation) -> str:
    return ("cmpl-" if gen.kind == "completion" else "chatcmpl-") + gen.id


def _chunk_object(gen: Generation) -> str:
    return "text_completion" if gen.kind == "completion" else "chat.completion.chunk"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False)}\n\n"
