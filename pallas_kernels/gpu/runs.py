"""Work units straight from rows in place, shared by the shrink and the window-major expand: the decode glue cut.

Why: at decode the kernels themselves beat the reference's gather + einsum per expert (eighteenth session: Qwen3
gate_up at 512 rows 50 us against 85), but the XLA glue that builds their metadata did not. Grouping the rows
(group_rows: cumsums, searches), cutting groups into 64-row units (build_units: a cumsum and gathers) and
finding each 8-row window's pages (window_pairs, then with two scatters, a cummax and a cumsum) took ~48 tiny
launches per MoE layer in the 4-layer decode step (~75 us of device time, 1-7 us each; the kernels 80 us), and
the host re-points the step's CUDA graph at every one of them.

A run is a stretch of rows with work and one key (slot, or slot x expert) inside one 8-row window. Run units
are runs: the shrink reads a run's page once and stores its rows; the window-major expand's pairs are the same
runs (pair i of window w is that window's i-th run). Everything is computed per window from the rows' keys with
[Mx / 8, 8, 8] comparisons and sums (window_expand.window_runs, which window_pairs uses too), which XLA fuses
into a few kernels: no sort, no scan, no scatter. Rows stay where they are when they arrive grouped (the MoE
layer's (expert, slot) order: no gather of x, none of the delta back); other calls (dense rows in token order)
are sorted by key first (one argsort, the gather of x and of the delta back), since a run ends wherever the key
changes.

A page is read once per run, so once per 8-row window its rows touch: the form for decode, where most pages
serve one or two rows. Long runs of one page (prefill, few adapters) read it 8x more often than 64-row units do.

    units  Units with one entry per (window w, run i) at w * 8 + i (size 0: no such run); count = Mx
    pairs  WindowPairs over the same runs
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.units import Units, bucket_of, pages_of_keys
from pallas_kernels.gpu.window_expand import WINDOW, WindowPairs, at_run_start, window_runs
from pallas_kernels.layout import PageTable


def run_units(keys: jax.Array, active: jax.Array, table: PageTable, *, num_experts: int, mx: int,
              b_table: PageTable | None = None,
              buckets: tuple[int, ...] | None = None) -> tuple[Units, WindowPairs]:
    """(Units, WindowPairs) of the runs of rows [0, M) padded to mx rows (a multiple of 8, at least M); keys and
    active as grouping.group_rows takes them. Rows with no work (inactive, a rank-0 page) are in no run."""
    m = keys.shape[0]
    if mx % WINDOW or mx < m:
        raise ValueError(f"runs need a row count that is a multiple of {WINDOW} and at least {m}, got {mx}")
    nw = mx // WINDOW
    nb, page_row, b_page_row = pages_of_keys(keys, active, table, num_experts, b_table)

    def by_window(a, fill):  # [M] -> [nw, 8], padding rows `fill`
        return jnp.pad(a, (0, mx - m), constant_values=fill).reshape(nw, WINDOW)

    work = by_window(nb > 0, False)
    # a run starts at a row with work whose predecessor in the window has none or another key
    first, owner = window_runs(by_window(keys.astype(jnp.int32), -1), work)

    def at_start(a):  # [nw, 8] per row -> [nw, 8] per run: the value at the run's first row (0: no run)
        return at_run_start(first, owner, a)

    size = jnp.sum(owner, axis=2, dtype=jnp.int32).reshape(-1)
    used = size > 0
    row0 = jnp.arange(nw, dtype=jnp.int32)[:, None] * WINDOW + at_start(
        jnp.broadcast_to(jnp.arange(WINDOW, dtype=jnp.int32), (nw, WINDOW)))
    b_page = at_start(by_window(b_page_row, 0)).reshape(-1)
    bucket = bucket_of(at_start(by_window(nb, 0)).reshape(-1), table, buckets)
    units = Units(row0=jnp.where(used, row0.reshape(-1), 0), size=size,
                  page_row=at_start(by_window(page_row, 0)).reshape(-1), b_page_row=b_page,
                  count=jnp.full((1,), mx, jnp.int32), row_rank=(nb * table.rank_block).astype(jnp.int32),
                  bucket=jnp.where(used, bucket, 0).astype(jnp.int32))
    pairs = WindowPairs(count=jnp.sum(first, axis=1, dtype=jnp.int32), page=b_page, owner=owner)
    return units, pairs
