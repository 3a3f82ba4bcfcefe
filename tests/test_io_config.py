"""Config layering shared by every command: file, then --set, then dedicated flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moescope.errors import MoescopeError
from moescope.io.config import layered_config


@dataclass
class Inner:
    seed: int = 0
    alpha: float = 1.0


@dataclass
class Outer:
    name: str = "a"
    steps: int = 1
    inner: Inner = field(default_factory=Inner)


def test_file_then_set_then_flags_later_wins(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "file"\nsteps = 5\n[inner]\nseed = 7\nalpha = 2.0\n')
    cfg = layered_config(Outer, path, ["steps=6", "inner.seed=8"], {"inner.seed": 9, "name": None})
    assert cfg == Outer(name="file", steps=6, inner=Inner(seed=9, alpha=2.0))  # a None flag is "not given"
    assert layered_config(Outer, None) == Outer()


def test_a_flag_cannot_smuggle_an_unknown_key() -> None:
    with pytest.raises(MoescopeError, match="inner.sed"):
        layered_config(Outer, None, [], {"inner.sed": 1})
