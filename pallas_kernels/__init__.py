"""Multi-LoRA kernels (shrink / expand for dense and per-expert LoRA; decode and prefill variants).

`dispatch` is the entry point: `lora_delta` / `expert_lora_delta` (the reference's signatures) and `add_lora*`
(y + delta rounded once, several outputs per launch), choosing the Mosaic TPU kernels (`tpu/`) on TPU and the
pure-JAX reference (infinilora_jax/lora/reference.py, re-exported here) elsewhere; the Mosaic GPU kernels come
next. `layout` is the adapter page layout the kernels read, `grouping` the row grouping they share.
See docs/architecture/06-lora-kernels.md.
"""

from infinilora_jax.lora.reference import add_delta
from infinilora_jax.lora.reference import expert_lora_delta as reference_expert_lora_delta
from infinilora_jax.lora.reference import lora_delta as reference_lora_delta
from pallas_kernels.dispatch import (
    LoraBackend,
    add_expert_lora,
    add_lora,
    add_lora_fused,
    expert_lora_delta,
    lora_delta,
    select_backend,
    use_backend,
)

__all__ = ["LoraBackend", "add_delta", "add_expert_lora", "add_lora", "add_lora_fused", "expert_lora_delta",
           "lora_delta", "reference_expert_lora_delta", "reference_lora_delta", "select_backend", "use_backend"]
