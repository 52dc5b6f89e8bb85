"""Driving the real engine with a workload in wall-clock time, and the knobs the SLO baselines turn on it.

    timings, wall = replay(llm.engine, requests, adapter_names)

`StepLog` records every step's features and time (for calibrating the simulator); `emulate_cold_loads` makes each
adapter load stall the step that carries it (tiny adapters load in microseconds on CPU, real ones take tens of
milliseconds); `AdapterSlotLimit` shrinks the usable adapter cache without recompiling (the pool's extra slots
are pinned by placeholder adapters); `set_policy` switches the scheduler between FCFS and SJF.

Every hook works on the three engines: an `LLMEngine` (coupled, or disaggregated with one base instance, whose
runner's `sample` is the disaggregated step for one instance), a disaggregated `InstanceGroup` (several base
instances, each an `LLMEngine` with its own scheduler, stepped together by the runner's `sample_instances`; one
shared adapter cache) and a coupled `ReplicaGroup` (engine/replicas.py: several replicas, each an `LLMEngine`
with its own runner and adapter cache, each stepping on its own; `engine.runner.adapters` is their registry seen as
one, `adapter_caches` lists the per-replica caches). `base_instances` says which schedulers a step runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np

from infinilora_jax import compilation_cache
from infinilora_jax.bench import metrics
from infinilora_jax.bench.workload import WorkloadRequest
from infinilora_jax.engine.engine import LLMEngine
from infinilora_jax.sampling import SamplingParams


def replay(engine: LLMEngine, requests: list[WorkloadRequest], names: list[str],
           step_log: StepLog | None = None) -> tuple[list[metrics.RequestTiming], float]:
    """Submits each request at its arrival time (greedy, EOS ignored, max_tokens as given), steps the engine until
    all are done; returns per-request timings (seconds from the start) and the wall time."""
    with step_log.recording(engine) if step_log is not None else contextlib.nullcontext():
        return _replay(engine, requests, names)


def _replay(engine, requests, names):
    start = time.monotonic()
    pending = sorted(requests, key=lambda r: r.arrival)
    info = {}
    i = 0
    while i < len(pending) or engine.has_unfinished():
        now = time.monotonic() - start
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            adapter = None if r.adapter is None else names[r.adapter]
            rid = engine.add_request(r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0,
                                                              ignore_eos=True), adapter,
                                     arrival_time=start + r.arrival)
            info[rid] = adapter
            i += 1
        if engine.has_unfinished():
            engine.step()
        elif i < len(pending):
            time.sleep(max(0.0, pending[i].arrival - (time.monotonic() - start)))
    wall = time.monotonic() - start
    timings = [metrics.RequestTiming(info[r.request_id], r.arrival_time - start, r.first_token_time - start,
                                     r.finish_time - start, len(r.prompt_token_ids), len(r.output_token_ids))
               for r in engine.pop_finished()]
    return timings, wall


def base_instances(engine) -> list[LLMEngine]:
    """The LLMEngines a step of `engine` schedules: the engine itself, or an InstanceGroup's or a ReplicaGroup's
    instances."""
    return list(getattr(engine, "instances", None) or [engine])


def adapter_caches(engine) -> list:
    """The device adapter caches behind `engine`: one (LLMEngine, InstanceGroup), or one per replica
    (ReplicaGroup)."""
    cache = engine.runner.adapters
    return list(getattr(cache, "caches", None) or [cache])


def settle_caches(engine, names: list[str]) -> float:
    """Before measuring, bring the adapter caches to a long-running server's steady state (returns the seconds
    spent): every adapter of `names` staged (`staged_pages`: the pinned host copy an adapter's first load makes
    and keeps while it stays in the host store; at real widths that costs a cold load far more than the
    emulated copy, but only the first time), and the free device slots filled with the first of `names`
    (most popular first; what the simulator's `prewarm` assumes). Nothing is evicted; the loads made here stall
    no step (emulate_cold_loads)."""
    start = time.perf_counter()
    for cache in adapter_caches(engine):
        for name in names:
            cache.staged_pages(name)
        cache.prefetch(list(names))
        _forget_loads(cache)
    return time.perf_counter() - start


ENGINE_RUNNER_CALLS = ("sample", "fetch")  # an LLMEngine's step queues a step and reads one's tokens back


def _step_units(engine) -> list[tuple[object, list[LLMEngine], object, tuple[str, ...]]]:
    """What one recorded step is: (the object whose `step` runs it, the base instances it schedules, the runner
    and its methods that run step programs and wait for them). Each replica of a ReplicaGroup steps on its own
    (its `step`, its runner's `sample` and `fetch`); an InstanceGroup steps all its instances at once
    (`sample_instances` and `fetch_instances` of the shared runner); an LLMEngine is one unit. With async
    scheduling, a unit's `step` queues one step and waits for the one before it, so a record's features (what
    was scheduled) and its wait belong to consecutive steps: in a steady stream, alike."""
    if getattr(engine, "runners", None) is not None:
        return [(inst, [inst], inst.runner, ENGINE_RUNNER_CALLS) for inst in engine.instances]
    if hasattr(engine, "instances"):
        return [(engine, list(engine.instances), engine.runner, ("sample_instances", "fetch_instances"))]
    return [(engine, [engine], engine.runner, ENGINE_RUNNER_CALLS)]


def measured(engine: LLMEngine, requests: list[WorkloadRequest], names: list[str],
             slo: metrics.SLO) -> dict:
    """replay, summarised (metrics.summarize), with the adapter cache's hits and misses during the run, the engine
    steps that ran (`steps`: steps that did work; `step_tokens`: new tokens over all of them and all base
    instances; `step_ms_mean`, `step_ms_max`), the host time between steps (`gap_ms_mean`, `gap_ms_median`,
    `gaps`: host_gaps), the host time the caches spent staging and writing loads (`load_seconds`), the step
    model fitted to the run (`step_model`), whether the engine queued steps ahead (`async_scheduling`: then a
    step's time is the period between steps, host work overlapped) and the machine's 1-minute load average
    before and after (other processes may share it)."""
    cache = engine.runner.adapters
    before, load = dataclasses.replace(cache.stats), os.getloadavg()[0]
    log = StepLog()
    timings, wall = replay(engine, requests, names, step_log=log)
    summary = metrics.summarize(timings, wall, slo)
    hits, misses = cache.stats.hits - before.hits, cache.stats.misses - before.misses
    gaps = host_gaps(log.records)
    summary.update(hits=hits, misses=misses, hit_rate=hits / max(1, hits + misses), loads=cache.stats.loads -
                   before.loads, steps=len(log.records), step_tokens=sum(r.tokens for r in log.records),
                   step_ms_mean=sum(r.ms for r in log.records) / max(1, len(log.records)),
                   step_ms_max=max((r.ms for r in log.records), default=0.0),
                   gap_ms_mean=float(gaps.mean()) if len(gaps) else None,
                   gap_ms_median=float(np.median(gaps)) if len(gaps) else None, gaps=len(gaps),
                   load_seconds=cache.stats.load_seconds - before.load_seconds,
                   step_model=step_model(log.records, engine.runner.cfg.num_layers, engine_mode(engine)),
                   async_scheduling=queues_steps_ahead(engine), load_average=(load, os.getloadavg()[0]))
    return summary


def engine_mode(engine) -> str:
    """"disaggregated" when the engine's steps run the disaggregated step program (an InstanceGroup, or an
    LLMEngine over a DisaggRunner: base instance(s) and the LoRA server), else "coupled"."""
    from infinilora_jax.disagg.runner import DisaggRunner

    return "disaggregated" if isinstance(engine.runner, DisaggRunner) else "coupled"


def queues_steps_ahead(engine) -> bool:
    """Whether the engine's base instances use async scheduling (engine/engine.py)."""
    return all(inst.async_scheduling for inst in getattr(engine, "instances", [engine]))


def host_gaps(records: list[StepRecord]) -> np.ndarray:
    """Host time between steps (ms): for each step unit, from the end of a step after which it still had work
    (`pending`) to the start of its next recorded step. That time is no step's: the caller's loop (adding the
    requests that arrived, `has_unfinished`), a ReplicaGroup's return of a completed replica's outputs and the
    hand-off of its next step to its thread. A unit with no work left instead waits for an arrival (idle time,
    not counted)."""
    gaps = []
    by_unit: dict[int, list[StepRecord]] = {}
    for r in records:
        by_unit.setdefault(r.unit, []).append(r)
    for steps in by_unit.values():
        steps.sort(key=lambda r: r.start_s)
        gaps += [1e3 * (b.start_s - a.start_s) - a.ms for a, b in zip(steps, steps[1:]) if a.pending]
    return np.maximum(np.array(gaps, dtype=float), 0.0)


def step_model(records: list[StepRecord], layers: int, mode: str = "coupled") -> dict | None:
    """The step-time model (bench/calibration.py: per layer const, per token, per distinct adapter; host time
    inside the step folded into const) fitted to the steps that loaded no adapter, plus the host time between
    steps (`gap_ms`: the mean of host_gaps; `gaps`: how many), so a run calibrates the simulator for its own
    engine and machine; with `n` (steps fitted), `median_error` (median |predicted / measured - 1|) and
    `engine_mode` (the engine whose whole steps these are: replay.engine_mode). None with fewer than 8 such
    steps."""
    from infinilora_jax.bench import calibration

    points = [calibration.StepPoint(r.tokens, r.adapters, r.ms, layers, r.rows) for r in records if not r.loads]
    if len(points) < 8:
        return None
    model = calibration.fit(points, "measured")
    gaps = host_gaps(records)
    return {"layers": layers, "const": model.const, "tokens_coef": model.tokens_coef,
            "adapters_coef": model.adapters_coef, "n": len(points),
            "median_error": float(np.median(np.abs(calibration.residuals(model, points)))),
            "gap_ms": float(gaps.mean()) if len(gaps) else 0.0, "gaps": len(gaps), "engine_mode": mode}


@dataclasses.dataclass
class StepRecord:
    tokens: int  # new tokens (decode + prefill chunks), over every base instance
    adapters: int  # distinct adapters among the rows
    rows: int
    prefill_rows: int
    ms: float  # the whole engine.step()
    device_ms: float  # inside the runner's step (dispatch, compute, tokens back to the host)
    instances: int = 1  # base instances with work in this step (InstanceGroup: up to dp; a replica's step: 1)
    loads: int = 0  # adapter loads started during the step (its time may include their copies or stalls)
    unit: int = 0  # which step unit ran it (_step_units: a ReplicaGroup's replica index; else 0)
    start_s: float = 0.0  # when the step started, seconds since the recording started
    pending: bool = False  # its unit still had unfinished requests when the step returned, so the caller's loop
    # starts the unit's next step without waiting for an arrival (host_gaps)


class StepLog:
    """Records every engine step's features and time while `recording(engine)` is active. A step is one
    `_step_units` unit: an LLMEngine's or InstanceGroup's `step`, or one replica's `step` of a ReplicaGroup
    (replicas step independently, in their own threads). For each it wraps the unit's `step`, its instances'
    `scheduler.schedule` (what each scheduled) and the runner method that runs the step program (the time spent
    in it)."""

    def __init__(self):
        self.records: list[StepRecord] = []
        self.origin = time.perf_counter()

    @contextlib.contextmanager
    def recording(self, engine):
        units = _step_units(engine)
        self.origin = time.perf_counter()
        try:
            for unit, (stepper, instances, runner, entries) in enumerate(units):
                self._wrap(stepper, instances, runner, entries, unit)
            yield self
        finally:
            for stepper, instances, runner, entries in units:
                for obj, name in ([(stepper, "step")] + [(runner, e) for e in entries]
                                  + [(i.scheduler, "schedule") for i in instances]):
                    if name in vars(obj):
                        delattr(obj, name)  # back to the class methods

    def _wrap(self, stepper, instances, runner, entries: tuple[str, ...], unit: int = 0) -> None:
        # One unit steps in one thread at a time, so its captures need no lock; list.append is atomic for the
        # records that several replicas' threads append.
        captured, device, calls = [], [0.0], [0]
        for inst in instances:
            def schedule_and_keep(schedule=inst.scheduler.schedule):
                work = schedule()
                captured.append(work)
                return work
            inst.scheduler.schedule = schedule_and_keep
        def timed(run):
            def call(*args, **kwargs):
                t = time.perf_counter()
                calls[0] += 1
                try:
                    return run(*args, **kwargs)
                finally:
                    device[0] += time.perf_counter() - t
            return call
        for entry in entries:
            setattr(runner, entry, timed(getattr(runner, entry)))
        step = stepper.step

        caches = list({id(c): c for c in (i.runner.adapters for i in instances)}.values())

        def recorded_step():
            captured.clear()
            device[0], calls[0] = 0.0, 0
            loads = sum(c.stats.loads for c in caches)
            t = time.perf_counter()
            out = step()
            ms = 1e3 * (time.perf_counter() - t)
            loads = sum(c.stats.loads for c in caches) - loads
            rows = [(r, n) for work in captured for r, n in work.rows]
            if rows:
                if not calls[0]:
                    raise RuntimeError(f"StepLog: the engine scheduled work but never called runner.{entries[0]}")
                pending = any(inst.has_unfinished() for inst in instances)
                self.records.append(StepRecord(sum(n for _, n in rows),
                                               len({r.adapter for r, _ in rows if r.adapter is not None}),
                                               len(rows), sum(n > 1 for _, n in rows), ms, 1e3 * device[0],
                                               sum(1 for work in captured if work.rows), loads, unit,
                                               t - self.origin, pending))
            return out
        stepper.step = recorded_step


def emulate_cold_loads(engine: LLMEngine, seconds: float) -> None:
    """From now on, each adapter load into a device slot takes `seconds`. With loads carried by steps (the
    default), the step that carries it stalls that long (a host sleep before the step runs, so nothing overlaps
    it: an eager load); with background loads (adapter_loading="background"), the load lands no earlier than
    that while steps go on (`AdapterCache.min_load_seconds`). With replicas, each replica's own cache."""
    for cache in adapter_caches(engine):
        if cache.background_loads:
            cache.min_load_seconds = seconds
        else:
            _stall_loads(cache, seconds)


def _stall_loads(cache, seconds: float) -> None:
    take_load = cache.take_load
    seen = [cache.stats.loads]

    def stalled(needed_slots):
        new = cache.stats.loads - seen[0]
        seen[0] = cache.stats.loads
        if new > 0 and seconds > 0:
            time.sleep(new * seconds)
        return take_load(needed_slots)

    def forget_loads():  # loads made outside traffic (AdapterSlotLimit's placeholders) must not stall a step
        seen[0] = cache.stats.loads

    stalled.forget_loads = forget_loads
    cache.take_load = stalled


def _forget_loads(cache) -> None:
    forget = getattr(cache.take_load, "forget_loads", None)
    if forget is not None:
        forget()


class AdapterSlotLimit:
    """Shrinks the usable device adapter slots without recompiling: the pool's other slots are taken by
    placeholder adapters pinned for good (never evicted, so the LRU works over the remaining slots; the pool
    keeps its shape). With replicas, every replica keeps `slots` usable slots. `set` on an idle engine, before
    measuring."""

    def __init__(self, llm):
        self.llm, self.placeholders = llm, []

    def set(self, slots: int) -> None:
        from infinilora_jax.lora.random_adapter import random_adapter

        registry = self.llm.runner.adapters
        caches = adapter_caches(self.llm.engine)
        if not 1 <= slots <= registry.max_adapters:
            raise ValueError(f"slots={slots} must be within 1..{registry.max_adapters} (the pool's slots)")
        for name in self.placeholders:  # give the previous placeholders' slots back
            for cache in caches:
                cache.release(name)
            registry.unregister(name)
        self.placeholders = []
        for k in range(registry.max_adapters - slots):
            name = f"placeholder-{k}"
            registry.register_weights(random_adapter(self.llm.config, name, 1, ("q",), seed=10_000 + k,
                                                     dtype=self.llm.runner.dtype))
            for cache in caches:
                if cache.acquire(name) is None:
                    raise RuntimeError("no free adapter slot for a placeholder: is the engine idle?")
            self.placeholders.append(name)
        for cache in caches:
            cache.flush()
            _forget_loads(cache)


def set_policy(engine: LLMEngine, policy: str) -> None:
    """Switch the waiting queue's order ("fcfs" | "sjf") between runs."""
    for inst in base_instances(engine):  # an InstanceGroup: every instance's scheduler
        config = dataclasses.replace(inst.scheduler.config, policy=policy)
        inst.scheduler.config = inst.config = config
    engine.config = config


def enable_compilation_cache(path: str | None) -> None:
    """Keep every compiled program on disk (jax's persistent cache), so a benchmark's second run skips compiling."""
    compilation_cache.enable(path, min_compile_secs=0)


def benchmark_llm(model: str | None, num_adapters: int, rank: int, slots: int, *, targets=None, dtype="float32",
                  num_layers: int | None = None, max_num_seqs: int = 16, max_num_batched_tokens: int = 128,
                  max_model_len: int = 256, precompile: bool = True, workers: int = 2, share_from=None,
                  distinct: int | None = None, **llm_kwargs):
    """An LLM (bundled tiny model, or a configs/models/*.json shape with random weights) with `num_adapters`
    random rank-`rank` adapters named adapter-0.. registered, `slots` device adapter slots, every step shape
    compiled (unless precompile=False). llm_kwargs go to LLM (e.g. mode, mesh). `share_from`: an earlier
    benchmark LLM of the same model whose adapters are registered here as they are (the same host arrays: no
    second copy, no second generation; at real sizes each adapter is hundreds of MB). `distinct`: only the first
    `distinct` adapters get pages of their own, later ones reuse theirs in turn (each still its own adapter: own
    name, host entry and device slot; contents do not change step times, and host RNG at real widths takes
    seconds per adapter). Returns (llm, names)."""
    from infinilora_jax import LLM
    from infinilora_jax.lora.random_adapter import random_adapter
    from infinilora_jax.lora.targets import ALL_TARGETS

    targets = tuple(targets or ALL_TARGETS)
    llm = LLM(model, dtype=dtype, max_lora_rank=rank, max_adapters=slots, lora_targets=targets,
              max_host_adapters=num_adapters + slots, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, num_layers=num_layers, progress=False, **llm_kwargs)
    names = [f"adapter-{k}" for k in range(num_adapters)]
    made = []
    for k, name in enumerate(names):
        weights = share_from.runner.adapters.info(name) if share_from is not None else None
        if weights is None or weights.rank != rank:
            if distinct and k >= distinct:
                weights = dataclasses.replace(made[k % distinct], name=name)
            else:
                weights = random_adapter(llm.config, name, rank, targets, seed=k, dtype=llm.runner.dtype)
        made.append(weights)
        llm.runner.adapters.register_weights(weights)
    if precompile:
        llm.engine.warmup(progress=False, workers=workers)
    return llm, names
