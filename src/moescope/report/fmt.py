"""Intervals as text and as numbers, for every printed table, sentence and figure (presentation).

An interval is a dict {"estimate", "low", "high"}. Its ends are None (NaN in memory) where nothing
could be resampled (one unit in every domain, a statistic only a fixed unit moves): such an interval
prints as "[n/a]" and compares as NaN, i.e. never as a shown effect.
"""

from __future__ import annotations

import math
from typing import Any


def fmt_interval(iv: Any, digits: int = 3, signed: bool = False) -> str:
    """"0.500 [0.250, 0.750]"; "0.500 [n/a]" without ends; "n/a" without an estimate."""
    f = f"{'+' if signed else ''}.{digits}f"
    if isinstance(iv, dict) and "estimate" in iv:
        if not _finite(iv["estimate"]):
            return "n/a"
        if not all(_finite(iv.get(k)) for k in ("low", "high")):
            return f"{iv['estimate']:{f}} [n/a]"
        return f"{iv['estimate']:{f}} [{iv['low']:{f}}, {iv['high']:{f}}]"
    if _finite(iv):
        return f"{iv:{f}}"
    return "n/a"


def fmt_p(p: Any, spec: str = ".3g") -> str:
    """A p-value in format `spec`; "n/a" where there is none (an undefined statistic)."""
    return f"{p:{spec}}" if _finite(p) else "n/a"


def interval_values(entry: Any) -> tuple[float, float, float]:
    """(estimate, low, high) as floats, NaN for what is missing (an interval, a bare number or None)."""
    if isinstance(entry, dict):
        return tuple(float(entry[k]) if _finite(entry.get(k)) else math.nan  # type: ignore[return-value]
                     for k in ("estimate", "low", "high"))
    if _finite(entry):
        return (float(entry), math.nan, math.nan)
    return (math.nan, math.nan, math.nan)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
