"""Matplotlib PNGs for the SLO evaluation: SLO attainment and P95 TTFT against the request rate, the per-adapter
attainment CDF, and cache size against admissibility rate."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versus_rate(series: dict[str, list[tuple[float, float]]], ylabel: str, path: str, *, target: float | None = None,
                dashed: dict[str, list[tuple[float, float]]] | None = None, title: str = "",
                logy: bool = False, xlabel: str = "request rate (requests/s)", logx: bool = False) -> None:
    """One line per label over (rate, value) points; `dashed` lines (e.g. the simulator) share the colours of
    the solid ones with the same label; `target` draws the SLO line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {}
    for label, pts in series.items():
        pts = sorted(pts)
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        colours[label] = line.get_color()
    for label, pts in (dashed or {}).items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="x", color=colours.get(label),
                label=f"{label} (simulated)")
    if target is not None:
        ax.axhline(target, color="r", ls=":", label="SLO")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def attainment_cdf(per_adapter: dict[str, dict[str, float]], threshold: float, path: str, title: str = "") -> None:
    """CDF over adapters of the share of each adapter's requests meeting the SLO, one line per label."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, att in per_adapter.items():
        x = np.sort(np.asarray(list(att.values()), np.float64))
        if not x.size:
            continue
        ax.plot(np.concatenate([[0], x]), np.concatenate([[0], np.arange(1, x.size + 1) / x.size]),
                drawstyle="steps-post", label=label)
    ax.axvline(threshold, color="r", ls=":", label=f"adapter meets SLO (> {threshold:.0%})")
    ax.set(xlabel="share of an adapter's requests meeting the SLO", ylabel="share of adapters (CDF)",
           xlim=(-0.02, 1.02), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def cache_admissibility(capacities, curves: dict[str, list[float]], path: str, *,
                        points: dict[str, list[tuple[float, float]]] | None = None,
                        required: float | None = None, chosen: int | None = None, title: str = "",
                        logx: bool = False) -> None:
    """Admissibility (hit) rate against cache capacity: model curves, and measured points."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, ys in curves.items():
        ax.plot(capacities, ys, label=label)
    for label, pts in (points or {}).items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=label)
    if required is not None:
        ax.axhline(required, color="r", ls=":", label=f"required {required:.2f}")
    if chosen is not None:
        ax.axvline(chosen, color="g", ls=":", label=f"planned capacity {chosen}")
    ax.set(xlabel="adapter cache capacity (adapters)", ylabel="immediate admissibility (hit rate)",
           ylim=(0, 1.02), title=title)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
