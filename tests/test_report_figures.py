"""Figure files are written atomically and the per-layer figures stay readable for many layers and experts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from moescope.io.figure import save_figure


def test_save_figure_is_atomic(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "sub" / "ok.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a figure that fails while drawing leaves neither the file nor a temporary behind
    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, r"$\undefinedcommand$")  # mathtext parse error at draw time
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert not plt.get_fignums(), "figures are closed even when saving fails"
