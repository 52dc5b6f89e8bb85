"""InfiniLoRA-JAX: multi-LoRA serving for mixture-of-experts LLMs."""

from infinilora_jax.sampling import SamplingParams

__all__ = ["LLM", "GenerationResult", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM is imported on first use: importing it here would import meshes, whose layouts import
    # infinilora_jax.errors, i.e. this package, so `import meshes` first would be a circular import.
    if name in ("LLM", "GenerationResult"):
        from infinilora_jax import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'infinilora_jax' has no attribute {name!r}")
