"""The run directory of one training stage: its file names, and whether a directory may be continued.

A stage directory (see train/trainer.py) may be resumed only by the config that wrote it:
`check_same_config` is the one comparison used for the stored config.json, for a checkpoint's
config and for a finished stage, so the three say the same thing about the same difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.train.config import RunConfig, comparable_config

CONFIG_NAME = "config.json"
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"


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


def read_stored_config(path: Path) -> dict:
    """The run config recorded in a stage's config.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return dict(data["config"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise MoescopeError(f"{path}: not a readable run config ({type(exc).__name__}: {exc})") from None
