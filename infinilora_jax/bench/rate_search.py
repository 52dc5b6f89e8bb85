"""Serviceable request rate: the highest arrival rate whose run still meets the SLO, found by bisection.

`run_at_rate(rate) -> summary` runs (or simulates) the workload at one rate; `meets(summary) -> bool` says whether
that run met the SLO (default: metrics.meets_slo, P95 TTFT and mean TPOT within the targets). The search first
brackets the answer by doubling (or halving) from `start`, then bisects the bracket [highest passing rate, lowest
failing rate] until it is narrower than `rel_tol` of its low end or `max_probes` runs are spent. It assumes that
meeting the SLO is monotone in the rate; with noisy runs the answer is a rate that passed, next to one that failed.

    result = find_serviceable_rate(lambda r: summarize(run(r)), start=4.0)
    result.rate, result.probes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tqdm.auto import tqdm

from infinilora_jax.bench import metrics


@dataclasses.dataclass
class RateProbe:
    rate: float
    ok: bool
    summary: dict


@dataclasses.dataclass
class RateSearchResult:
    rate: float  # highest rate that met the SLO (0.0 if none did, max_rate if that did)
    failing_rate: float | None  # lowest rate that failed (None if none did)
    probes: list[RateProbe]

    def best_summary(self) -> dict | None:
        """The summary of the run at `rate`."""
        return next((p.summary for p in self.probes if p.ok and p.rate == self.rate), None)


def find_serviceable_rate(run_at_rate: Callable[[float], dict], meets: Callable[[dict], bool] | None = None, *,
                          start: float = 1.0, rel_tol: float = 0.1, max_probes: int = 12,
                          min_rate: float = 1e-3, max_rate: float = 1e6, progress: bool = True,
                          desc: str = "serviceable rate") -> RateSearchResult:
    if not 0 < min_rate <= start <= max_rate:
        raise ValueError(f"need 0 < min_rate <= start <= max_rate, got {min_rate=} {start=} {max_rate=}")
    if rel_tol <= 0 or max_probes < 1:
        raise ValueError(f"need rel_tol > 0 and max_probes >= 1, got {rel_tol=} {max_probes=}")
    meets = meets or metrics.meets_slo
    probes: list[RateProbe] = []
    lo, hi = None, None  # highest passing, lowest failing rate so far
    bar = tqdm(total=max_probes, desc=desc, disable=not progress, leave=False, unit="run")

    def probe(rate: float) -> bool:
        summary = run_at_rate(rate)
        ok = bool(meets(summary))
        probes.append(RateProbe(rate, ok, summary))
        bar.update(1)
        bar.set_postfix(rate=f"{rate:.4g}", ok=ok)
        return ok

    rate = start
    while len(probes) < max_probes:  # bracket
        if probe(rate):
            lo = rate
            if hi is not None or rate >= max_rate:
                break
            rate = min(2 * rate, max_rate)
        else:
            hi = rate
            if lo is not None or rate <= min_rate:
                break
            rate = max(rate / 2, min_rate)
    while lo is not None and hi is not None and (hi - lo) > rel_tol * lo and len(probes) < max_probes:  # bisect
        mid = (lo + hi) / 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    bar.close()
    return RateSearchResult(lo if lo is not None else 0.0, hi, probes)
