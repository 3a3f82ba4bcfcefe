"""The run directory of one training stage: its files, whether it may be continued, its checkpoints.

Layout (see DEVELOPERS.md, "Run directory")::

    config.json        resolved RunConfig (+ where the weights came from)
    metrics.jsonl      train / eval / collapse / event records
    checkpoints/       step_XXXXXX/{model/, trainer_state.json, trainer_tensors.safetensors, manifest.json},
                       latest (see train/checkpoint.py)
    snapshots/         step_XXXXXX/ model only, one per evaluation
    final/             the trained model (save_moe_model)
    summary.json       final evaluation and run statistics (present = stage complete)

A stage directory may be resumed only by the config that wrote it: `check_same_config` is the
one comparison used for the stored config.json, for a checkpoint's config and for a finished
stage, so the three say the same thing about the same difference. `StageDirectory` is what the
trainer asks: which checkpoint to resume, open the directory for writing, save a checkpoint,
finish the stage (final/, then summary.json); `finished_summary` is what a resume of a complete
stage returns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_json, remove_orphaned_temporaries
from moescope.io.config import to_dict
from moescope.io.jsonfile import read_json_object
from moescope.io.lock import is_empty_ignoring_lock
from moescope.moe.hf_model import save_moe_model
from moescope.io.manifest import MANIFEST_NAME, write_manifest
from moescope.io.provenance import sha256_file
from moescope.io.saved_model import verify_saved_model
from moescope.train.checkpoint import (
    checkpoint_name, last_verified_checkpoint, newest_intact_checkpoint, point_latest, save_checkpoint,
)
from moescope.train.config import RunConfig, comparable_config
from moescope.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SUMMARY_NAME = "summary.json"


def dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where nested dicts `a` and `b` differ, with both values at the leaves."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(path)
            else:
                out.extend(dict_diff(a[key], b[key], path))
        return out
    return [] if a == b else [f"{prefix} ({a!r} -> {b!r})"]


def check_same_config(cfg: RunConfig, stored: dict, where: str) -> None:
    """Raise MoescopeError listing the differing keys unless `stored` is `cfg` up to logging/policy keys."""
    mine, theirs = comparable_config(cfg), comparable_config(stored)
    if mine != theirs:
        diffs = dict_diff(theirs, mine)
        raise MoescopeError(
            f"{where} was written by another config; differing keys: {', '.join(diffs[:6])}"
            f"{' ...' if len(diffs) > 6 else ''} (use a new --out, or the original config)"
        )


def finished_summary(cfg: RunConfig, out_dir: Path) -> dict | None:
    """The stored summary of a complete stage written by `cfg` (another config raises), or None if the
    stage is not complete. A stage whose final/ fails its manifest, or whose summary.json cannot be
    read, is not complete: it is trained again from its last verified checkpoint (with a warning), so
    later stages never start from a damaged model."""
    final, summary_path = out_dir / "final", out_dir / SUMMARY_NAME
    if not (summary_path.is_file() and final.is_dir()):
        return None
    check_same_config(cfg, read_stored_config(out_dir / CONFIG_NAME), str(out_dir / CONFIG_NAME))
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
        # stages finished before final/ had a manifest (their summary records none) are trusted
        verify_saved_model(final, summary.get("final_manifest_sha256"))
    except (MoescopeError, OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s: the finished stage is damaged (%s); training it again from its last verified "
                    "checkpoint", out_dir, str(exc).splitlines()[0])
        summary_path.unlink(missing_ok=True)
        return None
    return summary


def read_stored_config(path: Path) -> dict:
    """The run config recorded in a stage's config.json."""
    return dict(read_json_object(path, {"config": dict})["config"])


class StageDirectory:
    """One stage's directory as the trainer uses it: the checkpoint to resume from (checked against the
    config and data), opening it for writing (orphans, metrics cut back, config.json), checkpoints."""

    def __init__(self, out_dir: Path, name: str, cfg: RunConfig, manifest_sha: str, data_manifest: Path, *,
                 write: bool) -> None:
        self.out_dir, self.name, self.cfg, self.write = Path(out_dir), name, cfg, write
        self.manifest_sha, self.data_manifest = manifest_sha, data_manifest
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_good: Path | None = None

    def find_resume(self, resume: bool) -> tuple[Path, torch.nn.Module, dict[str, Any]] | None:
        """The newest intact checkpoint to continue from (with `resume`), checked against this config
        and data; None to start afresh, which a non-empty directory without `resume` refuses."""
        found = None
        if resume:
            stored = self.out_dir / CONFIG_NAME
            if stored.is_file():
                check_same_config(self.cfg, read_stored_config(stored), str(stored))
            # a checkpoint of another config or data in this stage (copied in by hand) is skipped like a damaged one
            found = newest_intact_checkpoint(self.ckpt_dir, accept=self._check_checkpoint_state)
        if found is None and self.write and not resume and not is_empty_ignoring_lock(self.out_dir):
            raise MoescopeError(f"{self.out_dir} already exists and is not empty; pass --resume or choose another --out")
        if found is not None:
            self.last_good = found[0]
        return found

    def _check_checkpoint_state(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Raise MoescopeError unless the checkpoint was written by this config on this data (its JSON record,
        read before its model is built)."""
        check_same_config(self.cfg, state["config"], f"checkpoint {ckpt}")
        if state.get("data_manifest_sha256") != self.manifest_sha:
            raise MoescopeError(f"checkpoint {ckpt} was trained on another data directory (manifest hash differs "
                                f"from {self.data_manifest})")

    def open(self, metrics: MetricsLog, *, resume: bool, resumed_from: Path | None, step: int,
             record: dict[str, Any]) -> None:
        """Make the directory consistent before training writes to it (main process only; the caller
        holds the run-directory lock): remove orphans of an interrupted checkpoint write, cut
        metrics.jsonl back to the checkpoint's step (or empty it when no checkpoint was reached),
        or write config.json (`record` + the config) for a fresh stage."""
        for orphan in remove_orphaned_temporaries(self.ckpt_dir):
            log.warning("%s: removed %s, left by an interrupted checkpoint write", self.name, orphan)
        if resumed_from is None and resume:
            metrics.truncate_after(-1)  # an attempt that never reached a checkpoint starts over
        if resumed_from is not None:
            point_latest(self.ckpt_dir, resumed_from)  # killed between commit and pointer, or fell back
            metrics.truncate_after(step)
            metrics.event(step, "resume", checkpoint=str(resumed_from))
        else:
            if self.out_dir.exists() and (self.out_dir / CONFIG_NAME).exists() and not resume:
                raise MoescopeError(f"{self.out_dir} was written by another process while starting")
            atomic_write_json(self.out_dir / CONFIG_NAME, {
                "name": self.name, "init": record["init"], "config": to_dict(self.cfg),
                "data_manifest_sha256": self.manifest_sha, **{k: v for k, v in record.items() if k != "init"},
            })

    def save(self, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
        """Checkpoint at `step` with the trainer's `state` (after the config); raises NonFiniteState,
        saving nothing, if any tensor is NaN/inf. `optimizer` may be accelerate's wrapper."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        path = save_checkpoint(self.ckpt_dir, step, model, optimizer, scheduler,
                               {"config": to_dict(self.cfg), **state}, keep=self.cfg.train.keep_checkpoints)
        self.last_good = path
        return path

    def save_snapshot(self, step: int, model) -> Path:
        """The model alone at an evaluation's step (snapshots/step_XXXXXX/), with a manifest that its
        readers verify; whole or absent (written beside it and renamed), replacing one from a killed run."""
        path = self.out_dir / "snapshots" / checkpoint_name(step)
        with atomic_directory(path, overwrite=True) as tmp:
            save_moe_model(model, tmp)
            write_manifest(tmp, step)
        return path

    def finish(self, model, summary: dict[str, Any], tokenizer: Path) -> None:
        """The trained model into final/ (with the data's tokenizer, if the data has one), then
        summary.json, written last: its presence means the stage is complete."""
        final = self.out_dir / "final"
        (final / MANIFEST_NAME).unlink(missing_ok=True)  # a re-finished stage: the old one lists old digests
        remove_orphaned_temporaries(final)  # a killed earlier finish's weights temporary: never in the manifest
        save_moe_model(model, final, tokenizer=tokenizer if tokenizer.is_dir() else None)
        # the summary records the manifest's digest: a final/ that later loses its manifest is refused
        summary["final_manifest_sha256"] = sha256_file(write_manifest(final, int(summary["steps"])))
        atomic_write_json(self.out_dir / SUMMARY_NAME, summary)

    def last_verified(self) -> Path | None:
        """The newest checkpoint that verifies now (manifest digests) and is finite."""
        return last_verified_checkpoint(self.ckpt_dir, self.last_good) if self.write else None
