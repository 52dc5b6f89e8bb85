"""Per-device settings of the GPU LoRA kernels, read from tuned_blocks.json beside them.

Key: "<device>/<dtype>", device from `jax.Device.device_kind` ("NVIDIA H200" -> "h200", "NVIDIA H100 80GB
HBM3" -> "h100"; "interpret" for the Mosaic GPU interpreter on CPU), dtype the 16-bit activation / page dtype.
Value: the fields of `GpuBlocks` plus provenance: "measured" (true once tools/tune_gpu_lora_blocks.py has timed
candidates on that device and rewritten the entry, with the jax version and device kind) and "source".
A missing key falls back to `DEFAULT` with one logged warning per key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax.numpy as jnp

from pallas_kernels import block_table_file
from pallas_kernels.gpu.units import UNIT_ROWS

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_blocks.json")
INTERPRET = "interpret"
STAGE_CHOICES = (2, 3, 4, 5, 6)  # TMA copies in flight: more hides latency, each costs (64 + R) x 128 B of SMEM
EXPAND_COL_CHOICES = (64, 128, 256)  # one TMA box is at most 256 columns
KSPLIT_CHOICES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """What the GPU kernels leave to tuning (the 64-row unit window and the 64-column K block are fixed by
    wgmma and the 128-byte swizzle)."""
    stages: int = 4  # shrink: TMA pipeline depth (blocks of x and A in flight per CTA)
    decode_ksplit: int = 4  # shrink, decode variant: D_in slices per unit, so few adapters still fill the SMs
    decode_rows: int = 512  # calls of up to this many rows use the decode variant (ksplit), larger the prefill one
    expand_cols: int = 128  # expand: output columns per tile
    # expand: column tiles per CTA, streamed through a pipeline of `stages` B blocks (0: all of a target's
    # tiles; a CTA takes the largest divisor of the tile count <= this). 1: one tile per CTA, no pipeline:
    # at per-expert decode (one row per unit) each CTA then moves one 8 KB block, and the H200 ran the expand at
    # ~1.3 TB/s, half the shrink's rate (sixteenth session's step trace). Unmeasured above 1.
    expand_tiles: int = 1
    # Read each page at the narrowest rank bucket holding its adapter's rank (units.rank_buckets) instead of the
    # pool's full rank: fewer bytes for small adapters in a large-rank pool, one kernel path per bucket (more
    # compile time). Off until an H200 run says what it buys.
    rank_buckets: bool = False
    # Calls of up to this many rows use one work unit per row (units.per_row_units: no sort, no gathers; each
    # row reads its own page), larger calls group rows by page. 0: never. Off until an H200 run says what it buys.
    per_row_rows: int = 0
    # At least UNIT_ROWS (64, a unit's most rows): every unit takes the window-major expand (window_expand.py:
    # per 8-row window one CTA streams the B blocks of its rows' pages, d^T = B^T s^T; a page is read once per
    # 8-row window its unit touches); 0: the unit-major expand. Values in between (short units on windows,
    # long ones unit-major in the same launch) lost to both pure forms on the H200 and were removed (twentieth
    # session). H200, eighteenth session, every unit on windows: Qwen3 experts at 1.3-2.3 rows per page 1.4-1.8x
    # faster, Mixtral decode 1.4x; Mixtral at 8 rows per page and dense prefill (16-32 rows per page) 1.3-1.8x
    # slower.
    window_unit_rows: int = 0
    window_cols: int = 256  # window-major expand: output columns per CTA (its wgmma M)
    # Calls of up to this many rows take run units (runs.py: one unit per run of rows with one page inside an
    # 8-row window, straight from the rows' keys; rows in place when they arrive grouped, else sorted by key)
    # for the shrink and the window-major expand: no group facts, units or window pairs, each page read once
    # per run. Before per_row_rows and window_unit_rows. 0: never.
    run_rows: int = 0
    # The dispatcher's automatic choice (dispatch.select_backend): the kernels for calls of at least this many
    # rows, the reference's gather + einsum below. Not a block size, but a per-device crossover of the same
    # timings; it also weighs compile time (every kernel instance adds to an engine's start-up).
    kernel_min_rows: int = 1024
    # The same per pool rank, ((rank, min rows), ...) by rising rank: the reference gathers every row's whole
    # page (rows x rank x D_in), the kernels each distinct page once, so the crossover falls as the rank grows
    # (H200: 2,048 rows at rank 16, <= 128 at 64). A call takes the entry of the largest listed rank <= its
    # pool rank; kernel_min_rows when none is (or the list is empty).
    kernel_min_rows_by_rank: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        # JSON gives lists; the settings are hashed (cached lookups, jit static arguments)
        pairs = tuple((int(r), int(n)) for r, n in self.kernel_min_rows_by_rank)
        object.__setattr__(self, "kernel_min_rows_by_rank", pairs)
        problems = []
        if [r for r, _ in pairs] != sorted({r for r, _ in pairs}) or any(r < 1 or n < 0 for r, n in pairs):
            problems.append(f"kernel_min_rows_by_rank {pairs}: distinct ranks >= 1, rising, rows >= 0")
        if self.stages not in STAGE_CHOICES:
            problems.append(f"stages {self.stages} not in {STAGE_CHOICES}")
        if self.expand_cols not in EXPAND_COL_CHOICES:
            problems.append(f"expand_cols {self.expand_cols} not in {EXPAND_COL_CHOICES}")
        if self.decode_ksplit not in KSPLIT_CHOICES:
            problems.append(f"decode_ksplit {self.decode_ksplit} not in {KSPLIT_CHOICES}")
        if self.window_cols not in EXPAND_COL_CHOICES:
            problems.append(f"window_cols {self.window_cols} not in {EXPAND_COL_CHOICES}")
        if self.expand_tiles < 0:
            problems.append(f"expand_tiles {self.expand_tiles} must be >= 0 (0: every tile of a target)")
        if min(self.decode_rows, self.kernel_min_rows, self.per_row_rows, self.window_unit_rows, self.run_rows) < 0:
            problems.append("row counts must be >= 0")
        if 0 < self.window_unit_rows < UNIT_ROWS:
            problems.append(f"window_unit_rows {self.window_unit_rows}: 0 (unit-major expand) or >= {UNIT_ROWS} "
                            f"(every unit on windows); the mixed launch was removed")
        if problems:
            raise ValueError("GpuBlocks: " + "; ".join(problems))

    def min_rows_for(self, rank: int | None) -> int:
        """The dispatcher's kernels-vs-reference crossover for a call on a pool of rank `rank` (None: unknown)."""
        rows = self.kernel_min_rows
        for listed, listed_rows in self.kernel_min_rows_by_rank:
            if rank is not None and listed <= rank:
                rows = listed_rows
        return rows


DEFAULT = GpuBlocks()
FIELDS = tuple(f.name for f in dataclasses.fields(GpuBlocks))


def device_key(device_kind: str) -> str:
    """Short name of a GPU `device_kind`: its Hopper part number ("NVIDIA H100 80GB HBM3" -> "h100"; Grace
    Hopper parts keep "gh200"); other kinds are lower-cased whole."""
    match = re.search(r"\b(GH200|H200|H100|H800|H20)\b", device_kind, re.IGNORECASE)
    return match.group(1).lower() if match else device_kind.lower()


def table_key(device: str, dtype) -> str:
    return f"{device}/{jnp.dtype(dtype).name}"


def load_table(path: str = TABLE_PATH) -> dict[str, dict]:
    return block_table_file.load_table(path)


@functools.cache
def blocks_for(device: str, dtype_name: str) -> GpuBlocks:
    """The table's GpuBlocks for (device, dtype name), DEFAULT (and a warning) when it has none."""
    return block_table_file.settings(TABLE_PATH, table_key(device, dtype_name), GpuBlocks, DEFAULT,
                                     "GPU LoRA kernel settings", "tools/tune_gpu_lora_blocks.py")


def current_device_key(interpret: bool) -> str:
    import jax  # noqa: PLC0415 (at call time: the backend is chosen after import)
    return INTERPRET if interpret else device_key(jax.devices()[0].device_kind)


def write_entries(entries: dict[str, dict], path: str = TABLE_PATH) -> None:
    """Merge `entries` into the table at `path` (block_table_file.write_entries); lookups read it afresh."""
    block_table_file.write_entries(entries, path)
    blocks_for.cache_clear()
