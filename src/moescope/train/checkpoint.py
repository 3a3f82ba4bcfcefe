"""Training checkpoints: model, optimizer, scheduler, RNG states and data position, written atomically.

Layout of one checkpoint::

    checkpoints/step_000100/model/            save_moe_model (safetensors + config.json [+ moe_config.json])
    checkpoints/step_000100/trainer_state.pt  optimizer, scheduler, RNG states, step, data position,
                                              the resolved config it belongs to
    checkpoints/latest                        text file naming the newest complete checkpoint

A checkpoint directory appears only when complete (temporary directory + rename), and
`latest` is rewritten atomically after it, so a crash mid-save leaves the previous one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_text
from moescope.moe.gpt2 import load_moe_model, save_moe_model

STATE_NAME = "trainer_state.pt"
LATEST_NAME = "latest"
FORMAT_VERSION = 1


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any], *, keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` atomically, point `latest` at it, keep the newest `keep`."""
    final = root / checkpoint_name(step)
    payload = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        **state,
    }
    with atomic_directory(final, overwrite=True) as tmp:
        save_moe_model(model, tmp / "model")
        torch.save(payload, tmp / STATE_NAME)
    atomic_write_text(root / LATEST_NAME, final.name + "\n")
    _prune(root, keep=max(1, keep), protect=final.name)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    if not (path / STATE_NAME).is_file():
        raise MoescopeError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, trainer state) of one checkpoint directory."""
    state_path = path / STATE_NAME
    if not state_path.is_file():
        raise MoescopeError(f"not a checkpoint (no {STATE_NAME}): {path}")
    # Our own file, written by save_checkpoint: it holds RNG tuples and numpy arrays, hence weights_only=False.
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if state.get("format_version") != FORMAT_VERSION:
        raise MoescopeError(f"{state_path}: checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}")
    return load_moe_model(path / "model"), state


def _prune(root: Path, keep: int, protect: str) -> None:
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
