"""Serving metrics from finished requests: throughput, TTFT, TPOT, and per-adapter SLO attainment.

An adapter meets its SLO when more than `attainment` (90%) of its requests meet both the TTFT and TPOT targets
(the InfiniLoRA paper's definition). TPOT is (finish - first token) / (output tokens - 1). A run as a whole meets
the SLO (`meets_slo`, what the serviceable-rate search asks) when its P95 TTFT and its mean TPOT are within the
targets.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_s: float = 0.25  # P95 TTFT target per request
    tpot_s: float = 0.1  # mean TPOT target per request
    attainment: float = 0.9


@dataclasses.dataclass
class RequestTiming:
    adapter: str | None
    arrival: float
    first_token: float
    finish: float
    prompt_tokens: int
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(1, self.output_tokens - 1)


def summarize(timings: list[RequestTiming], wall_seconds: float, slo: SLO = SLO()) -> dict:
    ttft = np.array([t.ttft for t in timings])
    tpot = np.array([t.tpot for t in timings if t.output_tokens > 1])
    out_tokens = sum(t.output_tokens for t in timings)
    meets = {}
    for t in timings:
        ok = t.ttft <= slo.ttft_s and (t.output_tokens <= 1 or t.tpot <= slo.tpot_s)
        meets.setdefault(t.adapter, []).append(ok)
    per_adapter = {str(a): float(np.mean(v)) for a, v in meets.items()}
    return {
        "requests": len(timings),
        "wall_s": wall_seconds,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(t.prompt_tokens for t in timings),
        "output_tokens_per_s": out_tokens / wall_seconds,
        "requests_per_s": len(timings) / wall_seconds,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tpot_mean_s": float(tpot.mean()) if tpot.size else 0.0,
        "tpot_p95_s": float(np.percentile(tpot, 95)) if tpot.size else 0.0,
        "slo": dataclasses.asdict(slo),
        "requests_meeting_slo": float(np.mean([ok for v in meets.values() for ok in v])),
        "adapters_meeting_slo": float(np.mean([v > slo.attainment for v in per_adapter.values()])),
        "per_adapter_attainment": per_adapter,
    }


def meets_slo(summary: dict, slo: SLO = SLO()) -> bool:
    """P95 TTFT <= slo.ttft_s and mean TPOT <= slo.tpot_s (the paper's SLOs for the serviceable rate)."""
    return summary["ttft_p95_s"] <= slo.ttft_s and summary["tpot_mean_s"] <= slo.tpot_s
