"""Cells of a sweep and their between-seed summaries (pure computation: no files, no printing).

A *point* is one combination of grid values; a *cell* is a point run with one seed.
Summaries over seeds are Student-t intervals of the per-seed estimates (each
seed is one independent replicate of the whole study: data order, initialization,
upcycling noise), so they say how much the result moves when the study is rerun,
not how precisely one run measured it (that is the bootstrap over source documents inside a run).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import yaml

SEED_KEY = "experiment.train.seed"
# Each cell trains and analyses a whole study; a grid beyond this is a typo, not a plan.
MAX_CELLS = 100_000


@dataclass(frozen=True)
class Cell:
    point: tuple[tuple[str, Any], ...]  # ((key, value), ...) in grid order
    seed: int

    @property
    def point_id(self) -> str:
        return ",".join(f"{_short(k)}={_fmt(v)}" for k, v in self.point) or "base"

    @property
    def cell_id(self) -> str:
        return _safe(f"{self.point_id},seed={self.seed}")

    def overrides(self) -> dict[str, Any]:
        """The cell's settings as a nested dict (grid values and the seed) to merge onto the study config."""
        out: dict[str, Any] = {}
        for key, value in (*self.point, (SEED_KEY, self.seed)):
            node = out
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return out


def parse_grid_item(item: str) -> tuple[str, list[Any]]:
    """"key=v1,v2,..." -> (key, [v1, v2, ...]); values are YAML scalars, commas inside [] or {} stay."""
    if "=" not in item:
        raise ValueError(f"grid item {item!r} must look like key.sub=v1,v2")
    key, raw = item.split("=", 1)
    parts, depth, cur = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if any(p.strip() == "" for p in parts):
        raise ValueError(f"grid item {item!r} has an empty value")
    try:
        values = [yaml.safe_load(p) for p in parts]
    except yaml.YAMLError as exc:
        raise ValueError(f"grid item {item!r:.80}: a value is not YAML ({getattr(exc, 'problem', exc)})") from None
    except (ValueError, RecursionError) as exc:  # more digits than Python converts; nested too deeply
        raise ValueError(f"grid item {item!r:.80}: a value cannot be read ({type(exc).__name__})") from None
    if not key.strip() or not values:
        raise ValueError(f"grid item {item!r} has no key or no values")
    return key.strip(), values


def expand_cells(grid: dict[str, list[Any]], seeds: list[int]) -> list[Cell]:
    """Every combination of grid values (first key slowest) times every seed."""
    if not seeds:
        raise ValueError("a sweep needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    from moescope.train.config import MAX_SEED

    if not all(0 <= int(s) <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be in 0..2**32 - 1 (numpy and torch seeds), got {seeds}")
    keys = list(grid)
    for key, values in grid.items():
        if not values:
            raise ValueError(f"grid key {key!r} has no values")
        if len({_fmt(v) for v in values}) != len(values):
            raise ValueError(f"grid key {key!r} repeats a value: {values}")
    n_cells = math.prod(len(v) for v in grid.values()) * len(seeds)
    if n_cells > MAX_CELLS:
        raise ValueError(f"the grid and seeds make {n_cells:,} cells, more than {MAX_CELLS:,}: each cell is a whole "
                         "study; split the sweep")
    combos = itertools.product(*(grid[k] for k in keys))
    return [Cell(tuple(zip(keys, combo)), int(s)) for combo in combos for s in seeds]


def seed_interval(values: list[float], confidence_level: float = 0.95) -> dict[str, Any]:
    """Mean over seeds with a Student-t interval (n - 1 degrees of freedom); no interval for n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "low": None, "high": None}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": 1, "low": None, "high": None}
    sd = float(x.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.5 + confidence_level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "low": mean - half, "high": mean + half}


# The per-arm numbers a sweep summarizes: name -> how to read it from a demo summary row.
ROW_METRICS = {
    "eval_loss": lambda r: _est(r.get("eval_loss")),
    "loss_vs_dense": lambda r: _est(r.get("loss_vs_dense")),
    "nmi": lambda r: _est(r.get("nmi")),
    "load_cv_max": lambda r: r.get("load_cv_max"),
}


def aggregate_cells(results: list[dict[str, Any]], confidence_level: float = 0.95) -> list[dict[str, Any]]:
    """Per (point, arm): each metric's mean and t-interval over the seeds that finished.

    results: [{"point": {key: value}, "point_id", "seed", "rows": [summary row per arm]}].
    """
    groups: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    order: list[tuple[str, str]] = []
    for res in results:
        for row in res["rows"]:
            key = (res["point_id"], row["arm"])
            if key not in groups:
                groups[key], _ = [], order.append(key)
            groups[key].append((res, row))
    out = []
    for point_id, arm in order:
        members = groups[(point_id, arm)]
        entry: dict[str, Any] = {"point_id": point_id, "point": members[0][0]["point"], "arm": arm,
                                 "seeds": [m[0]["seed"] for m in members]}
        for name, read in ROW_METRICS.items():
            values = [read(row) for _, row in members]
            if any(v is not None for v in values):
                entry[name] = seed_interval(values, confidence_level)
        layers = sorted({layer for _, row in members for layer in row.get("layers", {})}, key=int)
        if layers:
            entry["layers"] = {layer: {metric: seed_interval([row.get("layers", {}).get(layer, {}).get(metric)
                                                              for _, row in members], confidence_level)
                                       for metric in ("nmi", "load_cv")} for layer in layers}
        out.append(entry)
    return out


def axis_contrasts(results: list[dict[str, Any]], grid: dict[str, list[Any]], metric: str = "loss_vs_dense",
                   confidence_level: float = 0.95) -> list[dict[str, Any]]:
    """Per grid axis, arm and value: the change in `metric` against the axis's first value, paired within a
    seed (the other axes held equal, averaged over their combinations), then a t-interval over seeds.

    A seed counts for a value only when every combination of the other axes finished at both values.
    """
    by_cell: dict[tuple, float] = {}
    for res in results:
        point = tuple(res["point"].get(k) for k in grid)
        for row in res["rows"]:
            v = ROW_METRICS[metric](row)
            if v is not None:
                by_cell[(point, row["arm"], res["seed"])] = v
    arms = list(dict.fromkeys(arm for _, arm, _ in by_cell))
    seeds = sorted({seed for _, _, seed in by_cell})
    out = []
    for a, key in enumerate(grid):
        others = list(itertools.product(*(vals for b, vals in enumerate(grid.values()) if b != a)))
        first = grid[key][0]
        for arm in arms:
            for value in grid[key][1:]:
                per_seed = {}
                for seed in seeds:
                    diffs = []
                    for rest in others:
                        at = lambda v: (*rest[:a], v, *rest[a:])  # noqa: E731  the point with this axis = v
                        cells = [(at(value), arm, seed), (at(first), arm, seed)]
                        if not all(c in by_cell for c in cells):
                            break
                        diffs.append(by_cell[cells[0]] - by_cell[cells[1]])
                    else:
                        per_seed[seed] = float(np.mean(diffs))
                if per_seed:
                    out.append({"axis": key, "value": value, "vs": first, "arm": arm, "metric": metric,
                                "per_seed": per_seed,
                                "change": seed_interval(list(per_seed.values()), confidence_level)})
    return out


def format_seed_interval(x: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """"mean [low, high]" of :func:`seed_interval`; the mean alone for one seed, "-" for none."""
    if not x or x.get("mean") is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if x.get("low") is None:
        return f.format(x["mean"])
    return f"{f.format(x['mean'])} [{f.format(x['low'])}, {f.format(x['high'])}]"


def _est(x: Any) -> float | None:
    return float(x["estimate"]) if isinstance(x, dict) else (None if x is None else float(x))


def _short(key: str) -> str:
    return key.removeprefix("experiment.")


def _fmt(v: Any) -> str:
    return format(v, "g") if isinstance(v, float) else str(v).replace(" ", "")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "-", name)
