"""Continuous batching: each step mixes decode tokens and chunked prefill under one token budget.

Per step, in order:
  1. running requests, oldest first: one token each when decoding, or the next chunk of a prompt still being
     prefilled (at most `max_prefill_rows` chunks per step, which bounds the step's attention shapes). A
     request that needs a KV page when none is free preempts the most recently admitted running request
     (recompute: its pages are freed and it re-enters the queue at the front, to be prefilled again from its
     prompt plus the tokens it has generated).
  2. waiting requests, first come first served (policy "fcfs"; or "sjf", shortest job first: smallest prompt +
     max_tokens first, ties in queue order, so a long request may wait while shorter ones keep arriving),
     while the budget, `max_num_seqs` and free pages allow (keeping a small watermark of pages for running
     requests to grow). A request whose adapter cannot get a device slot (every slot pinned by running
     requests) is passed over for one whose adapter can, within a lookahead window, so one busy adapter does
     not block the queue; a request that does not fit in the free pages blocks the queue (so long prompts are
     not starved).
With async scheduling (engine/engine.py) a step is planned while the one before it is still on the device: each
request counts the tokens that step will append (`Request.num_scheduled_tokens`), one whose pending token is its
last (max_tokens, the context limit) is skipped, and a preempted request is admitted again only once its pending
token has landed. The adapters of the next queued requests are prefetched after each schedule. A request whose
adapter cannot be read when it is admitted (its files changed or vanished since registration: AdapterLoadError)
finishes with finish_reason "error" and is listed in `failed` for the engine to report; the queue goes on.
"""

from __future__ import annotations

import collections
import dataclasses

from infinilora_jax.engine.kv_cache import CacheConfig, PageAllocator
from infinilora_jax.engine.request import Request, Status
from infinilora_jax.errors import AdapterLoadError, ConfigError
from infinilora_jax.lora.adapter_cache import AdapterCache


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32  # running requests at most
    max_num_batched_tokens: int = 256  # tokens per step (decode tokens + prefill chunks)
    max_model_len: int = 2048  # prompt + generated tokens
    max_prefill_rows: int = 8  # rows with several new tokens (prefill chunks) per step
    lookahead: int = 16  # queued requests considered past one whose adapter cannot get a slot
    watermark: float = 0.01  # fraction of pages kept free when admitting (for running requests to grow)
    policy: str = "fcfs"  # order of the waiting queue: "fcfs" | "sjf" (shortest job first)

    def __post_init__(self):
        if (self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2
                or self.max_prefill_rows < 1):
            raise ConfigError(f"invalid scheduler config {self}")
        if self.policy not in POLICIES:
            raise ConfigError(f"scheduler policy={self.policy!r}: choose one of {POLICIES}")


POLICIES = ("fcfs", "sjf")


def job_size(req: Request) -> int:
    """SJF's estimate of a request's work: prompt tokens plus the most tokens it may generate."""
    return len(req.prompt_token_ids) + req.params.max_tokens


@dataclasses.dataclass
class ScheduledWork:
    rows: list[tuple[Request, int]]  # (request, new tokens this step), in batch order
    preempted: list[Request]


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, adapters: AdapterCache):
        self.config, self.cache_config = config, cache
        self.allocator = PageAllocator(cache)
        self.adapters = adapters
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.failed: list[Request] = []  # finished with an error while scheduling, not yet reported (take_failed)
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledWork:
        self.adapters.poll_loads()  # background loads that have landed become readable now
        budget = self.config.max_num_batched_tokens
        work = ScheduledWork([], [])
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            i += 1
            if req.num_pending and self._ends_with_pending(req):
                continue  # the token on the device is its last: it finishes when that lands
            n = min(req.num_scheduled_tokens - req.num_computed_tokens, budget)
            if n > 1 and self._prefill_rows(work) >= self.config.max_prefill_rows:
                continue  # this step's prefill rows are taken: the chunk waits for the next step
            if not self._grow(req, req.num_computed_tokens + n, work):
                break  # req itself was preempted: nothing after it fits either
            work.rows.append((req, n))
            budget -= n
        if self.config.policy == "sjf":  # stable: equal sizes keep their queue order
            self.waiting = collections.deque(sorted(self.waiting, key=job_size))
        if not work.preempted:
            self._admit(budget, work)
        self.adapters.prefetch([r.adapter for r in list(self.waiting)[: self.config.lookahead]])
        return work

    def _ends_with_pending(self, req: Request) -> bool:
        """Its tokens on the device reach max_tokens or the context limit (async scheduling)."""
        return (len(req.output_token_ids) + req.num_pending >= req.params.max_tokens
                or req.num_scheduled_tokens >= self.config.max_model_len)

    @staticmethod
    def _prefill_rows(work: ScheduledWork) -> int:
        return sum(n > 1 for _, n in work.rows)

    def _grow(self, req: Request, num_tokens: int, work: ScheduledWork) -> bool:
        """Give req pages for num_tokens, preempting the newest running requests if needed."""
        need = self.cache_config.pages_for(num_tokens) - len(req.pages)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            work.preempted.append(victim)
            if victim is req:
                return False
        if need > 0:
            req.pages += self.allocator.allocate(need)
        return True

    def _admit(self, budget: int, work: ScheduledWork) -> None:
        watermark = int(self.config.watermark * self.allocator.capacity)
        scanned = 0
        index = 0
        while (index < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs
               and scanned < self.config.lookahead):
            req = self.waiting[index]
            if req.num_pending:  # preempted with a token on the device: admitted once it has landed
                index += 1
                scanned += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n > 1 and self._prefill_rows(work) >= self.config.max_prefill_rows:
                return  # no prefill row left this step (first come, first served: no skipping)
            pages = self.cache_config.pages_for(n)
            if pages > self.allocator.num_free - watermark:
                return  # out of KV pages: the queue waits (no skipping, so long prompts are not starved)
            # a request still waiting for its adapter's background load already holds that slot
            try:
                if req.adapter_slot is not None:
                    self.adapters.raise_if_failed(req.adapter)  # its background load may have failed
                    slot = req.adapter_slot
                else:
                    slot = self.adapters.acquire(req.adapter)
            except AdapterLoadError as e:  # this request fails; the queue goes on
                req.error = str(e)
                self.finish(req, "error")
                self.failed.append(req)
                continue
            if slot is None or not self.adapters.is_ready(slot):
                # every adapter slot is pinned, or the adapter is still being copied in (the request keeps its
                # slot): try a later request
                req.adapter_slot = slot
                index += 1
                scanned += 1
                continue
            del self.waiting[index]
            req.adapter_slot = slot
            req.pages = self.allocator.allocate(pages)
            req.status = Status.RUNNING
            self.running.append(req)
            work.rows.append((req, n))
            budget -= n

    def take_failed(self) -> list[Request]:
        """The requests that failed while being scheduled since the last call."""
        failed, self.failed = self.failed, []
        return failed

    def preempt(self, req: Request) -> None:
        """Recompute preemption: drop the request's KV pages and put it back at the front of the queue."""
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
            self._release(req)  # it may hold a slot whose background load it waited for
        req.status = Status.FINISHED
        req.finish_reason = reason

    def _release(self, req: Request) -> None:
        self.allocator.free(req.pages)
        req.pages = []
        if req.adapter_slot is not None:
            self.adapters.release(req.adapter)
            req.adapter_slot = None
