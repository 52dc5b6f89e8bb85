"""Synthetic serving workloads: arrivals, adapter popularity, prompt and output lengths.

Arrivals are Poisson (exponential gaps) or bursty: gamma gaps of shape k < 1, as BurstGPT's generator uses; the
coefficient of variation of the gaps is CV = 1/sqrt(k) (`gamma_shape_for_cv`), so k = 0.25 doubles Poisson's CV
of 1. Adapters are drawn Zipf(s) over N adapters (adapter 0 most popular). Lengths come from named distributions,
including parametric BurstGPT-like fits (below). Everything is seeded, so a workload is a pure function of its spec.

BurstGPT-like lengths. The BurstGPT trace (HPMLL/BurstGPT: Azure ChatGPT/GPT-4 traffic, CC-BY-4.0) is not
available here, so these are parametric fits to the facts published about it, not fits to the trace itself:
  prompts    Zipf(1.1) over [low, high] (P(L) proportional to L^-1.1), the model BurstGPT's own workload
             generator uses for request lengths. Over [16, 4096]: median ~175, mean ~600, P95 ~2,860 tokens.
  responses  lognormal whose mean grows log-linearly with the prompt, fitted to the conversation-log summary:
             mean ~150 tokens at 250-token prompts and ~450 at 2,000-token prompts, i.e.
             mean(p) = max(40, 150 + 144.3 ln(p / 250)); sigma 1.08, so that the 5-95% band at the band's centre
             spans ~20-700 tokens (ln(700/20) / (2 * 1.645)); clipped to [low, high] (the trace reaches 12.5k).
`LengthDist.parse("burstgpt")` gives the prompt fit over [16, 4096] and `parse("burstgpt:16:1024")` another range;
`parse("burstgpt-response")` (or "burstgpt-response:1:1024") the response fit, drawn given each prompt's length.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BURSTGPT_PROMPT_ZIPF = 1.1
BURSTGPT_RESPONSE = {"mean_at_pivot": 150.0, "pivot": 250.0, "slope": 300.0 / np.log(8.0), "min_mean": 40.0,
                     "sigma": 1.08}  # mean 150 at 250-token prompts, 450 at 2,000 (slope per e-fold: 144.3)


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """kind: "fixed" (value) | "uniform" (low..high) | "lognormal" (median, sigma; clipped to low..high) |
    "zipf" (P(L) ~ L^-exponent over low..high) | "burstgpt-response" (lognormal given the prompt length, see the
    module docstring; clipped to low..high)."""

    kind: str = "uniform"
    low: int = 16
    high: int = 128
    median: float = 64.0
    sigma: float = 0.8
    value: int = 64
    exponent: float = BURSTGPT_PROMPT_ZIPF

    @property
    def conditional(self) -> bool:
        """Drawn given each request's prompt length."""
        return self.kind == "burstgpt-response"

    def sample(self, rng: np.random.Generator, n: int, prompt_lens: np.ndarray | None = None) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.value, np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, n)
        if self.kind == "lognormal":
            return self._clip(rng.lognormal(np.log(self.median), self.sigma, n))
        if self.kind == "zipf":
            support = np.arange(self.low, self.high + 1)
            w = support.astype(np.float64) ** -self.exponent
            return rng.choice(support, n, p=w / w.sum()).astype(np.int64)
        if self.kind == "burstgpt-response":
            if prompt_lens is None:
                raise ValueError("burstgpt-response lengths are drawn given the prompt lengths")
            p = BURSTGPT_RESPONSE
            mean = np.maximum(p["min_mean"], p["mean_at_pivot"] + p["slope"] * np.log(np.asarray(prompt_lens) /
                                                                                     p["pivot"]))
            median = mean * np.exp(-p["sigma"] ** 2 / 2)  # lognormal: mean = median * exp(sigma^2 / 2)
            return self._clip(rng.lognormal(np.log(median), p["sigma"]))
        raise ValueError(f"unknown length distribution {self.kind!r}")

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x), self.low, self.high).astype(np.int64)

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """"64" (fixed), "16:128" (uniform), "lognormal:64:0.8:16:512" (median, sigma, low, high),
        "zipf:1.1:16:4096" (exponent, low, high), "burstgpt[:low:high]" (prompts, default 16:4096) or
        "burstgpt-response[:low:high]" (responses, default 1:4096)."""
        parts = spec.split(":")
        try:
            if parts[0] == "burstgpt":
                low, high = (int(x) for x in parts[1:]) if len(parts) == 3 else (16, 4096)
                return cls("zipf", low, high, exponent=BURSTGPT_PROMPT_ZIPF)
            if parts[0] == "burstgpt-response":
                low, high = (int(x) for x in parts[1:]) if len(parts) == 3 else (1, 4096)
                return cls("burstgpt-response", low, high)
            if parts[0] == "zipf":
                exponent, low, high = parts[1:]
                return cls("zipf", int(low), int(high), exponent=float(exponent))
            if len(parts) == 1:
                return cls("fixed", value=int(parts[0]))
            if parts[0] == "lognormal":
                median, sigma, low, high = parts[1:]
                return cls("lognormal", int(low), int(high), float(median), float(sigma))
            low, high = parts
            return cls("uniform", int(low), int(high))
        except ValueError as e:
            raise ValueError(f"bad length distribution {spec!r}: {e}") from e


def gamma_shape_for_cv(cv: float) -> float:
    """Gamma shape k whose gaps have coefficient of variation cv (CV = 1/sqrt(k); cv = 1 is Poisson)."""
    if cv <= 0:
        raise ValueError(f"arrival CV must be positive, got {cv}")
    return 1.0 / cv**2


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    rate: float = float("inf")  # requests per second; inf = all arrive at t=0 (offline throughput)
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps: 1 = Poisson, < 1 burstier (CV = 1/sqrt(shape))
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
    prompt: list[int] | None  # token ids (None when the workload was generated without a vocabulary)
    max_tokens: int
    prompt_tokens: int = 0  # the prompt's length (set from `prompt` when that is given)

    def __post_init__(self):
        if self.prompt is not None:
            self.prompt_tokens = len(self.prompt)


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def generate(spec: WorkloadSpec, vocab_size: int | None) -> list[WorkloadRequest]:
    """The requests of a spec; with vocab_size None, prompts are lengths only (for the simulator). The arrivals,
    adapters and lengths do not depend on vocab_size."""
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
    output_lens = spec.output_len.sample(rng, n, prompt_lens)
    return [WorkloadRequest(float(arrivals[i]), None if use_base[i] else int(adapters[i]),
                            None if vocab_size is None else rng.integers(3, vocab_size, int(prompt_lens[i])).tolist(),
                            int(output_lens[i]), int(prompt_lens[i]))
            for i in range(n)]
