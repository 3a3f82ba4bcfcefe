"""Training checkpoints: model, optimizer, scheduler, RNG states and data position; no pickle, verified.

Layout of one checkpoint::

    checkpoints/step_000100/model/                       save_moe_model (safetensors + JSON configs)
    checkpoints/step_000100/trainer_state.json           step, data position, the resolved config, scheduler
                                                         and optimizer structure, RNG states (JSON)
    checkpoints/step_000100/trainer_tensors.safetensors  every tensor of that state (optimizer moments,
                                                         torch RNG state), referenced from the JSON by key
    checkpoints/step_000100/manifest.json                size + sha256 of every other file, written LAST
    checkpoints/latest                                   text file naming the newest complete checkpoint

Nothing is ever unpickled: a checkpoint is JSON and safetensors only, so a crafted file can
at worst be refused. A checkpoint directory appears only when complete (temporary directory,
every file and directory fsynced, then rename); resume takes the newest checkpoint whose
manifest verifies and whose tensors are all finite, warning about (and skipping) any newer
one that does not. An older moescope checkpoint (trainer_state.pt, a pickle) has no manifest
and is skipped the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_text, fsync_directory
from moescope.io.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from moescope.moe.hf_model import load_moe_model, save_moe_model

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "trainer_tensors.safetensors"
MODEL_DIR = "model"
LATEST_NAME = "latest"
FORMAT_VERSION = 2
_REQUIRED = (STATE_NAME, TENSORS_NAME, f"{MODEL_DIR}/config.json", f"{MODEL_DIR}/model.safetensors")
_STEP_DIR = re.compile(r"step_(\d+)")
# numpy arrays inside RNG states (numpy's MT19937 key); nothing else is rebuilt from a dtype name
_NDARRAY_DTYPES = frozenset({"uint32", "int64", "uint64", "int32"})


class NonFiniteState(MoescopeError):
    """A tensor about to be checkpointed (or read from a checkpoint) holds NaN or inf."""


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
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MoescopeError(f"checkpoint RNG state is malformed ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------- JSON + tensors encoding


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state (dicts, lists, tuples, scalars, strings, tensors, numpy arrays) as a JSON-able
    tree plus the tensors it references by key; `decode_state` inverts it exactly (tuples stay tuples,
    integer dict keys stay integers: optimizer and RNG states depend on both)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            if x.dtype.name not in _NDARRAY_DTYPES:
                raise TypeError(f"cannot checkpoint a numpy array of dtype {x.dtype}")
            return {"__ndarray__": x.tolist(), "dtype": x.dtype.name}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"__items__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.floating):
            return float(x)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__}")

    return enc(obj), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                key = x["__tensor__"]
                if set(x) != {"__tensor__"} or key not in tensors:
                    raise MoescopeError(f"{where}: reference to a missing tensor {key!r}")
                return tensors[key]
            if "__ndarray__" in x:
                if set(x) != {"__ndarray__", "dtype"} or x["dtype"] not in _NDARRAY_DTYPES:
                    raise MoescopeError(f"{where}: malformed array entry")
                return np.array(x["__ndarray__"], dtype=x["dtype"])
            if "__tuple__" in x:
                if set(x) != {"__tuple__"} or not isinstance(x["__tuple__"], list):
                    raise MoescopeError(f"{where}: malformed tuple entry")
                return tuple(dec(v) for v in x["__tuple__"])
            if "__items__" in x:
                items = x["__items__"]
                if set(x) != {"__items__"} or not all(isinstance(i, list) and len(i) == 2 for i in items):
                    raise MoescopeError(f"{where}: malformed mapping entry")
                out = {}
                for k, v in items:
                    k = dec(k)
                    if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                        raise MoescopeError(f"{where}: unhashable mapping key")
                    out[k] = dec(v)
                return out
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(tree)


# ---------------------------------------------------------------------------- manifest


def verify_checkpoint(path: Path) -> None:
    """Raise MoescopeError naming the offending file unless every file of checkpoint `path` is
    listed in its manifest with the recorded size and sha256 (and nothing else is there)."""
    if not (path / MANIFEST_NAME).is_file():
        raise MoescopeError(f"{path / MANIFEST_NAME} is missing (an unfinished checkpoint, or one written by an "
                            f"older moescope, whose pickled state is never loaded)")
    verify_manifest(path, _REQUIRED)


# ---------------------------------------------------------------------------- save / load


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteState(f"{where}: {len(bad)} tensors hold NaN/inf (first: {bad[0]})")


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    state: dict[str, Any], *, keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `root` durably and atomically, point `latest` at it, keep the
    newest `keep`. Refuses (NonFiniteState, nothing written) if any weight or optimizer tensor is
    not finite: a checkpoint is always a state worth resuming from."""
    from safetensors.torch import save_file

    final = root / checkpoint_name(step)
    check_finite(model.state_dict(), f"model at step {step}")
    tree, tensors = encode_state({
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        **state,
    })
    check_finite(tensors, f"optimizer state at step {step}")
    with atomic_directory(final, overwrite=True, durable=True) as tmp:
        save_moe_model(model, tmp / MODEL_DIR)
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": "moescope-trainer-state"})
        (tmp / STATE_NAME).write_text(json.dumps(tree) + "\n", encoding="utf-8")
        write_manifest(tmp, step)  # last: its presence means every file above is complete
    point_latest(root, final)
    _prune(root, keep=max(1, keep), protect=final.name)
    return final


def point_latest(root: Path, path: Path) -> None:
    """Make `latest` name checkpoint `path` (other tools read it to find the newest model)."""
    pointer = root / LATEST_NAME
    try:
        current = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        current = None  # unreadable: rewritten below, as when missing
    if current != path.name:
        if pointer.is_dir() and not pointer.is_symlink():  # os.replace below replaces a file or a link, not a directory
            shutil.rmtree(pointer)
        atomic_write_text(pointer, path.name + "\n")


def read_checkpoint_record(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` as its JSON records it (step, resolved config, data digest),
    once the manifest verifies and before any tensor or the model is loaded: what the checkpoint says
    about the run that wrote it is checked against the run at hand for the price of one small file.
    Raises MoescopeError naming the file otherwise."""
    verify_checkpoint(path)
    state_path = path / STATE_NAME
    try:
        tree = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MoescopeError(f"{state_path}: not valid JSON ({exc})") from None
    if not isinstance(tree, dict) or tree.get("format_version") != FORMAT_VERSION:
        raise MoescopeError(f"{state_path}: checkpoint format {tree.get('format_version') if isinstance(tree, dict) else None}, "
                            f"expected {FORMAT_VERSION}")
    for key in ("step", "optimizer", "scheduler", "rng", "config"):
        if key not in tree:
            raise MoescopeError(f"{state_path}: no {key!r} entry")
    if not isinstance(tree["step"], int) or tree["step"] < 0 or f"step_{tree['step']:06d}" != path.name:
        raise MoescopeError(f"{state_path}: step {tree['step']!r} does not match the directory name {path.name}")
    if not isinstance(tree["config"], dict):
        raise MoescopeError(f"{state_path}: 'config' is not an object")
    check_trainer_fields(tree, str(state_path))
    return tree


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _flat_event(v: Any) -> bool:
    """A collapse event as CollapseWatch records it: one flat object with an integer step and layer."""
    return (isinstance(v, dict) and _count(v.get("step")) and _count(v.get("layer"))
            and all(isinstance(x, (str, int, float, bool)) or x is None for x in v.values()))


# What the trainer's parts keep in a checkpoint besides optimizer, scheduler and RNG (Trainer.save_checkpoint);
# absent keys are an older checkpoint's and take their defaults.
_TRAINER_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data_position_sequences": (_count, "an integer >= 0"),
    "data_manifest_sha256": (lambda v: isinstance(v, str), "a string"),
    "name": (lambda v: isinstance(v, str), "a string"),
    "nonfinite_skips_in_a_row": (_count, "an integer >= 0"),
    "nonfinite_skips_total": (_count, "an integer >= 0"),
    "timed_steps": (_count, "an integer >= 0"),
    "train_seconds": (_seconds, "a finite number >= 0"),
    "collapse_streak": (lambda v: isinstance(v, dict) and all(_count(x) for x in v.values()),
                        "an object of integers >= 0"),
    "collapse_events": (lambda v: isinstance(v, list) and all(_flat_event(e) for e in v),
                        "a list of flat objects with an integer step and layer"),
}


def check_trainer_fields(tree: dict[str, Any], where: str) -> None:
    """Each trainer field a checkpoint records is of the type its reader expects: a record forged past the
    manifest is refused here (and the checkpoint skipped) instead of failing as a traceback on resume."""
    for key, (ok, expected) in _TRAINER_FIELDS.items():
        if key in tree and not ok(tree[key]):
            raise MoescopeError(f"{where}: {key!r} must be {expected}, got {_short_repr(tree[key])}")


def _short_repr(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def load_checkpoint(
    path: Path, accept: Callable[[Path, dict[str, Any]], None] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, trainer state) of one checkpoint directory, after verifying its manifest, letting `accept`
    refuse its record (read_checkpoint_record; raise MoescopeError) before anything heavy is loaded, and
    checking that every tensor is finite. Raises MoescopeError naming the file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tree = read_checkpoint_record(path)
    if accept is not None:
        accept(path, tree)
    tensors_path = path / TENSORS_NAME
    try:
        tensors = load_file(str(tensors_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise MoescopeError(f"{tensors_path}: cannot read ({exc})") from None
    check_finite(tensors, str(tensors_path))
    try:
        state = decode_state(tree, tensors, str(path / STATE_NAME))
    except RecursionError:
        raise MoescopeError(f"{path / STATE_NAME}: nested too deeply to be a trainer state") from None
    try:
        model = load_moe_model(path / MODEL_DIR)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        # reachable only with a manifest that vouches for bytes moescope did not write
        raise MoescopeError(f"{path / MODEL_DIR}: cannot rebuild the model ({type(exc).__name__}: {exc})") from None
    check_finite(model.state_dict(), str(path / MODEL_DIR / "model.safetensors"))
    return model, state


def checkpoint_steps(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_intact_checkpoint(
    root: Path, accept: Callable[[Path, dict[str, Any]], None] | None = None
) -> tuple[Path, torch.nn.Module, dict[str, Any]] | None:
    """The newest checkpoint under `root` that verifies and loads (and that `accept`, given its path and
    recorded state, does not refuse with MoescopeError before its model is built), as (path, model, state).

    Each newer one that fails is skipped with a warning naming the file. None when there is no
    checkpoint at all; MoescopeError (listing why each failed) when there are some but none is intact.
    """
    failures = []
    for path in checkpoint_steps(root):
        try:
            model, state = load_checkpoint(path, accept)
        except MoescopeError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            failures.append(f"{path.name}: {exc}")
            continue
        return path, model, state
    if failures:
        raise MoescopeError(f"{root}: no intact checkpoint to resume from ({'; '.join(failures)})")
    return None


def last_verified_checkpoint(root: Path, hint: Path | None = None) -> Path | None:
    """`hint` if it still verifies, else the newest checkpoint under `root` that does (None if none).
    What error messages call the "last good checkpoint": verified and (by save_checkpoint) finite."""
    candidates = ([hint] if hint is not None else []) + [p for p in checkpoint_steps(root) if p != hint]
    for path in candidates:
        try:
            verify_checkpoint(path)
        except MoescopeError:
            continue
        return path
    return None


def _prune(root: Path, keep: int, protect: str) -> None:
    for old in checkpoint_steps(root)[keep:]:
        if old.name != protect:
            # renamed first, so that a crash mid-delete leaves an orphan (removed at the next start),
            # never a half-deleted step_* directory
            trash = old.with_name(f".{old.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    fsync_directory(root)
