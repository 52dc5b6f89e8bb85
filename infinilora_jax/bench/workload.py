"""Synthetic serving workloads: arrivals, adapter popularity, prompt and output lengths.

Arrivals are Poisson (exponential gaps) or bursty (gamma gaps with shape < 1, as BurstGPT's generator uses);
adapters are drawn Zipf(s) over N adapters (adapter 0 most popular); lengths come from a small set of named
distributions. Everything is seeded, so a workload is a pure function of its spec.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """kind: "fixed" (value) | "uniform" (low..high) | "lognormal" (median, sigma; clipped to low..high)."""

    kind: str = "uniform"
    low: int = 16
    high: int = 128
    median: float = 64.0
    sigma: float = 0.8
    value: int = 64

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.value, np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, n)
        if self.kind == "lognormal":
            return np.clip(np.round(rng.lognormal(np.log(self.median), self.sigma, n)), self.low, self.high).astype(
                np.int64)
        raise ValueError(f"unknown length distribution {self.kind!r}")

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """"64" (fixed), "16:128" (uniform) or "lognormal:64:0.8:16:512" (median, sigma, low, high)."""
        parts = spec.split(":")
        if len(parts) == 1:
            return cls("fixed", value=int(parts[0]))
        if parts[0] == "lognormal":
            median, sigma, low, high = parts[1:]
            return cls("lognormal", int(low), int(high), float(median), float(sigma))
        return cls("uniform", int(parts[0]), int(parts[1]))


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    rate: float = float("inf")  # requests per second; inf = all arrive at t=0 (offline throughput)
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps: 1 = Poisson, < 1 burstier
    num_adapters: int = 8
    zipf_s: float = 1.2
    base_fraction: float = 0.0  # share of requests with no adapter
    prompt_len: LengthDist = LengthDist("uniform", 16, 128)
    output_len: LengthDist = LengthDist("uniform", 16, 128)
    seed: int = 0


@dataclasses.dataclass
class WorkloadRequest:
    arrival: float  # seconds after the start
    adapter: int | None  # index into the adapter list, None = base model
    prompt: list[int]
    max_tokens: int


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def generate(spec: WorkloadSpec, vocab_size: int) -> list[WorkloadRequest]:
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if np.isinf(spec.rate):
        arrivals = np.zeros(n)
    else:
        gaps = rng.gamma(spec.burstiness, 1.0 / (spec.rate * spec.burstiness), n)
        arrivals = np.cumsum(gaps) - gaps[0]
    adapters = rng.choice(spec.num_adapters, n, p=zipf_weights(spec.num_adapters, spec.zipf_s)) \
        if spec.num_adapters else np.zeros(n, int)
    use_base = rng.random(n) < spec.base_fraction if spec.num_adapters else np.ones(n, bool)
    prompt_lens = spec.prompt_len.sample(rng, n)
    output_lens = spec.output_len.sample(rng, n)
    return [WorkloadRequest(float(arrivals[i]), None if use_base[i] else int(adapters[i]),
                            rng.integers(3, vocab_size, int(prompt_lens[i])).tolist(), int(output_lens[i]))
            for i in range(n)]
