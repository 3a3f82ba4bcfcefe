"""Atomic figure files: a crash or a failing savefig never leaves a half-written PNG.

Every figure writer (report/, embed/, cluster/) goes through :func:`save_figure`,
so the atomic-write contract of :mod:`moescope.io.atomic` holds for plots too.
"""

from __future__ import annotations

import io
from pathlib import Path

from moescope.io.atomic import atomic_write_bytes


def save_figure(fig, path: str | Path, *, dpi: int = 110, tight: bool = True, close: bool = True, **savefig_kw) -> Path:
    """Render a matplotlib figure in memory, then write it to ``path`` atomically (temporary file + rename).

    The format follows the suffix of ``path``. The figure is closed afterwards (even
    when drawing fails) unless ``close`` is False.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = savefig_kw.pop("format", None) or (path.suffix.lstrip(".") or "png")
    try:
        if tight:
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format=fmt, **savefig_kw)
    finally:
        if close:
            plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
