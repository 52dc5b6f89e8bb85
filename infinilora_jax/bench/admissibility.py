"""Immediate admissibility: the share of requests whose adapter is already resident when they arrive.

With adapters requested independently with popularities p_i (Zipf(s) over N in the paper's workloads) and a
least-recently-used cache of C adapters, Che's approximation (Che, Tung and Wang, IEEE JSAC 2002) gives the hit
rate in closed form: the cache has a "characteristic time" T_C, the number of requests after which an adapter
not asked for again is evicted, fixed by

    sum_i (1 - exp(-p_i T_C)) = C          (the expected number of distinct adapters in T_C requests is C)

and adapter i is resident on arrival with probability h_i = 1 - exp(-p_i T_C); the hit rate is sum_i p_i h_i.
It is accurate for Zipf popularity at the cache sizes that matter (tests/test_slo.py checks it against
`lru_hits`, an exact LRU simulation, and against the engine's own adapter cache). Time is counted in requests, so
the hit rate does not depend on the request rate; it ignores pinning (a slot whose adapter is in use is not
evictable), which matters only when nearly every slot is in use at once.
"""

from __future__ import annotations

import collections

import numpy as np


def characteristic_time(popularity: np.ndarray, capacity: float) -> float:
    """T_C in requests (inf when the cache holds every adapter)."""
    p = np.asarray(popularity, np.float64)
    p = p[p > 0]
    if capacity >= len(p):
        return float("inf")
    if capacity <= 0:
        return 0.0

    def occupancy(t):
        return float(np.sum(-np.expm1(-p * t)))

    lo, hi = 0.0, capacity / p.max()
    while occupancy(hi) < capacity:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # bisection on a monotone function; 200 halvings reach float precision
        mid = (lo + hi) / 2
        if occupancy(mid) < capacity:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def che_hit_probabilities(popularity: np.ndarray, capacity: float) -> np.ndarray:
    """Per-adapter probability of being resident on arrival."""
    p = np.asarray(popularity, np.float64)
    t = characteristic_time(p, capacity)
    return np.ones_like(p) if np.isinf(t) else -np.expm1(-p * t)


def che_hit_rate(popularity: np.ndarray, capacity: float) -> float:
    """Share of requests whose adapter is resident on arrival, for an LRU cache of `capacity` adapters."""
    p = np.asarray(popularity, np.float64)
    p = p / p.sum()
    return float(np.sum(p * che_hit_probabilities(p, capacity)))


def capacity_for_hit_rate(popularity: np.ndarray, target: float) -> int:
    """The smallest cache (in adapters) whose Che hit rate reaches `target` (len(popularity) if only all do)."""
    n = len(popularity)
    if target <= 0:
        return 0
    lo, hi = 0, n  # che_hit_rate(n) == 1 >= target; the hit rate grows with the capacity
    while lo < hi:
        mid = (lo + hi) // 2
        if che_hit_rate(popularity, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def lru_hits(sequence, capacity: int) -> np.ndarray:
    """Exact LRU: hits[j] is True when request j's item was resident when it arrived."""
    cache: collections.OrderedDict = collections.OrderedDict()
    hits = np.zeros(len(sequence), bool)
    for j, item in enumerate(sequence):
        if item in cache:
            hits[j] = True
            cache.move_to_end(item)
        elif capacity > 0:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[item] = None
    return hits


def simulated_hit_rate(popularity: np.ndarray, capacity: int, num_requests: int = 200_000, seed: int = 0,
                       warmup: int | None = None) -> float:
    """LRU hit rate on independent draws from `popularity`, after `warmup` requests (default 10 * capacity)."""
    p = np.asarray(popularity, np.float64)
    warmup = 10 * capacity if warmup is None else warmup
    draws = np.random.default_rng(seed).choice(len(p), warmup + num_requests, p=p / p.sum())
    return float(lru_hits(draws.tolist(), capacity)[warmup:].mean())
