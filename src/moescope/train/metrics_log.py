"""metrics.jsonl (one JSON record per line) plus optional TensorBoard / Weights & Biases, both offline.

Records have a "kind": "train" (every log_every_steps), "eval" (every eval_every_steps),
"collapse" (a collapse warning), "event" (resume, interrupt, stop).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from moescope.io.atomic import atomic_write_text, _json_default

log = logging.getLogger(__name__)


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

    def truncate_after(self, step: int) -> None:
        """On resume: drop records written after the checkpoint's step (they will be produced again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
        step = int(record.get("step", 0))
        scalars = dict(_flatten_scalars(record, prefix=record.get("kind", "")))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _flatten_scalars(obj: Any, prefix: str):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("kind", "step"):
                continue
            yield from _flatten_scalars(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        yield prefix, float(obj)
