"""LLMEngine: requests in, tokens out, one jitted step per iteration (continuous batching over a paged cache).

    engine.add_request(prompt_ids, SamplingParams(...), adapter="name")
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step: the scheduler picks work (decode tokens and prefill chunks under a token budget), the batch is packed
into bucketed arrays (models/batch.py), the runner queues the jitted forward and a sampler program, and the
sampled tokens are appended; requests stop on EOS, a stop token or string, max_tokens or the context limit.

Async scheduling (on by default where the runner supports it, as vLLM's --async-scheduling): a step queues step
N+1 before it waits for step N's tokens, so the host's work (fetching and appending N's tokens, detokenizing,
scheduling and packing N+2) runs while the device computes N+1. Step N+1 is scheduled as if every row of N that
samples emits its token: the decode row of such a request carries a placeholder that the program replaces with
the token N sampled, still on the device (models/step.py `with_prev_tokens`). A request that stops in N (EOS,
stop token or string, abort) has wasted a row in N+1, whose token is dropped; one that would reach max_tokens or
the context limit with N's token is not scheduled in N+1. Outputs come one step later than they are computed.
The device runs the steps in order, so the pages and adapter slot a finished request frees may be handed out at
once: anything that writes them is queued after the step that still reads them.

One thread steps an engine; another may add and abort requests while that step waits on the device (coupled
replicas step in threads of their own: engine/replicas.py). A lock covers the host phases of a step (schedule,
build, complete) and the request operations; an abort that arrives while `step` queues a step or waits for one
takes effect when that call returns (a token of the request still on the device is then dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from infinilora_jax.engine.detokenizer import IncrementalDetokenizer
from infinilora_jax.engine.kv_cache import CacheConfig
from infinilora_jax.engine.request import Request, RequestOutput, Status, TokenLogprob
from infinilora_jax.engine.runner import ModelRunner, StepTokens
from infinilora_jax.engine.sampler import SamplingArrays
from infinilora_jax.engine.scheduler import ScheduledWork, Scheduler, SchedulerConfig
from infinilora_jax.errors import CapacityError, RequestError
from infinilora_jax.lora.adapter_cache import AdapterBusyError
from infinilora_jax.models.batch import RowSpec, ShapePolicy, StepBatch, build_step_batch, padding_batch
from infinilora_jax.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepPlan:
    """One step's scheduled work, before it is packed into arrays."""

    work: ScheduledWork
    rows: list[RowSpec]
    sampling_reqs: list[Request]  # requests that sample a token this step, in logits order
    want_logprobs: bool
    # (row index, request) of decode rows whose input token the step in flight samples (async scheduling): the
    # row holds a placeholder, replaced on the device
    placeholder_rows: list[tuple[int, Request]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class QueuedStep:
    """A step on the device whose tokens the engine has not read yet."""

    plan: StepPlan
    tokens: StepTokens


STUCK = "queued requests cannot be scheduled (KV cache or adapter slots exhausted)"


def refuse_if_in_use(requests, name: str) -> None:
    """AdapterBusyError when a queued or running request among `requests` uses adapter `name`."""
    users = sum(1 for r in requests if not r.finished and r.adapter == name)
    if users:
        raise AdapterBusyError(f"adapter {name!r} is in use by {users} queued or running request(s)", field="name")


class LLMEngine:
    def __init__(self, runner: ModelRunner, cache: CacheConfig, scheduler: SchedulerConfig, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = (), async_scheduling: bool = True):
        """async_scheduling: queue each step before reading the previous one's tokens (module docstring); only
        where the runner supports it (`supports_async`)."""
        self.runner, self.cache_config, self.config = runner, cache, scheduler
        self.async_scheduling = async_scheduling and runner.supports_async
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.scheduler = Scheduler(scheduler, cache, runner.adapters)
        self.shapes = ShapePolicy(cache.page_size, cache.num_pages, max_rows=scheduler.max_num_seqs,
                                  max_prefill_rows=scheduler.max_prefill_rows,
                                  max_pages=cache.pages_for(scheduler.max_model_len),
                                  max_tokens=scheduler.max_num_batched_tokens)
        self.kv = runner.new_kv_cache(cache)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seeds = random.Random(0)
        self.num_steps = 0
        self.rows_out = self.shapes.max_sampled_rows  # every step's tokens come back padded to this many rows
        self._queued: QueuedStep | None = None  # the step on the device whose tokens are not read yet
        self._lock = threading.RLock()  # host state: requests, scheduler (module docstring)
        self._on_device = False  # a step's batch is on the device: aborts wait for it
        self._aborts_after_step: list[str] = []

    # ---- requests ----

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; raises RequestError / AdapterNotFoundError for what can never run.
        arrival_time (time.monotonic() clock) defaults to now; TTFT is measured from it."""
        prompt = self.check_prompt(prompt_token_ids)
        if adapter is not None:
            self.runner.adapters.require(adapter)
        with self._lock:
            request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
            if request_id in self.requests:
                raise RequestError(f"duplicate request id {request_id!r}")
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
            req = Request(request_id, prompt, params, adapter, seed)
            if self.tokenizer is not None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer)
            if arrival_time is not None:
                req.arrival_time = arrival_time
            self.requests[request_id] = req
            self.scheduler.add(req)
        return request_id

    def check_prompt(self, tokens, room_to_generate: bool = True) -> list[int]:
        tokens = [int(t) for t in tokens]
        vocab, limit = self.runner.cfg.vocab_size, self.config.max_model_len
        if not tokens:
            raise RequestError("empty prompt")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(tokens) + room_to_generate > limit:
            raise RequestError(f"prompt of {len(tokens)} tokens leaves no room to generate within the context "
                               f"limit of {limit} tokens")
        if self.cache_config.pages_for(len(tokens) + 1) > self.scheduler.allocator.capacity:
            raise RequestError(f"prompt of {len(tokens)} tokens does not fit in the KV cache "
                               f"({self.scheduler.allocator.capacity} pages of {self.cache_config.page_size})")
        return tokens

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages; while a step is on the device, once that step completes."""
        with self._lock:
            if self._on_device:
                self._aborts_after_step.append(request_id)
                return
            req = self.requests.get(request_id)
            if req is not None and not req.finished:
                self.scheduler.finish(req, "abort")
                req.finish_time = time.monotonic()

    def abort_all(self) -> list[str]:
        """Abort every unfinished request (after a failed step) and return their ids. A KV cache whose buffers
        were donated to the failed step is allocated afresh, so the engine can serve again."""
        with self._lock:
            self._queued = None  # its tokens are not wanted (and may never come, after a failure)
            ids = [r.request_id for r in self.requests.values() if not r.finished]
            for request_id in ids:
                self.abort(request_id)
        if any(x.is_deleted() for x in jax.tree.leaves(self.kv)):
            log.warning("the KV cache was lost with the failed step: allocating a new one")
            self.kv = self.runner.new_kv_cache(self.cache_config)
        return ids

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter. Refused (AdapterBusyError) while requests are queued or running with it, so no
        request ever runs with a slot that was zeroed or reused under it."""
        refuse_if_in_use(self.requests.values(), name)
        self.runner.adapters.unregister(name)

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_work() or bool(self._aborts_after_step) or self._queued_is_wanted()

    def _queued_is_wanted(self) -> bool:
        """A step is queued whose tokens some unfinished request waits for (once every request it samples for has
        finished or was aborted, nothing reads it: the device still runs it, in order, but no one waits)."""
        return self._queued is not None and any(not r.finished for r in self._queued.plan.sampling_reqs)

    def pop_finished(self) -> list[Request]:
        with self._lock:
            done = [r for r in self.requests.values() if r.finished]
            for r in done:
                del self.requests[r.request_id]
        return done

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Queue the next step (if there is work), then complete the one before it (async scheduling) or this one,
        and return the completed step's outputs."""
        with self._lock:
            plan = self.schedule_step()
            outputs = self.failed_outputs()
            queued = self._queued if self._queued_is_wanted() else None
            if plan is None and queued is None:
                self._queued = None
                self._abort_deferred()
                return outputs
            if plan is not None:
                batch, sampling = self.build_step(plan)
                token_src = self.token_sources(plan, batch, queued)
            self._on_device = True
        try:
            if plan is not None:
                tokens, self.kv = self.runner.sample(batch, self.kv, sampling, self.rows_out,
                                                     prev=None if queued is None else queued.tokens,
                                                     token_src=token_src)
                with self._lock:
                    self.mark_dispatched(plan)
            self._queued = None if plan is None else QueuedStep(plan, tokens)
            if queued is not None:
                outputs += self._complete(queued)
            if not self.async_scheduling and self._queued is not None:
                queued, self._queued = self._queued, None
                outputs += self._complete(queued)
            return outputs
        finally:
            with self._lock:
                self._on_device = False
                self._abort_deferred()

    def _complete(self, queued: QueuedStep) -> list[RequestOutput]:
        tokens, top = self.runner.fetch(queued.tokens)  # waits for that step
        with self._lock:
            return self.complete_step(queued.plan, tokens, top)

    def token_sources(self, plan: StepPlan, batch: StepBatch, queued: QueuedStep | None) -> np.ndarray | None:
        """Per flat token of the batch, the row of the queued step's tokens that is its input (-1: the batch's
        own token); None when no row takes one."""
        if not plan.placeholder_rows:
            return None
        row_of = {id(req): i for i, req in enumerate(queued.plan.sampling_reqs)}
        starts = np.cumsum([0] + [len(r.tokens) for r in plan.rows])
        src = np.full(batch.num_tokens, -1, np.int32)
        for b, req in plan.placeholder_rows:
            src[starts[b]] = row_of[id(req)]
        return src

    def mark_dispatched(self, plan: StepPlan) -> None:
        """The plan's step is on the device: its rows' tokens count as computed (their KV is written by the time
        a later step reads it) and each sampling row's token as pending until `complete_step` lands it."""
        self.num_steps += 1
        for req, n in plan.work.rows:
            req.num_computed_tokens += n
        for req in plan.sampling_reqs:
            req.num_pending += 1

    def failed_outputs(self) -> list[RequestOutput]:
        """Final outputs (finish_reason "error", `error` set) of the requests that failed while being scheduled."""
        now = time.monotonic()
        outputs = []
        for req in self.scheduler.take_failed():
            req.finish_time = now
            outputs.append(self._output(req, []))
        return outputs

    def _abort_deferred(self) -> None:
        ids, self._aborts_after_step = self._aborts_after_step, []
        for request_id in ids:
            self.abort(request_id)

    def schedule_step(self, wait_for_loads: bool = True) -> StepPlan | None:
        """Pick this step's work (None: nothing to run now). When only requests waiting for background adapter
        loads remain, wait for the oldest load first (unless `wait_for_loads` is off: then the caller waits, or
        raises if nothing can ever run)."""
        work = self.scheduler.schedule()
        while not work.rows and self.scheduler.waiting and not self.scheduler.running:
            if not wait_for_loads:  # e.g. base instances sharing adapter slots: another one may hold them
                return None
            if not self.runner.adapters.loading:
                raise RuntimeError(STUCK)
            self.runner.adapters.wait_for_load()
            work = self.scheduler.schedule()
        if not work.rows:
            return None
        rows, sampling_reqs, placeholders = [], [], []
        for req, n in work.rows:
            start = req.num_computed_tokens
            samples = start + n == req.num_scheduled_tokens
            if start + n > req.num_tokens:  # its input is the token the queued step samples (a decode row)
                assert n == 1 and start == req.num_tokens and req.num_pending == 1, (req, n)
                tokens = [0]
                placeholders.append((len(rows), req))
            else:
                tokens = req.token_slice(start, n)
            rows.append(RowSpec(tokens, start, req.adapter_slot, req.pages, "last" if samples else "none"))
            if samples:
                sampling_reqs.append(req)
        return StepPlan(work, rows, sampling_reqs, any(r.params.logprobs is not None for r in sampling_reqs),
                        placeholders)

    def build_step(self, plan: StepPlan, **shape) -> tuple[StepBatch, SamplingArrays]:
        """The step's arrays; `shape` (n_pad, p_pad, prefill) may force larger buckets (build_step_batch)."""
        batch, _ = build_step_batch(plan.rows, self.cache_config.page_size, self.cache_config.num_pages,
                                    self.shapes, **shape)
        reqs = plan.sampling_reqs
        sampling = SamplingArrays.build([r.params for r in reqs], [r.seed for r in reqs],
                                        [len(r.output_token_ids) + r.num_pending for r in reqs],
                                        len(batch.logits_indices))
        return batch, sampling

    def complete_step(self, plan: StepPlan, tokens: np.ndarray, top) -> list[RequestOutput]:
        """Append the sampled tokens (of a step `mark_dispatched` counted), stop what is finished, and return the
        step's outputs. A request that finished while the step was queued (async scheduling) drops its token."""
        now = time.monotonic()
        outputs = []
        for i, (req, token) in enumerate(zip(plan.sampling_reqs, tokens[: len(plan.sampling_reqs)])):
            req.num_pending -= 1
            if req.finished:
                continue
            req.output_token_ids.append(int(token))
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._stop_reason(req)
            if reason is not None:
                self.scheduler.finish(req, reason)
                req.finish_time = now
            logprobs = None
            if req.params.logprobs is not None:
                k = req.params.logprobs
                logprobs = [TokenLogprob(int(token), float(top[0][i]),
                                         list(zip(top[1][i, :k].tolist(), top[2][i, :k].tolist())))]
            outputs.append(self._output(req, [int(token)], logprobs))
        return outputs

    def _stop_reason(self, req: Request) -> str | None:
        p, last = req.params, req.output_token_ids[-1]
        if req.detokenizer is not None:
            before = len(req.text)
            req.text += req.detokenizer.push(last)
            if p.stop and len(req.text) > before:  # search only where a stop string could newly end
                longest = max(len(s) for s in p.stop)
                start = max(0, before - longest + 1)
                cut = min((i for i in (req.text.find(s, start) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    req.text = req.text[:cut]
                    return "stop"
        reason = None
        if last in p.stop_token_ids or (not p.ignore_eos and last in self.eos):
            reason = "stop"
        elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            reason = "length"
        if reason is not None and req.detokenizer is not None:
            req.text += req.detokenizer.flush()  # the output is over: release held-back bytes
        return reason

    def _output(self, req: Request, new: list[int], logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        return RequestOutput(req.request_id, req.prompt_token_ids, list(req.output_token_ids), new,
                             req.text if self.tokenizer is not None else None, req.finished, req.finish_reason,
                             req.adapter, logprobs, req.error)

    # ---- compilation ----

    def program_shapes(self, scoring: bool = False) -> list[tuple[int, int, bool]]:
        """Every (tokens, pages, has_prefill) shape a step can take: decode-only steps have at most max_num_seqs
        tokens; scoring batches (teacher forcing, one row) have a prefill block unless they are one token long."""
        p, cfg = self.shapes, self.config
        decode_top = p.min_tokens if scoring else p.tokens(min(cfg.max_num_seqs, cfg.max_num_batched_tokens))
        out = []
        for n in p.token_buckets():
            for pages in p.page_buckets():
                if n <= decode_top:
                    out.append((n, pages, False))
                out.append((n, pages, True))
        return out

    def warmup(self, scoring: bool = False, progress: bool = True, workers: int = 8,
               run_programs: bool | None = None) -> int:
        """Compile ahead of time every program a step can use (see program_shapes; sampling steps with and
        without a carried adapter load, and teacher-forced scoring when asked), `workers` compilations at once,
        so traffic never waits for a compilation. Returns the number of shapes. Call it while no step runs (at
        start-up): it also compiles the adapter pool's slot writer by writing zeros into slot 0.

        run_programs (default: on GPU) then runs one generation step of every shape on its padding batch, which
        reads and writes nothing: a program's first execution does one-time setup (on an H200 at Qwen3 widths
        the first request of each prompt length took 15-25 ms against 8-10 ms warm; with the runs, 7.5-10 ms:
        benchmarks/startup.py, docs/benchmarks.md), which no request should wait for. Only the generation
        forwards run; the carried-load and scoring variants keep their first-execution cost."""
        shapes = [padding_batch(self.shapes, n, p, prefill) for n, p, prefill in self.program_shapes()]
        score = [padding_batch(self.shapes, n, p, prefill, all_logits=True)
                 for n, p, prefill in (self.program_shapes(scoring=True) if scoring else [])]
        programs = (2 if self.runner.steps.has_pool else 1) * len(shapes) + 2 * len(score)
        programs += self.runner.sampler_programs_per_bucket * len({len(b.logits_indices) for b in shapes})
        with tqdm(total=programs, desc="compiling", disable=not progress, leave=False) as bar:
            self.runner.precompile(shapes, score, workers, on_done=bar.update, rows_out=self.rows_out)
        if run_programs if run_programs is not None else self._first_runs_cost():
            self._run_padding_steps(shapes, progress)
        return len(shapes) + len(score)

    def _first_runs_cost(self) -> bool:
        return self.runner.mesh.devices.flat[0].platform == "gpu"  # where it was measured

    def _run_padding_steps(self, batches: list[StepBatch], progress: bool) -> None:
        """One generation step per batch (padding batches: nothing read or written, KV and pool unchanged),
        queued back to back; waits for the last."""
        step = None
        for batch in tqdm(batches, desc="first runs", disable=not progress, leave=False):
            sampling = SamplingArrays.build([], [], [], len(batch.logits_indices))
            step, self.kv = self.runner.sample(batch, self.kv, sampling, self.rows_out)
        if step is not None:
            self.runner.fetch(step)

    # ---- teacher forcing ----

    def score(self, token_ids: list[int], adapter: str | None = None) -> np.ndarray:
        """float32 logits [T, vocab] of a token sequence (row t predicts token t + 1), computed in prefill chunks
        of the step token budget through the same paged cache, beside any running requests."""
        def chunk(batch, row, start):
            logits, self.kv = self.runner.score(batch, self.kv)
            return logits[: len(row.tokens)]

        return np.concatenate(self._teacher_forced(token_ids, adapter, chunk))

    def prompt_logprobs(self, token_ids: list[int], adapter: str | None = None) -> list[TokenLogprob]:
        """Teacher-forced logprobs of tokens 1..T-1 of a sequence (the first has none), each with the top
        MAX_LOGPROBS tokens at its position; reduced on the device (the [T, vocab] logits never leave it).
        Raises CapacityError when the KV cache or adapter slots have no room now (retry after a step)."""
        tokens = [int(t) for t in token_ids]

        def chunk(batch, row, start):
            targets = np.zeros(batch.logits_indices.shape, np.int32)
            n = len(row.tokens)
            targets[:n] = tokens[start + 1: start + n + 1] + [0] * (start + n + 1 > len(tokens))
            (chosen, top_ids, top_lp), self.kv = self.runner.prompt_logprobs(batch, self.kv, targets)
            return chosen[:n], top_ids[:n], top_lp[:n]

        parts = self._teacher_forced(tokens, adapter, chunk)
        chosen, top_ids, top_lp = (np.concatenate(x) for x in zip(*parts))
        return [TokenLogprob(tokens[t + 1], float(chosen[t]), list(zip(top_ids[t].tolist(), top_lp[t].tolist())))
                for t in range(len(tokens) - 1)]

    def _teacher_forced(self, token_ids, adapter, run_chunk) -> list:
        tokens = self.check_prompt(token_ids, room_to_generate=False)
        cache, allocator = self.cache_config, self.scheduler.allocator
        need = cache.pages_for(len(tokens))
        if need > allocator.num_free:
            raise CapacityError(f"no room in the KV cache to score {len(tokens)} tokens now")
        slot = self.runner.adapters.acquire(adapter)
        if slot is None:
            raise CapacityError(f"no adapter slot free for {adapter!r} now: every slot is in use")
        pages = allocator.allocate(need)
        try:
            out, chunk = [], self.config.max_num_batched_tokens
            for start in range(0, len(tokens), chunk):
                row = RowSpec(tokens[start:start + chunk], start, slot, pages, "all")
                batch, _ = build_step_batch([row], cache.page_size, cache.num_pages, self.shapes)
                out.append(run_chunk(batch, row, start))
            return out
        finally:
            allocator.free(pages)
            self.runner.adapters.release(adapter)


__all__ = ["LLMEngine", "QueuedStep", "Status", "StepPlan"]
