"""Where an adapter's pages wait between the host store and a device slot, and how they get there.

By default in pinned host memory, so a load's copies to the device run as DMA inside the step that carries it
(layer-wise loading) or while steps go on (background loads), and the device holds no page of an adapter that
is not in a slot. INFINILORA_ADAPTER_STAGING (read when an adapter cache is made) picks another way:

  pinned      numpy -> pinned host memory (the default)
  via_device  numpy -> device memory -> pinned host memory. Under XLA's VMM allocator (selected by
              --xla_gpu_command_buffer_update_mode=SKIP_TEMP or SKIP_PROFILED, which give the step's CUDA graph
              stable addresses), jax 0.11.2 segfaulted putting a numpy array into pinned host memory on an H200
              (fifteenth session); this path avoids that transfer
  device      device memory only: staged adapters occupy device memory (no pinned host memory at all)
"""

from __future__ import annotations

import jax

from infinilora_jax.trace_choice import env_choice

ENV_VAR = "INFINILORA_ADAPTER_STAGING"
MODES = ("pinned", "via_device", "device")


def staging_mode() -> str:
    return env_choice(ENV_VAR, MODES, "pinned")


def memory_kind(mode: str) -> str:
    """The memory kind staged pages live in."""
    return "device" if mode == "device" else "pinned_host"


def stage(tree, shardings, mode: str):
    """Put a tree of numpy pages where `mode` stages them. shardings: one sharding or a matching tree, of any
    memory kind (the mode's replaces it)."""
    def kind(k: str):
        return jax.tree.map(lambda s: s.with_memory_kind(k), shardings,
                            is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if mode == "via_device":
        return jax.device_put(jax.device_put(tree, kind("device")), kind("pinned_host"))
    return jax.device_put(tree, kind(memory_kind(mode)))


__all__ = ["ENV_VAR", "MODES", "memory_kind", "stage", "staging_mode"]
