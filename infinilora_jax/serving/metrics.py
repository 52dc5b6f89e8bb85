"""Prometheus metrics of one server instance, in its own registry (so several servers can live in one process).

Updated by the engine thread after each step (queue depth, running requests, KV use, TTFT, TPOT, tokens) and read
at scrape time from the adapter cache (hits, misses, evictions, loads) and the scheduler (preemptions).
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "infinilora"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
RATE_WINDOW_S = 10.0

disable_created_metrics()  # no `*_created` series (process-wide; they only add noise to scrapes)


class _CacheCollector:
    """Adapter cache and scheduler counters, read when scraped."""

    def __init__(self, llm):
        self.llm = llm

    def describe(self):
        return []

    def collect(self):
        cache = self.llm.runner.adapters
        stats = cache.stats
        for name, value, doc in [
            ("hits", stats.hits, "requests whose adapter was already in a device slot"),
            ("misses", stats.misses, "requests whose adapter had to be loaded into a device slot"),
            ("evictions", stats.evictions, "adapters dropped from a device slot to make room"),
            ("loads", stats.loads, "adapter writes into device slots (including prefetches)"),
            ("disk_reads", stats.disk_reads, "adapters read from disk into the host store"),
        ]:
            c = CounterMetricFamily(f"{PREFIX}_adapter_cache_{name}", doc)
            c.add_metric([], value)
            yield c
        g = GaugeMetricFamily(f"{PREFIX}_adapters_registered", "adapters a request may name")
        g.add_metric([], len(cache.names()))
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_adapters_resident", "adapters in device slots (with replicas: copies "
                              "over every replica)")
        g.add_metric([], len(cache.slot_of))
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_adapter_slots", "device adapter slots (with replicas: over every replica)")
        g.add_metric([], getattr(cache, "total_slots", cache.max_adapters))
        yield g
        c = CounterMetricFamily(f"{PREFIX}_preemptions", "requests preempted for KV cache room (recompute)")
        c.add_metric([], self.llm.engine.scheduler.num_preemptions)
        yield c


class ServerMetrics:
    def __init__(self, llm):
        self.registry = r = CollectorRegistry()
        self.waiting = Gauge(f"{PREFIX}_num_requests_waiting", "requests queued for the engine", registry=r)
        self.running = Gauge(f"{PREFIX}_num_requests_running", "requests running in the engine", registry=r)
        self.kv_usage = Gauge(f"{PREFIX}_kv_cache_usage_ratio", "fraction of KV cache pages in use", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "mean time per output token after the "
                              "first, per request", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "time from arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram(f"{PREFIX}_engine_step_seconds", "engine step wall time",
                                   buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "finished engine requests by adapter and finish reason",
                                ["adapter", "finish_reason"], registry=r)
        self.step_errors = Counter(f"{PREFIX}_engine_step_errors", "engine steps that raised", registry=r)
        self.http_errors = Counter(f"{PREFIX}_http_errors", "error responses by status", ["status"], registry=r)
        self.tokens_per_second = Gauge(f"{PREFIX}_generation_tokens_per_second",
                                       f"generated tokens per second over the last {RATE_WINDOW_S:.0f} s",
                                       registry=r)
        self.tokens_per_second.set_function(self._rate)
        r.register(_CacheCollector(llm))
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    # ---- called by the engine thread ----

    def on_added(self, jobs) -> None:
        self.prompt_tokens.inc(sum(len(j.prompt_ids) for j in jobs))

    def on_step(self, engine, outputs, seconds: float) -> None:
        now = time.monotonic()
        self.step_time.observe(seconds)
        sched = engine.scheduler
        self.waiting.set(len(sched.waiting))
        self.running.set(len(sched.running))
        alloc = sched.allocator
        self.kv_usage.set(1.0 - alloc.num_free / alloc.capacity)
        new_tokens = sum(len(o.new_token_ids) for o in outputs)
        self.generation_tokens.inc(new_tokens)
        with self._lock:
            self._window.append((now, new_tokens))
        for out in outputs:
            req = engine.requests.get(out.request_id)
            if req is None:
                continue
            if len(req.output_token_ids) == 1 and req.first_token_time is not None:
                self.ttft.observe(req.first_token_time - req.arrival_time)
            if out.finished:
                self.on_finished(req)

    def on_finished(self, req) -> None:
        self.requests.labels(req.adapter or "", req.finish_reason or "abort").inc()
        if req.finish_time is None or req.first_token_time is None:
            return
        self.e2e.observe(req.finish_time - req.arrival_time)
        if len(req.output_token_ids) > 1:
            self.tpot.observe((req.finish_time - req.first_token_time) / (len(req.output_token_ids) - 1))

    def on_step_error(self) -> None:
        self.step_errors.inc()

    # ---- scrape ----

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                self._window.popleft()
            return sum(n for _, n in self._window) / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
