"""A discrete-event simulator of multi-LoRA serving past one machine: replicas, adapter caches, cold loads.

Each base-model replica runs the engine's continuous batching (engine/scheduler.py, re-enacted on request
lengths only): per step, running requests first (one decode token each, or their next prefill chunk; at most
`max_prefill_rows` chunks), then waiting requests FCFS or SJF (prompt + max_tokens) while the token budget,
`max_num_seqs` and the KV cache allow; a request whose adapter cannot get a cache slot (every slot pinned by
running requests) is passed over within a lookahead of 16, one that does not fit in the KV cache blocks the
queue. A step's duration comes from a calibrated step-time model (bench/calibration.py) of its tokens and
distinct adapters, plus the cold loads it waits for.

Modes:
  coupled        every replica holds its own LRU adapter cache of `cache_slots` (S-LoRA style); a miss stalls
                 the replica's step by `load_ms` (times 1 - `load_overlap`); LoRA math adds to the step.
  disaggregated  replicas hold no adapters; one LoRA server holds a shared LRU cache of `cache_slots`; per layer
                 the base and LoRA work overlap (max of the two) and the activations/deltas exchange adds
                 `exchange_ms_per_layer`; the LoRA server's work for one replica's step is the adapter term of
                 one device times replica_devices * num_replicas / lora_devices (the step model's adapter term is
                 per replica, i.e. already divided over its replica_devices; the server's devices are shared by
                 every replica); a miss stalls the replica whose request needs it by `load_ms` (the LoRA
                 server's devices load their shards in parallel, which the caller folds into load_ms).
Requests are routed to replicas round robin in arrival order. Caches start warm (`prewarm`: the most popular
adapters resident; workloads number adapters by popularity, bench/workload.py and bench/trace.py). Unlike the
engine, the KV cache is reserved in full at admission (prompt + max_tokens), so there is no preemption;
prefetching into free slots is not modelled (it matters only while a cache is still filling).

Steps that only decode, with nothing to admit until the next finish or arrival, repeat identically: they are
advanced in one jump, so a simulated hour of decoding costs a few events.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import math

from infinilora_jax.bench.calibration import StepTimeModel
from infinilora_jax.bench.metrics import SLO, RequestTiming, summarize
from infinilora_jax.bench.workload import WorkloadRequest

MODES = ("coupled", "disaggregated")
RETRY_S = 1e-3  # a replica that could schedule nothing looks again after this long


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    mode: str = "coupled"
    num_replicas: int = 1
    step: StepTimeModel | None = None  # one replica's step time
    cache_slots: int = 8  # per replica (coupled) or on the LoRA server (disaggregated)
    load_ms: float = 0.0  # stall of a step that waits for a cold adapter load
    load_overlap: float = 0.0  # share of load_ms hidden behind the step's compute (layer-wise loading)
    policy: str = "fcfs"  # "fcfs" | "sjf"
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    max_prefill_rows: int = 8
    kv_tokens: int | None = None  # per replica; None: never the limit
    lookahead: int = 16
    exchange_ms_per_layer: float = 0.0  # disaggregated: base <-> LoRA server exchange per layer
    lora_devices: int = 0  # disaggregated: LoRA-server devices
    replica_devices: int = 1  # devices per base replica (the step model already describes the whole replica)
    prewarm: bool = True  # start with each cache holding the most popular adapters (index 0 first), as in
    # steady state; off, every cache starts empty and the first requests all miss

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        if self.policy not in ("fcfs", "sjf"):
            raise ValueError(f"policy={self.policy!r}: choose fcfs or sjf")
        if self.step is None:
            raise ValueError("a step-time model is required")
        if self.mode == "disaggregated" and self.lora_devices < 1:
            raise ValueError("the disaggregated mode needs lora_devices >= 1")
        if min(self.num_replicas, self.max_num_seqs, self.max_num_batched_tokens, self.max_prefill_rows) < 1:
            raise ValueError(f"invalid cluster config {self}")


@dataclasses.dataclass
class SimResult:
    timings: list[RequestTiming]
    makespan_s: float
    hits: int
    misses: int
    steps: int
    unfinished: int  # requests that could never run (e.g. longer than the KV cache)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def summary(self, slo: SLO) -> dict:
        """metrics.summarize of the finished requests, with the cache's hits and the unfinished count (a run where
        none finished has infinite latencies)."""
        s = summarize(self.timings, self.makespan_s, slo) if self.timings else {
            "ttft_p95_s": math.inf, "tpot_mean_s": math.inf, "adapters_meeting_slo": 0.0}
        s.update(hits=self.hits, misses=self.misses, hit_rate=self.hit_rate, unfinished=self.unfinished)
        return s


class LRUCache:
    """Adapter slots: LRU over unpinned adapters; a pinned adapter (in use) is never evicted."""

    def __init__(self, slots: int):
        self.slots = slots
        self.resident: collections.OrderedDict = collections.OrderedDict()  # adapter -> pins, LRU first
        self.hits = self.misses = 0

    def acquire(self, adapter) -> str | None:
        """"hit" | "miss" (loaded now) | None (no slot: every one is pinned)."""
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            self.resident[adapter] += 1
            self.hits += 1
            return "hit"
        if len(self.resident) >= self.slots:
            victim = next((a for a, pins in self.resident.items() if pins == 0), None)
            if victim is None:
                return None
            del self.resident[victim]
        self.resident[adapter] = 1
        self.misses += 1
        return "miss"

    def release(self, adapter) -> None:
        self.resident[adapter] -= 1

    def prewarm(self, by_popularity: list) -> None:
        """Hold the first `slots` adapters of the list (most popular first), the first most recently used."""
        for adapter in reversed(by_popularity[: self.slots]):
            self.resident[adapter] = 0


@dataclasses.dataclass
class _Req:
    index: int
    arrival: float
    adapter: int | None
    prompt: int
    max_tokens: int
    computed: int = 0
    generated: int = 0
    first_token: float = math.nan

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.generated

    @property
    def size(self) -> int:
        return self.prompt + self.max_tokens


class _Replica:
    def __init__(self, cfg: ClusterConfig, cache: LRUCache, arrivals: list[_Req]):
        self.cfg, self.cache = cfg, cache
        self.arrivals = arrivals  # routed to this replica, by arrival time
        self.next_arrival = 0
        self.waiting: list = []  # (key, seq, req): FCFS key = seq; SJF key = size
        self.running: list[_Req] = []
        self.kv_free = cfg.kv_tokens if cfg.kv_tokens is not None else math.inf
        self.seq = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def arrival_time(self) -> float:
        return self.arrivals[self.next_arrival].arrival if self.next_arrival < len(self.arrivals) else math.inf

    def take_arrivals(self, now: float) -> None:
        while self.next_arrival < len(self.arrivals) and self.arrivals[self.next_arrival].arrival <= now:
            req = self.arrivals[self.next_arrival]
            self.next_arrival += 1
            if self.cfg.kv_tokens is not None and req.size > self.cfg.kv_tokens:
                continue  # can never fit: never finishes (counted in SimResult.unfinished)
            key = req.size if self.cfg.policy == "sjf" else self.seq
            bisect.insort(self.waiting, (key, self.seq, req), key=lambda x: (x[0], x[1]))
            self.seq += 1


class Simulator:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.jump = True  # advance runs of identical decode steps at once (False: one step at a time)

    def run(self, requests: list[WorkloadRequest]) -> SimResult:
        cfg = self.cfg
        reqs = [_Req(i, r.arrival, r.adapter, max(1, r.prompt_tokens), max(1, r.max_tokens))
                for i, r in enumerate(sorted(requests, key=lambda r: r.arrival))]
        shared = LRUCache(cfg.cache_slots) if cfg.mode == "disaggregated" else None
        replicas = [_Replica(cfg, shared or LRUCache(cfg.cache_slots), reqs[k::cfg.num_replicas])
                    for k in range(cfg.num_replicas)]
        if cfg.prewarm:
            adapters = {r.adapter for r in reqs if r.adapter is not None}
            for cache in {id(r.cache): r.cache for r in replicas}.values():
                cache.prewarm(sorted(adapters))
        finish: dict[int, float] = {}
        heap = [(rep.arrival_time(), k) for k, rep in enumerate(replicas) if rep.arrivals]
        heapq.heapify(heap)
        steps = 0
        while heap:
            now, k = heapq.heappop(heap)
            rep = replicas[k]
            rep.take_arrivals(now)
            if not rep.has_work():
                if rep.arrival_time() < math.inf:
                    heapq.heappush(heap, (rep.arrival_time(), k))
                continue
            duration, jump = self._step(rep, now, finish)
            steps += jump
            if duration is None:  # nothing could be scheduled now (a shared cache's slots all pinned elsewhere)
                heapq.heappush(heap, (min(rep.arrival_time(), now + RETRY_S), k))
                continue
            heapq.heappush(heap, (now + duration, k))
        caches = [shared] if shared is not None else [r.cache for r in replicas]
        timings = [RequestTiming(None if r.adapter is None else str(r.adapter), r.arrival, r.first_token,
                                 finish[r.index], r.prompt, r.max_tokens) for r in reqs if r.index in finish]
        return SimResult(timings, max(finish.values(), default=0.0), sum(c.hits for c in caches),
                         sum(c.misses for c in caches), steps, len(reqs) - len(timings))

    # ---- one replica step ----

    def _step(self, rep: _Replica, now: float, finish: dict) -> tuple[float | None, int]:
        cfg = self.cfg
        budget = cfg.max_num_batched_tokens
        rows: list[tuple[_Req, int]] = []
        prefill_rows = 0
        for req in rep.running:
            if budget <= 0:
                break
            n = min(req.num_tokens - req.computed, budget)
            if n > 1 and prefill_rows >= cfg.max_prefill_rows:
                continue
            rows.append((req, n))
            prefill_rows += n > 1
            budget -= n
        misses, admitted = self._admit(rep, budget, rows, prefill_rows)
        if not rows:
            return None, 0
        tokens = sum(n for _, n in rows)
        adapters = len({r.adapter for r, _ in rows if r.adapter is not None})
        dt = self._step_ms(tokens, adapters) + misses * cfg.load_ms * (1 - cfg.load_overlap)
        jump = 1
        if self.jump and not admitted and all(n == 1 for _, n in rows):  # a run of identical decode steps
            jump = min(r.max_tokens - r.generated for r, _ in rows)
            if len(rep.running) < cfg.max_num_seqs:  # an arrival could be admitted at the next step
                to_arrival = rep.arrival_time() - now
                if to_arrival < math.inf:
                    jump = min(jump, max(1, math.ceil(to_arrival / (dt / 1e3))))
        end = now + jump * dt / 1e3
        done = []
        for req, n in rows:
            req.computed += n + (jump - 1)
            if req.computed >= req.num_tokens:  # the row's last token was computed: it samples one
                req.generated += jump
                if math.isnan(req.first_token):
                    req.first_token = now + dt / 1e3
                if req.generated >= req.max_tokens:
                    done.append(req)
        for req in done:
            finish[req.index] = end
            rep.running.remove(req)
            rep.kv_free += req.size
            if req.adapter is not None:
                rep.cache.release(req.adapter)
        return jump * dt / 1e3, jump

    def _admit(self, rep: _Replica, budget: int, rows: list, prefill_rows: int) -> tuple[int, bool]:
        cfg = self.cfg
        misses, admitted, index, scanned = 0, False, 0, 0
        while (index < len(rep.waiting) and budget > 0 and len(rep.running) < cfg.max_num_seqs
               and scanned < cfg.lookahead):
            req = rep.waiting[index][2]
            n = min(req.prompt, budget)
            if n > 1 and prefill_rows >= cfg.max_prefill_rows:
                break
            if req.size > rep.kv_free:
                break
            if req.adapter is not None:
                got = rep.cache.acquire(req.adapter)
                if got is None:
                    index += 1
                    scanned += 1
                    continue
                misses += got == "miss"
            del rep.waiting[index]
            rep.kv_free -= req.size
            rep.running.append(req)
            rows.append((req, n))
            prefill_rows += n > 1
            budget -= n
            admitted = True
        return misses, admitted

    def _step_ms(self, tokens: int, adapters: int) -> float:
        cfg, model = self.cfg, self.cfg.step
        base, lora = model.split(tokens, adapters)
        if cfg.mode == "coupled":
            return float(base + lora)
        lora = lora * cfg.replica_devices * cfg.num_replicas / cfg.lora_devices  # the server's time for this step
        layers = model.layers
        per_layer_base = (base - model.host_ms) / layers
        return float(model.host_ms + layers * (max(per_layer_base, lora / layers) + cfg.exchange_ms_per_layer))


def simulate(requests: list[WorkloadRequest], cfg: ClusterConfig) -> SimResult:
    return Simulator(cfg).run(requests)

