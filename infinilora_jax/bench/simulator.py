"""A discrete-event simulator of multi-LoRA serving past one machine: replicas, adapter caches, cold loads.

Each base-model replica runs the engine's continuous batching (engine/scheduler.py, re-enacted on request
lengths only): per step, running requests first (one decode token each, or their next prefill chunk; at most
`max_prefill_rows` chunks), then waiting requests FCFS or SJF (prompt + max_tokens) while the token budget,
`max_num_seqs` and the KV cache allow; a request whose adapter cannot get a cache slot (every slot pinned by
running requests) is passed over within a lookahead of 16, one that does not fit in the KV cache blocks the
queue. A step's duration comes from a calibrated step-time model (bench/calibration.py) of its tokens and
distinct adapters, plus the cold loads it waits for. The model's `gap_ms` follows every step: the host time the
engine's caller spends between two steps of a replica (adding arrivals, handing a replica its next step; measured
by bench/replay.py `host_gaps`). The step's tokens come back at the end of its own time; the replica starts its
next step, and counts as in flight for routing, until the gap has passed too.

Modes:
  coupled        every replica holds its own LRU adapter cache of `cache_slots` (S-LoRA style); LoRA math adds
                 to the step.
  disaggregated  replicas hold no adapters; one LoRA server holds a shared LRU cache of `cache_slots`; per layer
                 the base and LoRA work overlap (max of the two) and the activations/deltas exchange adds
                 `exchange_ms_per_layer`; the LoRA server's work for one replica's step is the adapter term of
                 one device times replica_devices * num_replicas / lora_devices (the step model's adapter term is
                 per replica, i.e. already divided over its replica_devices; the server's devices are shared by
                 every replica); the LoRA server's devices load their shards in parallel, which the caller folds
                 into load_ms. All of that derives a disaggregated step from a coupled engine's model. A model
                 timed on the disaggregated engine itself (`engine_mode="disaggregated"`, e.g. replay.step_model
                 of a disaggregated run) already holds the LoRA server's work, the exchange and the overlap the
                 two devices achieved: its steps are taken as they are (base + adapter term, no max, no
                 exchange added), for the layout it was measured on.

Cold loads (`adapter_loading`, as LLM(adapter_loading=...)):
  step        a miss stalls the step that admits the request by `load_ms` (times 1 - `load_overlap`), and with
              it every request of that replica's batch.
  background  the copy runs beside the steps (lora/adapter_cache.py `background_loads`): a miss takes (pins) the
              slot when the scheduler first reaches the request, which then stays queued, holding its slot, until
              the load lands `load_ms` later, and is admitted at the first step that starts after that; steps
              carry no stall. A request whose adapter is still loading into its slot waits for the same load. As
              in the engine, such a queued request still takes a place in the lookahead window, and a replica
              with nothing to run but requests waiting for loads waits for the earliest load to land
              (`wait_for_load`). Hits and misses are counted as the engine's AdapterCache.acquire counts them:
              once per request, when it takes its slot; a request for an adapter already loading is a hit.

Routing (`routing`; None: what the engine does in the mode, evaluated when the request is routed, below, against
the replicas' state then):
  affinity         coupled replicas (engine/replicas.py ReplicaGroup.route): to a replica with affinity for the
                   request's adapter (resident in its cache, or used by one of its unfinished requests), the
                   least loaded of those, unless its load exceeds the least loaded replica's by more than
                   `affinity_slack` tokens (None: max_num_batched_tokens); else, and for requests without an
                   adapter, the least loaded. Load: outstanding tokens (prompt not yet computed plus tokens still
                   to generate) over the replica's unfinished requests. Ties go to the lowest index.
  fewest_requests  disaggregated base instances (disagg/engine.py InstanceGroup.add_request): the one with the
                   fewest unfinished requests, ties to the lowest index.
  round_robin      in arrival order, whatever the replicas' state.
When requests are routed (`arrivals_between_steps`, default on): as in the engine, whose callers (the server's
EngineWorker, bench/replay.py) add the requests that arrived only between `step()` calls. ReplicaGroup.step
starts a step on every idle replica with work and returns once at least one step in flight has completed; an
LLMEngine's and an InstanceGroup's step is one call. So a request is routed, and can be admitted, at the first
moment at or after its arrival at which no replica has a step in flight (then at once), or else at the earliest
completion of a step in flight on any replica; it is routed before any replica starts its next step at that
instant, so every replica whose step completes then, and every idle one, can admit it at once. Meanwhile it waits,
even when a replica is idle: with several replicas, a request arriving while every busy replica is stalled (a
cold load, a long prefill) waits for the first of them. A replica waiting for a background load (`wait_for_load`)
is in flight until the step that follows the wait completes (an LLMEngine's step waits and runs it in one call);
in the disaggregated mode, until the load lands (an InstanceGroup's step returns after the wait). A replica
retrying after it could schedule nothing is not in flight. With one replica this changes nothing else: a request
arriving mid-step could not start before that step's end anyway. The disaggregated mode's base instances step
independently here (below), so their requests wait for the earliest instance step to complete, where the engine's
instances all complete theirs together. Off, a request is routed at its arrival time, and an idle replica starts
on it at once (what the simulator did before).
A replica's state is applied when its step starts, so routing sees each replica whose step is still in flight as
of the end of that step (the engine sees it as of the start).

Caches start warm (`prewarm`: the most popular adapters resident in every cache; workloads number adapters by
popularity, bench/workload.py and bench/trace.py). Unlike the engine, the KV cache is reserved in full at
admission (prompt + max_tokens), so there is no preemption; prefetching into free slots is not modelled (it
matters only while a cache is still filling). The disaggregated mode's base instances step independently here,
while the engine steps them together as one program (disagg/engine.py).

Async scheduling (`async_scheduling`, as LLM(async_scheduling=True), the engines' default): the engine
queues a step before it reads the previous step's tokens, so a step's tokens reach the caller at the end of the
replica's next step (at once when it has none), and a request whose last token is still on the device is not
scheduled again but holds its KV and adapter slot until then (the next step's scheduling cannot use them). A
step then lasts the longer of the model's `host_ms` (the host's per-step work, measured apart in the stored
calibrations) and the rest, instead of their sum; a model fitted to async steps (replay.measured on such a run:
`host_ms` 0, the period between steps) is taken as it is. Off, a step's tokens come back at the end of the step
itself.

Steps that only decode, with nothing to admit until the next finish, arrival or landed load, repeat identically:
they are advanced in one jump, so a simulated hour of decoding costs a few events. A jump ends at the first step
boundary at or after the next event that may change what the replica does: a finish, a landed load, an arrival
it could admit or that routing would read its state for, and (arrivals between steps, several replicas) any
arrival, which may be routed at that boundary.
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
ROUTINGS = ("affinity", "fewest_requests", "round_robin")
ADAPTER_LOADINGS = ("step", "background")
RETRY_S = 1e-3  # a replica that could schedule nothing (and waits for no load) looks again after this long


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    mode: str = "coupled"
    num_replicas: int = 1
    step: StepTimeModel | None = None  # one replica's step time
    cache_slots: int = 8  # per replica (coupled) or on the LoRA server (disaggregated)
    load_ms: float = 0.0  # one cold adapter load: the stall of its step, or (background) the wait of its requests
    load_overlap: float = 0.0  # step loading: share of load_ms hidden behind the step's compute (layer-wise loading)
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
    routing: str | None = None  # ROUTINGS; None: the engine's for the mode (module docstring)
    affinity_slack: int | None = None  # affinity routing, tokens; None: max_num_batched_tokens (as the engine)
    adapter_loading: str = "step"  # ADAPTER_LOADINGS (module docstring)
    async_scheduling: bool = False  # outputs reach the caller one step late (module docstring)
    arrivals_between_steps: bool = True  # an arrival is routed (and can be admitted) only when no step is in
    # flight or at the first step completion at or after it, as the engine's callers add requests between steps
    # (module docstring, "When requests are routed"); False: at its arrival time, as the simulator did before

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        if self.policy not in ("fcfs", "sjf"):
            raise ValueError(f"policy={self.policy!r}: choose fcfs or sjf")
        if self.routing is not None and self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r}: choose one of {ROUTINGS} (or None: the engine's)")
        if self.adapter_loading not in ADAPTER_LOADINGS:
            raise ValueError(f"adapter_loading={self.adapter_loading!r}: choose one of {ADAPTER_LOADINGS}")
        if self.step is None:
            raise ValueError("a step-time model is required")
        if self.mode == "disaggregated" and self.lora_devices < 1:
            raise ValueError("the disaggregated mode needs lora_devices >= 1")
        if self.step.engine_mode == "disaggregated" and self.mode != "disaggregated":
            raise ValueError(f"step-time model {self.step.name!r} was timed on the disaggregated engine: it cannot "
                             "describe a coupled replica's steps")
        if self.step.engine_mode == "disaggregated" and self.exchange_ms_per_layer:
            raise ValueError(f"step-time model {self.step.name!r} was timed on the disaggregated engine, so its "
                             "steps already hold the exchange: exchange_ms_per_layer must be 0")
        if min(self.num_replicas, self.max_num_seqs, self.max_num_batched_tokens, self.max_prefill_rows) < 1:
            raise ValueError(f"invalid cluster config {self}")

    @property
    def router(self) -> str:
        """The routing in effect: `routing`, or the engine's for the mode."""
        return self.routing or ("affinity" if self.mode == "coupled" else "fewest_requests")

    @property
    def slack(self) -> int:
        return self.max_num_batched_tokens if self.affinity_slack is None else self.affinity_slack


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
    """Adapter slots: LRU over unpinned adapters; a pinned adapter (in use, or held by a request waiting for its
    load) is never evicted. `landing`: background loads in flight, adapter -> when it lands."""

    def __init__(self, slots: int):
        self.slots = slots
        self.resident: collections.OrderedDict = collections.OrderedDict()  # adapter -> pins, LRU first
        self.landing: dict = {}
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
            self.landing.pop(victim, None)
        self.resident[adapter] = 1
        self.misses += 1
        return "miss"

    def release(self, adapter) -> None:
        self.resident[adapter] -= 1

    def is_ready(self, adapter, now: float) -> bool:
        """Whether a step starting at `now` may read the adapter (no background load into its slot in flight)."""
        return self.landing.get(adapter, -math.inf) <= now

    def next_landing(self, now: float) -> float:
        """When the earliest background load still in flight at `now` lands (inf: none)."""
        for adapter in [a for a, t in self.landing.items() if t <= now]:
            del self.landing[adapter]
        return min(self.landing.values(), default=math.inf)

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
    holds_slot: bool = False  # its adapter is pinned for it (taken at admission, or while it waits for the load)

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.generated

    @property
    def size(self) -> int:
        return self.prompt + self.max_tokens


class _Replica:
    def __init__(self, cfg: ClusterConfig, cache: LRUCache):
        self.cfg, self.cache = cfg, cache
        self.waiting: list = []  # (key, seq, req): FCFS key = seq; SJF key = size
        self.running: list[_Req] = []
        self.kv_free = cfg.kv_tokens if cfg.kv_tokens is not None else math.inf
        self.seq = 0
        self.waiting_tokens = 0  # outstanding tokens of the waiting requests (their whole size: none computed)
        self.adapter_users: collections.Counter = collections.Counter()  # adapter -> unfinished requests using it
        self.wakes_on_arrival = True  # a request routed to it starts a step at once (idle, or retrying); False:
        # a step is in flight until next_at (or it waits for a load until then)
        self.next_at = -math.inf  # its scheduled event: the end of its step in flight (or of its load wait)
        self.completes = True  # the step in flight completes at next_at (False: a load wait, then a step)
        self.version = 0  # of its next step: the event heap's older entries for it are stale
        # async scheduling: requests whose first token / last token is on the device, not yet handed back
        self.first_pending: list[_Req] = []
        self.finishing: list[_Req] = []  # no longer scheduled; they keep their KV and slot until delivered

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.first_pending or self.finishing)

    def add(self, req: _Req) -> bool:
        """Queue a routed request; False if it can never fit (it never finishes: SimResult.unfinished)."""
        if self.cfg.kv_tokens is not None and req.size > self.cfg.kv_tokens:
            return False
        key = req.size if self.cfg.policy == "sjf" else self.seq
        bisect.insort(self.waiting, (key, self.seq, req), key=lambda x: (x[0], x[1]))
        self.seq += 1
        self.waiting_tokens += req.size
        self.adapter_users[req.adapter] += 1
        return True

    # ---- what routing looks at (engine/replicas.py ReplicaGroup.load, has_affinity) ----

    def load(self) -> int:
        """Outstanding tokens of the unfinished requests: prompt + max_tokens - computed (no preemption here)."""
        return self.waiting_tokens + sum(r.size - r.computed for r in self.running)

    def unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.finishing)

    def has_affinity(self, adapter) -> bool:
        return adapter is not None and (adapter in self.cache.resident or self.adapter_users[adapter] > 0)


class Simulator:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.jump = True  # advance runs of identical decode steps at once (False: one step at a time)

    def run(self, requests: list[WorkloadRequest]) -> SimResult:
        cfg = self.cfg
        reqs = [_Req(i, r.arrival, r.adapter, max(1, r.prompt_tokens), max(1, r.max_tokens))
                for i, r in enumerate(sorted(requests, key=lambda r: r.arrival))]
        shared = LRUCache(cfg.cache_slots) if cfg.mode == "disaggregated" else None
        replicas = [_Replica(cfg, shared or LRUCache(cfg.cache_slots)) for _ in range(cfg.num_replicas)]
        if cfg.prewarm:
            adapters = {r.adapter for r in reqs if r.adapter is not None}
            for cache in {id(r.cache): r.cache for r in replicas}.values():
                cache.prewarm(sorted(adapters))
        self._reqs, self._routed = reqs, 0  # reqs[self._routed:] have not arrived yet
        finish: dict[int, float] = {}
        heap: list[tuple[float, int, int]] = []  # (time, replica, version): replicas' next steps

        def schedule(k: int, at: float, wakes_on_arrival: bool, completes: bool = True) -> None:
            rep = replicas[k]
            rep.version += 1
            rep.wakes_on_arrival, rep.completes, rep.next_at = wakes_on_arrival, completes, at
            heapq.heappush(heap, (at, k, rep.version))

        # a replica waiting for a background load: an LLMEngine's step (a coupled replica's) waits for the load
        # and runs the step that follows in one call; an InstanceGroup's step returns after the wait
        load_wait_completes = cfg.mode == "disaggregated"

        steps, clock = 0, 0.0  # clock: the time of the latest event
        while True:
            arrival = reqs[self._routed].arrival if self._routed < len(reqs) else math.inf
            at = arrival  # when the next arrival is routed
            if cfg.arrivals_between_steps and arrival < math.inf:
                # a step is in flight on every replica that does not wake on an arrival: it completes at next_at,
                # or (not `completes`) waits for a load until then and runs a step after it in the same call. An
                # arrival during one waits for the earliest completion (a run of steps that a jump advanced ends
                # at the first step boundary at or after the next arrival, so that boundary is such a completion)
                busy = [rep for rep in replicas if not rep.wakes_on_arrival]
                ends = min((rep.next_at for rep in busy if rep.completes), default=math.inf)
                if busy and arrival < ends:
                    at = ends  # inf while only load waits are in flight: their landings come first
                at = max(at, clock)  # one left waiting when a load wait ended without a step: routed now
            if heap and heap[0][0] < at:  # a step; arrivals routed at the same time are routed first
                now, k, version = heapq.heappop(heap)
                clock = now
                rep = replicas[k]
                if version != rep.version:
                    continue
                rep.wakes_on_arrival = True
                if not rep.has_work():
                    continue  # idle until a request is routed to it
                duration, jump = self._step(rep, k, now, finish)
                steps += jump
                landing = rep.cache.next_landing(now)
                if duration is not None:
                    schedule(k, now + duration, False)
                elif landing < math.inf:  # only requests waiting for loads: block until the earliest lands
                    schedule(k, landing, False, load_wait_completes)
                else:  # nothing could be scheduled now (a shared cache's slots all pinned elsewhere)
                    schedule(k, now + RETRY_S, True)
            elif arrival < math.inf:
                req = reqs[self._routed]
                self._routed += 1
                k = self._route(req, replicas)
                if replicas[k].add(req) and replicas[k].wakes_on_arrival:
                    schedule(k, at, False)
            else:
                break
        caches = [shared] if shared is not None else [r.cache for r in replicas]
        timings = [RequestTiming(None if r.adapter is None else str(r.adapter), r.arrival, r.first_token,
                                 finish[r.index], r.prompt, r.max_tokens) for r in reqs if r.index in finish]
        return SimResult(timings, max(finish.values(), default=0.0), sum(c.hits for c in caches),
                         sum(c.misses for c in caches), steps, len(reqs) - len(timings))

    # ---- routing ----

    def _route(self, req: _Req, replicas: list[_Replica]) -> int:
        """The replica a request arriving now goes to (module docstring, "Routing")."""
        n = len(replicas)
        router = self.cfg.router
        if n == 1:
            return 0
        if router == "round_robin":
            return req.index % n
        if router == "fewest_requests":
            return min(range(n), key=lambda k: (replicas[k].unfinished(), k))
        loads = [rep.load() for rep in replicas]
        least = min(range(n), key=lambda k: (loads[k], k))
        warm = [k for k in range(n) if replicas[k].has_affinity(req.adapter)]
        if warm:
            best = min(warm, key=lambda k: (loads[k], k))
            if loads[best] <= loads[least] + self.cfg.slack:
                return best
        return least

    def _next_arrival(self, k: int, any_replica: bool = False) -> float:
        """When the next request that may reach replica k arrives: round robin knows which; otherwise (or with
        `any_replica`) any arrival may (and routing reads the replica's state then, so a jump must not run past
        it)."""
        reqs, i, n = self._reqs, self._routed, self.cfg.num_replicas
        if self.cfg.router == "round_robin" and not any_replica:
            i += (k - i) % n
        return reqs[i].arrival if i < len(reqs) else math.inf

    # ---- one replica step ----

    def _step(self, rep: _Replica, k: int, now: float, finish: dict) -> tuple[float | None, int]:
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
        stalls, admitted = self._admit(rep, now, budget, rows, prefill_rows)
        if not rows:
            # async: a step with nothing new to queue reads the last one's tokens back; the caller's next step
            # (after the host gap) may use what the finished requests gave up
            if self._deliver(rep, now, finish) is not None:
                return cfg.step.gap_ms / 1e3, 0
            return None, 0
        tokens = sum(n for _, n in rows)
        adapters = len({r.adapter for r, _ in rows if r.adapter is not None})
        dt = self._step_ms(tokens, adapters) + stalls * cfg.load_ms * (1 - cfg.load_overlap)
        gap = cfg.step.gap_ms  # host time after the step, before the replica's next one can start
        period = dt + gap
        freed = self._deliver(rep, now + dt / 1e3, finish)  # async: the previous step's outputs, after scheduling
        jump = 1
        if self.jump and not admitted and not freed and all(n == 1 for _, n in rows):  # identical decode steps
            jump = min(r.max_tokens - r.generated for r, _ in rows)
            room = len(rep.running) < cfg.max_num_seqs  # an arrival or a landed load could be admitted
            routed_by_state = cfg.num_replicas > 1 and cfg.router != "round_robin"
            # arrivals between steps: any arrival (to any replica) may be routed at one of this run's step
            # boundaries, the first at or after it (with one replica: to this one, admitted only when there is room)
            between = cfg.arrivals_between_steps and cfg.num_replicas > 1
            # stop at the step boundary at or after the next event that may change what this replica does
            events = ([self._next_arrival(k, between)] if room or routed_by_state or between else []) + (
                [rep.cache.next_landing(now)] if room else [])
            for at in events:
                if at < math.inf:  # (less a rounding error: an event landing on a boundary is seen at it)
                    jump = min(jump, max(1, math.ceil((at - now) / (period / 1e3) - 1e-9)))
        end = now + (jump * dt + (jump - 1) * gap) / 1e3  # the last step's tokens come back (the gap follows)
        done = []
        for req, n in rows:
            req.computed += n + (jump - 1)
            if req.computed >= req.num_tokens:  # the row's last token was computed: it samples one
                req.generated += jump
                if math.isnan(req.first_token):
                    if not cfg.async_scheduling:
                        req.first_token = now + dt / 1e3
                    elif jump > 1:  # sampled by the run's first step, handed back by its second
                        req.first_token = now + (2 * dt + gap) / 1e3
                    else:
                        rep.first_pending.append(req)
                if req.generated >= req.max_tokens:
                    done.append(req)
        for req in done:
            rep.running.remove(req)
            if cfg.async_scheduling:
                rep.finishing.append(req)
            else:
                finish[req.index] = end
                self._release(rep, req)
        return jump * period / 1e3, jump

    def _deliver(self, rep: _Replica, at: float, finish: dict) -> bool | None:
        """Async scheduling: hand back the previous step's outputs at `at` (first tokens; finished requests give
        up their KV and slot). Returns whether any request finished; None when nothing was waiting."""
        if not (rep.first_pending or rep.finishing):
            return None
        for req in rep.first_pending:
            req.first_token = at
        rep.first_pending = []
        done, rep.finishing = rep.finishing, []
        for req in done:
            finish[req.index] = at
            self._release(rep, req)
        return bool(done)

    @staticmethod
    def _release(rep: _Replica, req: _Req) -> None:
        rep.kv_free += req.size
        rep.adapter_users[req.adapter] -= 1
        if req.adapter is not None:
            rep.cache.release(req.adapter)
            req.holds_slot = False

    def _admit(self, rep: _Replica, now: float, budget: int, rows: list, prefill_rows: int) -> tuple[int, bool]:
        """Admit waiting requests into this step (engine/scheduler.py `_admit`); returns (the loads that stall
        this step, whether any request was admitted)."""
        cfg = self.cfg
        background = cfg.adapter_loading == "background"
        stalls, admitted, index, scanned = 0, False, 0, 0
        while (index < len(rep.waiting) and budget > 0 and len(rep.running) + len(rep.finishing) < cfg.max_num_seqs
               and scanned < cfg.lookahead):
            req = rep.waiting[index][2]
            n = min(req.prompt, budget)
            if n > 1 and prefill_rows >= cfg.max_prefill_rows:
                break
            if req.size > rep.kv_free:
                break
            if req.adapter is not None and not req.holds_slot:
                got = rep.cache.acquire(req.adapter)
                if got is None:  # every slot pinned: try a later request
                    index += 1
                    scanned += 1
                    continue
                req.holds_slot = True
                if got == "miss" and background:  # copied in beside the steps: the request waits for it
                    rep.cache.landing[req.adapter] = now + cfg.load_ms / 1e3
                elif got == "miss":  # copied in by this step, which every request of the batch waits for
                    stalls += 1
            if req.adapter is not None and not rep.cache.is_ready(req.adapter, now):
                index += 1  # its adapter is still being copied in: it keeps its slot, a later request may run
                scanned += 1
                continue
            del rep.waiting[index]
            rep.waiting_tokens -= req.size
            rep.kv_free -= req.size
            rep.running.append(req)
            rows.append((req, n))
            prefill_rows += n > 1
            budget -= n
            admitted = True
        return stalls, admitted

    def _step_ms(self, tokens: int, adapters: int) -> float:
        cfg, model = self.cfg, self.cfg.step
        base, lora = model.split(tokens, adapters)
        if cfg.mode == "coupled" or model.engine_mode == "disaggregated":  # the latter: whole disaggregated steps
            device = float(base + lora - model.host_ms)
        else:
            lora = lora * cfg.replica_devices * cfg.num_replicas / cfg.lora_devices  # the server's time, this step
            layers = model.layers
            per_layer_base = (base - model.host_ms) / layers
            device = float(layers * (max(per_layer_base, lora / layers) + cfg.exchange_ms_per_layer))
        if cfg.async_scheduling:  # the host's part of a step runs while the device computes the one before
            return max(model.host_ms, device)
        return model.host_ms + device


def simulate(requests: list[WorkloadRequest], cfg: ClusterConfig) -> SimResult:
    return Simulator(cfg).run(requests)
