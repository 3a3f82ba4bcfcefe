"""The README's Python examples run as written (the public API they show exists and works)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


BLOCKS = python_blocks(ROOT / "README.md")


def test_the_readme_shows_the_library() -> None:
    assert "## Use moescope as a library" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    torch.manual_seed(0)
    runpy.run_path(str(script), run_name="__main__")


def test_public_names_resolve_lazily() -> None:
    import subprocess
    import sys

    code = ("import sys, moescope; assert 'torch' not in sys.modules, 'import moescope loaded torch'; "
            "names = [getattr(moescope, n) for n in moescope.__all__]; "
            "assert all(n is not None for n in names)")
    subprocess.run([sys.executable, "-c", code], check=True)
