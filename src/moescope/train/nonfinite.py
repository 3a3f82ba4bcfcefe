"""The policy for a step whose loss or gradient norm is NaN/inf (train.on_nonfinite).

Such an update never reaches the weights. "stop" raises NonFiniteLoss at once, naming the last
checkpoint that still verifies; "skip" records the skip and goes on, until
train.max_nonfinite_skips_in_a_row skips in a row (then it stops the same way).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from moescope.errors import MoescopeError
from moescope.train.config import TrainConfig
from moescope.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)


class NonFiniteLoss(MoescopeError):
    """A loss, gradient norm, evaluation loss or weight became NaN or infinite and training stopped
    (train.on_nonfinite = "stop", or too many skipped updates in a row); nothing non-finite was saved."""


class NonFiniteGuard:
    """Counts skipped updates (saved in checkpoints) and writes the skip/stop events."""

    def __init__(self, name: str, t: TrainConfig, metrics: MetricsLog,
                 last_good: Callable[[], Path | None], in_a_row: int = 0, total: int = 0) -> None:
        self.name, self.t, self.metrics, self.last_good = name, t, metrics, last_good
        self.in_a_row, self.total = in_a_row, total

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_skips_in_a_row": self.in_a_row, "nonfinite_skips_total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.in_a_row = int(state.get("nonfinite_skips_in_a_row", 0))
        self.total = int(state.get("nonfinite_skips_total", 0))

    def skip_or_stop(self, step: int, out: dict[str, Any], bad: list[str]) -> None:
        """The values of update `step` (1-based) are not finite: raise NonFiniteLoss, or record the skip."""
        t = self.t
        what = f"{' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN/inf"
        if t.on_nonfinite == "stop":
            self.stop(step, what)
        self.in_a_row += 1
        self.total += 1
        self.metrics.write({"kind": "event", "step": step, "event": "nonfinite_skip", "reason": what,
                            "in_a_row": self.in_a_row, "total": self.total,
                            **{k: json_float(out[k]) for k in ("ce", "loss", "grad_norm") if k in out}})
        log.warning("%s: %s at step %d; update skipped (%d in a row, %d in total)", self.name, what, step,
                    self.in_a_row, self.total)
        if self.in_a_row >= t.max_nonfinite_skips_in_a_row:
            self.stop(step, what, f" ({self.in_a_row} skipped updates in a row, "
                                  f"train.max_nonfinite_skips_in_a_row={t.max_nonfinite_skips_in_a_row})")

    def stop(self, step: int, what: str, detail: str = "") -> NoReturn:
        last = self.last_good()
        self.metrics.write({"kind": "event", "step": step, "event": "nonfinite_stop", "reason": what,
                            "checkpoint": str(last) if last is not None else None})
        raise NonFiniteLoss(
            f"{self.name}: {what} at step {step}{detail}; training stopped, nothing saved from it; last good "
            f"checkpoint: {last if last is not None else 'none (no checkpoint written yet)'}"
        )


def json_float(x: float | None) -> float | str | None:
    """Non-finite floats as strings: strict JSON readers (browsers) reject NaN/Infinity tokens."""
    return x if x is None or math.isfinite(x) else str(x)
