"""A Mosaic GPU kernel in several step programs is lowered once (pallas_kernels/gpu/kernel_lowering_cache.py) and
named by content (kernel_names.py): one `kernel_hash`, so the XLA custom call compiles it once per process, and a
program's HLO does not depend on what the process lowered before it. Lowered for CUDA on CPU."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu import lowering as pallas_mgpu_lowering
from jax.experimental.mosaic.gpu import core as mgpu_core

from infinilora_jax.models import grouped_matmul as gm
from pallas_kernels import dispatch
from pallas_kernels.gpu import kernel_lowering_cache, kernel_names
from pallas_kernels.gpu.block_tables import GpuBlocks

BF = jnp.bfloat16
sds = jax.ShapeDtypeStruct


def lowered(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def kernels(fn, *args) -> list[tuple[str, str]]:
    """(dump basename, kernel_hash) of every Mosaic GPU custom call in fn's program lowered for CUDA."""
    text = lowered(fn, *args)
    names = re.findall(r"dump_basename\\00([A-Za-z0-9_]+)\\00", text)
    hashes = re.findall(r'kernel_hash = "([^"]*)"', text)
    assert len(names) == len(hashes) == text.count("custom_call @mosaic_gpu"), (names, len(hashes))
    return list(zip(names, hashes))


def lora_program(scale: float, rows: int = 128):
    """A program with one dense LoRA call (a shrink and an expand kernel) and something else around it."""
    def step(y, x, slots, a, b):
        return dispatch.add_lora(y, x, slots, a, b, backend=dispatch.LoraBackend.GPU, blocks=GpuBlocks()) * scale
    h, r, s = 256, 16, 4
    return step, sds((rows, h), BF), sds((rows, h), BF), sds((rows,), jnp.int32), sds((s, h, r), BF), \
        sds((s, r, h), BF)


def test_one_kernel_in_two_programs_has_one_hash():
    first = kernels(*lora_program(1.0))
    second = kernels(*lora_program(2.0))
    assert len(first) == 2 and first == second
    assert all(re.fullmatch(r"body_[0-9a-f]{16}", name) for name, _ in first)
    # different kernels keep different names and hashes
    other = kernels(*lora_program(1.0, rows=256))
    assert not set(other) & set(first)


def test_jax_numbering_gave_each_program_its_own_kernels(monkeypatch):
    """What install() works around: with jax's own counter names (the unwrapped function), the same kernels in
    two programs got two names and two hashes (each lowered afresh: the lowering cache is off here)."""
    monkeypatch.setattr(mgpu_core.dialect, "get_or_set_dump_options",
                        mgpu_core.dialect.get_or_set_dump_options.__wrapped__)
    monkeypatch.setattr(pallas_mgpu_lowering, "lower_unpipelined_jaxpr_to_module",
                        pallas_mgpu_lowering.lower_unpipelined_jaxpr_to_module.__wrapped__)
    first, second = kernels(*lora_program(1.0)), kernels(*lora_program(2.0))
    assert all(re.fullmatch(r"body_[0-9]+", name) for name, _ in first + second)
    assert not set(first) & set(second)


def test_expert_gemm_shares_its_kernel_across_programs():
    args = (sds((256, 128), BF), sds((8, 128, 128), BF), sds((8,), jnp.int32))
    progs = [lambda x, w, g, c=c: gm.IMPLEMENTATIONS["mgpu"](x, w, g, out_dtype=BF, precision=None) * c
             for c in (1.0, 2.0)]
    first, second = (kernels(p, *args) for p in progs)
    assert len(first) == 1 and first == second


def test_install_is_idempotent_and_can_be_turned_off(monkeypatch):
    wrapped = mgpu_core.dialect.get_or_set_dump_options
    assert kernel_names.install() and kernel_names.install()
    assert mgpu_core.dialect.get_or_set_dump_options is wrapped  # not wrapped twice
    monkeypatch.setenv(kernel_names.ENV_VAR, "counter")
    assert not kernel_names.install()
    monkeypatch.setenv(kernel_names.ENV_VAR, "sometimes")
    with pytest.raises(Exception, match="INFINILORA_MOSAIC_KERNEL_NAMES"):
        kernel_names.install()


def test_a_kernel_is_lowered_once_and_the_program_is_unchanged(monkeypatch):
    """The second program's shrink and expand come from the lowering cache (no new lowering), and both programs'
    HLO equals a lowering without the cache."""
    cache = kernel_lowering_cache.CACHE
    hits, misses = cache.hits, cache.misses
    first = lowered(*lora_program(4.0, rows=192))  # a shape no other test lowers
    assert (cache.hits - hits, cache.misses - misses) == (0, 2)
    second = lowered(*lora_program(5.0, rows=192))
    assert (cache.hits - hits, cache.misses - misses) == (2, 2)
    monkeypatch.setattr(pallas_mgpu_lowering, "lower_unpipelined_jaxpr_to_module",
                        pallas_mgpu_lowering.lower_unpipelined_jaxpr_to_module.__wrapped__)
    assert lowered(*lora_program(4.0, rows=192)) == first
    assert lowered(*lora_program(5.0, rows=192)) == second
    assert cache.misses - misses == 2


def test_lowering_cache_install_is_idempotent_and_can_be_turned_off(monkeypatch):
    memoized = pallas_mgpu_lowering.lower_unpipelined_jaxpr_to_module
    assert memoized.memoized and kernel_lowering_cache.install()
    assert pallas_mgpu_lowering.lower_unpipelined_jaxpr_to_module is memoized
    monkeypatch.setenv(kernel_lowering_cache.ENV_VAR, "off")
    assert not kernel_lowering_cache.install()
