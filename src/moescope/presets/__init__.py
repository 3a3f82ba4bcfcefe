"""Packaged study presets (TOML): `demo` (offline, 2-core CPU) and `gpt2` (pretrained GPT-2, HF data, GPU)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PRESETS = ("demo", "gpt2")


def preset_path(name: str) -> Path:
    return Path(str(resources.files(__package__) / f"{name}.toml"))
