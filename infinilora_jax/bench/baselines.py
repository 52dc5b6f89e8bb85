"""The serving baselines the evaluation compares, in our own engine and in the simulator.

  coupled          S-LoRA style: each replica keeps adapters beside the base model, its spare memory (after the
                   KV cache its batch needs) serving as the adapter cache; FCFS.
  coupled+sjf      the same with shortest-job-first admission (prompt + max_tokens).
  coupled-reduced  the same with a reduced adapter cache: 40% of the spare memory to adapters, 60% to KV.
  disaggregated    base replicas hold no adapters; a LoRA server on its own devices holds one shared cache.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str
    mode: str  # "coupled" | "disaggregated"
    policy: str  # "fcfs" | "sjf"
    reduced_cache: bool = False


REDUCED_LORA_SHARE = 0.4  # coupled-reduced: share of spare memory for adapters (the rest for KV)

BASELINES = {b.name: b for b in (
    Baseline("coupled", "coupled", "fcfs"),
    Baseline("coupled+sjf", "coupled", "sjf"),
    Baseline("coupled-reduced", "coupled", "fcfs", reduced_cache=True),
    Baseline("disaggregated", "disaggregated", "fcfs"),
)}


def reduced_slots(coupled_slots: int) -> int:
    """Slots of the reduced cache on a device whose KV never binds (the CPU runs): 40% of the coupled cache."""
    return max(1, round(REDUCED_LORA_SHARE * coupled_slots))


def disaggregated_engine_available() -> bool:
    """Whether LLM takes mode="disaggregated" (the disaggregated engine is built elsewhere, in parallel)."""
    import inspect

    from infinilora_jax import LLM

    return "mode" in inspect.signature(LLM.__init__).parameters
