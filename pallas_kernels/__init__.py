"""Multi-LoRA kernels (shrink / expand, dense and per-expert) for GPU (Mosaic GPU) and TPU (Mosaic TPU).

Every kernel is checked against the pure-JAX reference re-exported here (the definition lives in
infinilora_jax/lora/reference.py, where the model uses it today). The kernels themselves, their tuned block
tables and the dispatcher arrive with the kernel issue; until then the model runs the reference.
"""

from infinilora_jax.lora.reference import add_delta, expert_lora_delta, lora_delta

__all__ = ["add_delta", "expert_lora_delta", "lora_delta"]
