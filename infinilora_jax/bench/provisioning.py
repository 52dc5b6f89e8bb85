"""SLO-driven provisioning: how large an adapter cache, and how many LoRA-server devices in what layout.

1. Admissibility needed. A request whose adapter is not resident waits for a cold load (`miss_penalty_s`). With
   hit-path TTFTs t (samples or one value), a hit violates the TTFT target with probability v_h = P(t > SLO) and
   a miss with v_m = P(t + penalty > SLO); the P95 TTFT meets the SLO when (1 - h) v_m + h v_h <= 5%, so the
   immediate-admissibility (hit) rate must be at least

       h* = (v_m - 0.05) / (v_m - v_h)        (0 when v_m <= 0.05; infeasible when v_h > 0.05)

2. Cache capacity. The smallest LRU cache whose hit rate under the workload's adapter popularity reaches h*
   (Che's approximation, bench/admissibility.py), in adapters and bytes.
3. LoRA-server layout. For each device count d, every EP x PP = d (EP dividing the experts): layers are split
   into PP contiguous stages by a dynamic program that minimises the largest stage's adapter bytes per device
   (attention/router pages are replicated over EP, expert pages split over it); a device's cache holds
   floor(usable memory / that stage's bytes) adapters, the cluster's capacity is the smallest stage's. A layout
   is feasible when it holds the capacity from (2) and each layer's LoRA work for the adapters of one step
   fits in the per-layer time budget: each adapter's replicated pages plus the expert pages its tokens touch
   (a share 1 - (1 - k/E)^(tokens per adapter) of its experts), read from HBM at the device's bandwidth. The plan is the
   feasible layout with the fewest devices (then the largest cache, then the shortest layer time).

Memory and bandwidth numbers are the caller's (the CLI's defaults describe an H200: 141 GB, 3.2 TB/s measured
copy bandwidth (shared/design/GPU.md), 50 GB/s host-to-device, assumed, not measured here).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from infinilora_jax.bench import admissibility
from infinilora_jax.bench.model_shapes import DEFAULT_TARGETS, ModelShape


@dataclasses.dataclass(frozen=True)
class Device:
    memory_bytes: float = 141e9
    hbm_bytes_per_s: float = 3.2e12
    h2d_bytes_per_s: float = 50e9
    reserve_fraction: float = 0.1  # kept for activations, exchange buffers and the runtime

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * (1 - self.reserve_fraction)


def required_admissibility(slo_ttft_s: float, hit_ttft_s, miss_penalty_s: float, quantile: float = 0.95) -> float:
    """The hit rate h* at which the `quantile` TTFT meets slo_ttft_s (see the module docstring); inf when no hit
    rate does (the hit path alone misses the target)."""
    t = np.atleast_1d(np.asarray(hit_ttft_s, np.float64))
    allowed = 1 - quantile
    v_hit = float(np.mean(t > slo_ttft_s))
    v_miss = float(np.mean(t + miss_penalty_s > slo_ttft_s))
    if v_hit > allowed:
        return math.inf
    if v_miss <= allowed:
        return 0.0
    return (v_miss - allowed) / (v_miss - v_hit)


@dataclasses.dataclass(frozen=True)
class CachePlan:
    required_hit_rate: float
    capacity: int  # adapters (num_adapters when even all of them do not reach the target)
    capacity_bytes: float
    predicted_hit_rate: float  # Che at `capacity`
    reachable: bool


def plan_cache(popularity: np.ndarray, required_hit_rate: float, adapter_bytes: float) -> CachePlan:
    n = len(popularity)
    if not math.isfinite(required_hit_rate) or required_hit_rate > 1:
        return CachePlan(required_hit_rate, n, n * adapter_bytes, 1.0, False)
    capacity = admissibility.capacity_for_hit_rate(popularity, required_hit_rate)
    hit = admissibility.che_hit_rate(popularity, capacity)
    return CachePlan(required_hit_rate, capacity, capacity * adapter_bytes, hit, hit >= required_hit_rate)


# ---- LoRA-server layout ----

def partition_layers(costs: list[float], stages: int) -> tuple[float, list[tuple[int, int]]]:
    """Split layers (with per-layer costs) into `stages` contiguous, non-empty stages minimising the largest
    stage's total: best[s][j] = min over i of max(best[s-1][i], sum(costs[i:j])). Returns (that largest total,
    [(first, last + 1), ...])."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    best = np.full((stages + 1, n + 1), math.inf)
    cut = np.zeros((stages + 1, n + 1), int)
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], prefix[j] - prefix[i])
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        bounds.append((int(i), int(j)))
        j = i
    return float(best[stages][n]), bounds[::-1]


@dataclasses.dataclass(frozen=True)
class ServerLayout:
    devices: int
    ep: int
    pp: int
    stages: tuple  # ((first layer, last layer + 1), ...)
    adapter_bytes_per_device: float  # one adapter's pages on the busiest device
    capacity: int  # adapters the server holds (every device holds its share of each)
    cache_bytes_per_device: float
    layer_ms: float  # slowest layer's LoRA work for `step_adapters` adapters
    load_ms: float  # one cold adapter: every device loads its share at once
    feasible: bool
    why_not: str = ""


def plan_lora_server(shape: ModelShape, rank: int, device: Device, required_capacity: int, *,
                     targets=DEFAULT_TARGETS, dtype_bytes: int = 2, max_devices: int = 8, step_adapters: int = 32,
                     step_tokens: int = 64, layer_budget_ms: float = math.inf,
                     gate_up_rank_factor: int = 1) -> list[ServerLayout]:
    """For d = 1..max_devices, the best EP x PP layout on d devices (see the module docstring); each row says
    whether it meets `required_capacity` and the per-layer budget for a step of `step_tokens` tokens over
    `step_adapters` adapters (the LoRA server's step: every base replica's batch)."""
    split = [shape.adapter_layer_split(layer, rank, targets, dtype_bytes, gate_up_rank_factor)
             for layer in range(shape.num_layers)]
    touched = 1 - (1 - shape.top_k / max(shape.num_experts, 1)) ** max(step_tokens / max(step_adapters, 1), 1)
    rows = []
    for d in range(1, max_devices + 1):
        best = None
        for ep in (e for e in range(1, d + 1) if d % e == 0 and shape.num_experts % e == 0):
            pp = d // ep
            if pp > shape.num_layers:
                continue
            per_device = [r + s / ep for r, s in split]
            worst, stages = partition_layers(per_device, pp)
            capacity = int(device.usable_bytes // worst)
            layer_ms = 1e3 * step_adapters * max(r + s * touched / ep for r, s in split) / device.hbm_bytes_per_s
            load_ms = 1e3 * worst / device.h2d_bytes_per_s  # devices load their shares in parallel
            why = []
            if capacity < required_capacity:
                why.append(f"holds {capacity} < {required_capacity} adapters")
            if layer_ms > layer_budget_ms:
                why.append(f"layer {layer_ms:.3f} ms > budget {layer_budget_ms:.3f} ms")
            row = ServerLayout(d, ep, pp, tuple(stages), worst, capacity, capacity * worst, layer_ms, load_ms,
                               not why, "; ".join(why))
            key = (row.feasible, row.capacity, -row.layer_ms)
            if best is None or key > (best.feasible, best.capacity, -best.layer_ms):
                best = row
        if best is not None:
            rows.append(best)
    return rows


def choose(layouts: list[ServerLayout]) -> ServerLayout | None:
    """The feasible layout with the fewest devices, or None."""
    return next((row for row in layouts if row.feasible), None)


@dataclasses.dataclass(frozen=True)
class CoupledCache:
    """What a coupled replica (base weights + KV + adapter cache on the same devices) can cache."""

    devices: int
    spare_bytes: float  # usable memory left after the base weights
    lora_share: float  # of the spare memory, to the adapter cache (the rest to KV)
    capacity: int
    kv_tokens: int


def coupled_cache(shape: ModelShape, adapter_bytes: float, device: Device, lora_share: float,
                  devices: int | None = None, dtype_bytes: int = 2) -> CoupledCache:
    """A coupled replica's adapter cache and KV capacity; `devices` defaults to the fewest (a power of two) whose
    usable memory leaves at least a fifth of it spare after the weights."""
    weights = shape.weight_bytes(dtype_bytes)
    if devices is None:
        devices = 1
        while devices * device.usable_bytes - weights < devices * device.usable_bytes / 5:
            devices *= 2
    spare = devices * device.usable_bytes - weights
    if spare <= 0:
        raise ValueError(f"{shape.name}: {weights / 1e9:.1f} GB of weights do not fit on {devices} devices")
    return CoupledCache(devices, spare, lora_share, int(spare * lora_share // adapter_bytes),
                        int(spare * (1 - lora_share) // shape.kv_bytes_per_token(dtype_bytes)))
