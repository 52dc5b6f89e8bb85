"""The engine thread: one background thread owns the LLMEngine; HTTP handlers talk to it through a command queue.

The engine is not thread-safe and its step blocks on the device, so exactly one thread touches it. Handlers (on
the asyncio event loop) post commands (add requests, abort, teacher-forced prompt logprobs, unload an adapter);
the thread runs them between steps and hands each request's outputs back to its handler's asyncio queue with
`loop.call_soon_threadsafe`. A step that raises fails the requests it was running (each handler gets the error),
is logged, and the loop goes on; the thread itself never dies of a request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from infinilora_jax.engine.request import RequestOutput, TokenLogprob
from infinilora_jax.errors import AdapterLoadError, CapacityError
from infinilora_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine step running this request failed (the server keeps serving; the request is aborted)."""


@dataclasses.dataclass
class Job:
    """One engine request to add."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None


class Stream:
    """Outputs of a group of engine requests, delivered into one asyncio queue as (request_id, item) pairs,
    item a RequestOutput or an exception."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, RequestOutput | BaseException]] = asyncio.Queue()

    def put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (request_id, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclasses.dataclass
class _Command:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclasses.dataclass
class _ScoreJob:
    token_ids: list[int]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class EngineWorker:
    def __init__(self, llm, metrics=None, idle_wait_s: float = 0.05):
        self.llm, self.engine = llm, llm.engine
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._streams: dict[str, Stream] = {}
        self._deferred: collections.deque[_ScoreJob] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infinilora-engine", daemon=True)
        self.step_errors = 0
        self.last_error: str | None = None
        self._ids = itertools.count(1)  # next() is atomic: handlers on several event loops may submit at once

    # ---- lifecycle ----

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    # ---- the handlers' side (call from the event loop) ----

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the engine thread; return its result or raise its exception."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(_Command(fn, loop, future))
        return await future

    async def submit(self, jobs: list[Job], arrival_time: float | None = None) -> tuple[list[str], Stream]:
        """Add requests (all or none: a job that cannot run rolls back the others and raises) and return their
        ids and the stream their outputs arrive on."""
        stream = Stream(asyncio.get_running_loop())
        prefix = f"srv{next(self._ids)}"

        def add() -> list[str]:
            ids: list[str] = []
            try:
                for i, job in enumerate(jobs):
                    rid = self.engine.add_request(job.prompt_ids, job.params, job.adapter, request_id=f"{prefix}-{i}",
                                                  arrival_time=arrival_time)
                    ids.append(rid)
                    self._streams[rid] = stream
            except BaseException:
                self._abort(ids)
                raise
            if self.metrics is not None:
                self.metrics.on_added(jobs)
            return ids

        return await self.call(add), stream

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (a client went away); their KV pages and adapter pins are freed. Fire and forget."""
        if request_ids and self.alive:
            self._commands.put(_Command(lambda: self._abort(request_ids), None, None))

    async def prompt_logprobs(self, token_ids: list[int], adapter: str | None) -> list[TokenLogprob]:
        """Teacher-forced logprobs of a prompt (engine.prompt_logprobs), run between steps; waits for room in the
        KV cache and adapter slots when they are busy."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = _ScoreJob(token_ids, adapter, loop, future)
        self._commands.put(_Command(lambda: self._deferred.append(job), None, None))
        return await future

    # ---- the engine thread ----

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception:  # a bug in the loop itself: log it, fail what is in flight, keep serving
                log.exception("engine loop error")
                self._fail_all(EngineStepError("internal error in the engine loop"))
                time.sleep(0.01)
        self._fail_all(EngineStepError("the server is shutting down"))
        for job in self._deferred:
            _resolve(job.loop, job.future, exc=EngineStepError("the server is shutting down"))

    def _iteration(self) -> None:
        busy = self.engine.has_unfinished() or self._deferred
        self._drain_commands(block=not busy)
        self._run_deferred()
        if self.engine.has_unfinished():
            self._step()
            self._run_deferred()

    def _drain_commands(self, block: bool) -> None:
        first = True
        while True:
            try:
                cmd = self._commands.get(timeout=self.idle_wait_s) if (block and first) else self._commands.get_nowait()
            except queue.Empty:
                return
            first = False
            if cmd is None:
                return
            if cmd.future is not None and cmd.future.cancelled():
                continue
            try:
                result = cmd.fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                if cmd.future is not None:
                    _resolve(cmd.loop, cmd.future, exc=e)
                else:
                    log.exception("engine command failed")
            else:
                if cmd.future is not None:
                    _resolve(cmd.loop, cmd.future, result=result)

    def _run_deferred(self) -> None:
        for _ in range(len(self._deferred)):
            job = self._deferred.popleft()
            if job.future.cancelled():
                continue
            try:
                result = self.engine.prompt_logprobs(job.token_ids, job.adapter)
            except CapacityError as e:
                if self.engine.has_unfinished():
                    self._deferred.append(job)  # running requests will free room: retry after the next step
                else:
                    _resolve(job.loop, job.future, exc=e)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                _resolve(job.loop, job.future, exc=e)
            else:
                _resolve(job.loop, job.future, result=result)

    def _step(self) -> None:
        start = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # fail the affected requests, keep the server up
            self.step_errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("engine step failed; aborting its requests")
            failed = self.engine.abort_all()
            error = EngineStepError(f"the engine step failed ({type(e).__name__}); the request was aborted")
            for rid in failed:
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream.put(rid, error)
            self.engine.pop_finished()
            if self.metrics is not None:
                self.metrics.on_step_error()
            return
        if self.metrics is not None:
            self.metrics.on_step(self.engine, outputs, time.monotonic() - start)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is not None:  # a request that failed alone (its adapter could not be read) gets its error
                stream.put(out.request_id, out if out.error is None else AdapterLoadError(out.error))
        self.engine.pop_finished()

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
            req = self.engine.requests.get(rid)
            if req is not None and not req.finished:
                self.engine.abort(rid)
                if self.metrics is not None:
                    self.metrics.on_finished(req)
        self.engine.pop_finished()

    def _fail_all(self, error: Exception) -> None:
        try:
            failed = self.engine.abort_all()
            self.engine.pop_finished()
        except Exception:  # noqa: BLE001
            log.exception("could not abort requests")
            failed = list(self._streams)
        for rid in failed:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(rid, error)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, *, result: Any = None,
             exc: BaseException | None = None) -> None:
    def settle():
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed
        pass
