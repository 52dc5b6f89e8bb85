"""Per-device block sizes of the TPU LoRA kernels, read from tuned_blocks.json.

Key: "<device>/<dtype>", device one of v4, v5e, v5p, v6e, v7x (from `jax.Device.device_kind`) or "interpret"
(CPU tests), dtype the activation dtype ("bfloat16", "float32"). Value: the fields of `ops.Blocks` plus
"measured" (false until tools/tune_tpu_lora_blocks.py has timed candidates on that device and rewritten the
entry, adding the jax version and device kind). Today no entry is measured: they are heuristics.
A missing key falls back to `DEFAULT` with a logged warning. `blocks_for` then adapts the entry to the problem:
the rank block must divide the pool rank, and tiles shrink until the kernels fit the device's VMEM.
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp

from pallas_kernels import block_table_file
from pallas_kernels.tpu.expand import expand_vmem_bytes, pick_column_tile
from pallas_kernels.tpu.ops import Blocks
from pallas_kernels.tpu.shrink import shrink_vmem_bytes

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_blocks.json")
DEFAULT = Blocks()
# MiB our estimate may reach; common.vmem_limit raises the scoped limit to ~1.25x that, below the physical VMEM
# (16 MiB on v4, 128 on v5e/v6e, 64 on v5p/v7x per jax's tpu_info).
VMEM_BUDGET = {"v4": 12, "v5e": 48, "v5p": 40, "v6e": 48, "v7x": 40, "interpret": 12}
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                 "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU7x": "v7x"}


def device_key(device_kind: str) -> str:
    """Short device name of a `device_kind` string ("TPU v5 lite" -> "v5e"); unknown kinds pass through."""
    return _DEVICE_KINDS.get(device_kind, device_kind)


def table_key(device: str, dtype) -> str:
    return f"{device}/{jnp.dtype(dtype).name}"


@functools.cache
def _lookup(device: str, dtype_name: str) -> Blocks:
    return block_table_file.settings(TABLE_PATH, table_key(device, dtype_name), Blocks, DEFAULT,
                                     "tuned LoRA kernel blocks", "tools/tune_tpu_lora_blocks.py")


def blocks_for(device: str, dtype, *, d_in: int, out_widths: tuple[int, ...], max_rank: int) -> Blocks:
    """The table's blocks for (device, dtype), adapted to one problem.

    rank_block: the table's value (at least 16 for 16-bit pages); for 32-bit pages 8 when that divides max_rank
    and the table's value does not (otherwise the pool rank is zero-padded per call).
    token_tile, col_tile (prefill) and decode_col_tile, then decode_rows (decode): shrunk until shrink and
    expand fit the device's VMEM budget (x tiles hold the whole D_in; y tiles are counted as float32).
    """
    base = _lookup(device, jnp.dtype(dtype).name)
    # 16-bit pages pack 16 rows per sublane tile: rank blocks stay multiples of 16 (the pool is zero-padded when
    # its rank is not); 32-bit pages may fall back to 8 when that divides the pool rank.
    floor = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    rb = max(base.rank_block, floor)
    if max_rank % rb and floor == 8 and max_rank % 8 == 0:
        rb = 8
    budget = VMEM_BUDGET.get(device, 12) * 2**20
    rows = -(-max_rank // rb) * rb * len(out_widths)

    def fits(tm: int, col_tile: int) -> bool:
        tns = tuple(pick_column_tile(n, col_tile) for n in out_widths)
        return max(shrink_vmem_bytes(tm, d_in, rows, rb, dtype, dtype),
                   expand_vmem_bytes(tm, tns, rows, rb, [jnp.float32] * len(tns), [dtype] * len(tns))) <= budget

    half = lambda v: max(128, v // 2 // 128 * 128)
    tm, col = base.token_tile, base.col_tile
    while tm > 128 and not fits(tm, col):
        tm = half(tm)
    while col > 128 and not fits(tm, col):
        col = half(col)
    dec_rows, dec_col = base.decode_rows, base.decode_col_tile
    while dec_col > 128 and not fits(dec_rows, dec_col):
        dec_col = half(dec_col)
    while dec_rows > 8 and not fits(dec_rows, dec_col):
        dec_rows //= 2
    return Blocks(token_tile=tm, col_tile=col, decode_col_tile=dec_col, rank_block=rb, decode_rows=dec_rows)
