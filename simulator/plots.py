"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from simulator.metrics import SimResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attainment(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    target: float | None = None,
    per_gpu: bool = False,
) -> Path:
    """SLO attainment vs request rate, one line per label; ``curves[label] = [(rate, attainment)]``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("rate per GPU (req/s)" if per_gpu else "rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def plot_cdfs(
    results: Mapping[str, SimResult], path: str | Path, metrics: Sequence[str] = ("ttft", "tpot")
) -> Path:
    """Empirical CDFs of per-request latencies, one panel per metric, one line per result."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for label, r in results.items():
            a = np.sort(r.array(m))
            a = a[~np.isnan(a)]
            if a.size:
                ax.plot(a, np.arange(1, a.size + 1) / a.size, label=label)
        ax.set_xlabel(f"{m} (s)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
