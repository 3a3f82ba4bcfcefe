"""A model directory moescope saved (a stage's final/, a snapshot, any save_moe_model output), loaded as
a user hands it over: checked against its sha256 manifest when it has one (a stage's final/ does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moescope.io.manifest import MANIFEST_NAME, verify_manifest


def verify_saved_model(directory: str | Path) -> None:
    """Raise MoescopeError naming the file if `directory` has a manifest and a file differs from it
    (changed, truncated, added or missing since training wrote it)."""
    from moescope.moe.hf_model import CONFIG_NAME, WEIGHTS_NAME

    directory = Path(directory)
    if (directory / MANIFEST_NAME).is_file():
        verify_manifest(directory, (WEIGHTS_NAME, CONFIG_NAME))


def load_saved_model(directory: str | Path, *, device: Any = None) -> Any:
    """load_moe_model after `verify_saved_model`."""
    from moescope.moe.hf_model import load_moe_model

    verify_saved_model(directory)
    return load_moe_model(directory, device=device)
