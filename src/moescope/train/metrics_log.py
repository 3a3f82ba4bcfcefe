"""metrics.jsonl (one JSON record per line) plus optional TensorBoard / Weights & Biases, both offline.

Records have a "kind": "train" (every log_every_steps), "eval" (every eval_every_steps),
"collapse" (a collapse warning), "event" (resume, interrupt, stop).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_text, _json_default
from moescope.io.config import to_dict

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, path: Path, *, tensorboard_dir: Path | None = None, wandb_dir: Path | None = None,
                 wandb_name: str = "", config: dict | None = None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # writes local event files only

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb_dir is not None:
            try:
                import wandb
            except ImportError:
                log.warning("tracking.wandb is on but wandb is not installed; skipping it")
            else:
                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = wandb.init(project="moescope", name=wandb_name, dir=str(wandb_dir),
                                         mode="offline", config=config or {}, reinit=True)

    @classmethod
    def for_stage(cls, out_dir: Path, cfg, name: str, *, enabled: bool) -> MetricsLog:
        """The log of one training stage (`cfg` a RunConfig): metrics.jsonl in `out_dir`, plus the
        trackers its `tracking` settings ask for."""
        return cls(out_dir / METRICS_NAME, tensorboard_dir=out_dir / "tensorboard" if cfg.tracking.tensorboard else None,
                   wandb_dir=out_dir if cfg.tracking.wandb else None, wandb_name=name, config=to_dict(cfg),
                   enabled=enabled)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records written after the checkpoint's step (they will be produced again),
        and a last line torn by a crash mid-write (with a warning)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for _, line, r in _parse(self.path, cut_torn=True) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(json.dumps(record, default=_json_default) + "\n")
        step = int(record.get("step", 0))
        scalars = dict(_flatten_scalars(record, prefix=record.get("kind", "")))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _append(self, line: str) -> None:
        """One whole line at the end of metrics.jsonl, or none: a failed append (a full disk) is cut
        back to the file's previous end, and the error names the file."""
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            with contextlib.suppress(OSError):  # shrinking frees space: it works on a full disk
                os.truncate(self.path, size)
            raise MoescopeError(f"{self.path}: a record could not be appended ({exc.strerror or exc}); "
                                "--resume continues from the last verified checkpoint") from exc

    def event(self, step: int, event: str, **fields: Any) -> None:
        """An "event" record (resume, interrupt, early stop) with its own fields."""
        self.write({"kind": "event", "step": step, "event": event, **fields})

    def recorded(self, kind: str, step: int) -> dict[str, Any] | None:
        """The last record of `kind` at `step` already in metrics.jsonl (None if none, or disabled)."""
        found = [r for r in read_metrics(self.path, kind) if r.get("step") == step] if self.enabled else []
        return found[-1] if found else None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class StepClock:
    """Training time of a stage's steps (no evaluation or saving): over every resume, for the
    summary's tokens/s (saved in checkpoints), and since the last evaluation, for its record."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.train_seconds = 0.0
        self.timed_steps = 0
        self._window_seconds, self._window_steps = 0.0, 0

    def add(self, seconds: float) -> float:
        """Count one step that took `seconds`; returns its tokens per second."""
        self.train_seconds += seconds
        self.timed_steps += 1
        self._window_seconds += seconds
        self._window_steps += 1
        return self.tokens_per_step / seconds

    def window_tokens_per_s(self) -> float:
        """Tokens per second of the steps since the last call (the next window starts now)."""
        rate = self.tokens_per_step * self._window_steps / max(self._window_seconds, 1e-9)
        self._window_seconds, self._window_steps = 0.0, 0
        return rate

    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step * self.timed_steps / self.train_seconds if self.train_seconds else None

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "timed_steps": self.timed_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))


def eval_record(step: int, tokens_seen: int, ev: dict[str, Any], collapsed: list[str], memory: dict[str, Any],
                tokens_per_s: float | None) -> dict[str, Any]:
    """The "eval" record: the evaluation, the layers collapsed now, peak memory, and the training
    throughput since the previous evaluation when the loop timed one (not at step 0 or after an early stop)."""
    record = {"kind": "eval", "step": step, "tokens_seen": tokens_seen, **ev,
              "collapsed_layers": [int(x) for x in collapsed], **memory}
    if tokens_per_s is not None:
        record["tokens_per_s"] = tokens_per_s
    return record


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a writer killed mid-line, or still writing)
    is left out with a warning, a bad line anywhere else raises MoescopeError naming it."""
    if not path.is_file():
        return []
    return [r for _, r in numbered_metrics(path) if kind is None or r.get("kind") == kind]


def numbered_metrics(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a metrics.jsonl, read as `read_metrics` reads it (for errors naming file:line)."""
    if not path.is_file():
        return []
    return [(n, r) for n, _, r in _parse(path, cut_torn=True)]


def _parse(path: Path, *, cut_torn: bool) -> list[tuple[int, str, dict[str, Any]]]:
    """(line number, line, record) per whole line of `path`."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows: list[tuple[str, dict[str, Any]]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            last = all(not rest.strip() for rest in lines[n:])
            if cut_torn and last:
                log.warning("%s: line %d is torn (%s), cut back to the last whole record", path, n, exc)
                break
            raise MoescopeError(f"{path}:{n}: not a JSON record ({exc})") from None
        step, kind = record.get("step", 0), record.get("kind", "")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(kind, str):
            raise MoescopeError(f"{path}:{n}: 'step' must be an integer >= 0 and 'kind' a string, "
                                f"got step {step!r}, kind {kind!r}")
        rows.append((n, text, record))
    return rows


def _flatten_scalars(obj: Any, prefix: str):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("kind", "step"):
                continue
            yield from _flatten_scalars(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        yield prefix, float(obj)
