"""A step's host-built inputs (numpy arrays: the batch, sampling rows, a load's slot) as one int32 buffer.

Each numpy argument of a jitted call is its own host-to-device transfer, and on the GPU each costs far more host
time than bytes: an H200 profile of a decode step (docs/benchmarks.md, thirteenth session) showed 14 transfers
of a few hundred bytes, each ~60-100 us of the PjRt client's staging, copy and completion callbacks (~1.2 ms
under the profiler) before the step's first kernel. Packed, the step's host inputs cross in one transfer (per
device) and the program slices them back out, which costs it a few fused slices.

Leaves of 4-byte dtypes travel bit for bit; bool leaves as 0/1 words. Other dtypes are not packed (`packable`).
"""

from __future__ import annotations

import math

import jax
import numpy as np

WORD = np.dtype(np.int32)


def packable(leaf) -> bool:
    """A host array the buffer can carry exactly."""
    return isinstance(leaf, (np.ndarray, np.generic)) and (leaf.dtype.itemsize == 4 or leaf.dtype == np.bool_)


def layout_of(leaves) -> tuple[tuple[tuple[int, ...], str], ...]:
    """(shape, dtype name) per leaf: static, it decides how `unpack` slices the buffer."""
    return tuple((tuple(np.shape(a)), np.dtype(a.dtype).name) for a in leaves)


def pack(leaves) -> np.ndarray:
    """Host arrays (all `packable`) -> one int32 buffer holding their elements in order."""
    parts = [np.asarray(a).reshape(-1) for a in leaves]
    parts = [p.astype(WORD) if p.dtype == np.bool_ else p.view(WORD) for p in parts]
    return np.concatenate(parts) if parts else np.zeros(0, WORD)


def unpack(words: jax.Array, layout) -> list[jax.Array]:
    """Traced code: the buffer `pack` made -> the arrays, of the shapes and dtypes in `layout`."""
    out, offset = [], 0
    for shape, dtype in layout:
        size = math.prod(shape)
        chunk = words[offset: offset + size].reshape(shape)
        offset += size
        if dtype == "bool":
            out.append(chunk != 0)
        elif dtype == WORD.name:
            out.append(chunk)
        else:
            out.append(jax.lax.bitcast_convert_type(chunk, np.dtype(dtype)))
    return out


__all__ = ["layout_of", "pack", "packable", "unpack"]
