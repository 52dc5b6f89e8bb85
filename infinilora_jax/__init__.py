"""InfiniLoRA-JAX: multi-LoRA serving for mixture-of-experts LLMs."""

from infinilora_jax.llm import LLM, GenerationResult
from infinilora_jax.sampling import SamplingParams

__all__ = ["LLM", "GenerationResult", "SamplingParams"]
__version__ = "0.1.0"
