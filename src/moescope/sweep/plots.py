"""The sweep's figures (matplotlib, Agg), drawn from the aggregated rows of `grid.aggregate_cells`."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moescope.io.atomic import atomic_write_bytes  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _err(iv: dict[str, Any]) -> tuple[float, list[list[float]]]:
    """Mean and matplotlib's asymmetric error bar (zero width when there is no interval, n = 1)."""
    if iv.get("low") is None:
        return iv["mean"], [[0.0], [0.0]]
    return iv["mean"], [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]


def plot_nmi_vs_loss_difference(rows: list[dict[str, Any]], path: Path, confidence_level: float = 0.95) -> Path | None:
    """Best-layer NMI against the paired loss difference to dense, one point per (grid point, MoE arm)."""
    pts = [r for r in rows if r.get("nmi", {}).get("mean") is not None
           and r.get("loss_vs_dense", {}).get("mean") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    arms = sorted({r["arm"] for r in pts})
    markers = "osD^v<>P*"
    for r in pts:
        x, xerr = _err(r["loss_vs_dense"])
        y, yerr = _err(r["nmi"])
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=markers[arms.index(r["arm"]) % len(markers)], capsize=3,
                    alpha=0.85)
        label = "/".join(format(v, "g") if isinstance(v, float) else str(v) for v in r["point"].values())
        ax.annotate(label + (f" ({r['arm']})" if len(arms) > 1 else ""), (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    n = sorted({r["nmi"]["n"] for r in pts})
    ax.set_xlabel("held-out loss - dense (nats/token, paired; < 0 = MoE better)")
    ax.set_ylabel("best-layer NMI(domain; expert)")
    keys = " / ".join(k.rsplit(".", 1)[-1] for k in pts[0]["point"])
    ax.set_title(f"Specialization against cost: mean over seeds, {100 * confidence_level:.0f}% t-interval "
                 f"(n = {', '.join(map(str, n))})" + (f"\npoints: {keys}" if keys else ""), fontsize=9)
    return _save(fig, path)


def plot_cells(rows: list[dict[str, Any]], metric: str, label: str, path: Path) -> Path | None:
    """One metric per (grid point, arm): mean over seeds with its t-interval."""
    pts = [r for r in rows if r.get(metric, {}).get("mean") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.28 * len(pts)))
    for i, r in enumerate(pts):
        x, xerr = _err(r[metric])
        ax.errorbar([x], [i], xerr=xerr, fmt="o", capsize=3)
    ax.set_yticks(range(len(pts)), [f"{r['point_id']} · {r['arm']} (n={r[metric]['n']})" for r in pts], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    return _save(fig, path)
