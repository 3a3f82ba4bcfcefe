"""`moescope sweep`: run every cell of a grid x seeds, resumably, then one summary (orchestration).

Sweep directory::

    OUT/sweep.json                 the study config, the grid, the seeds (latest invocation)
    OUT/data/KEY/                  one data build per distinct [data] config (usually one)
    OUT/bases/KEY/                 one dense base stage per distinct base config (share_base)
    OUT/stages/KEY/                an arm stage identical in several cells (e.g. dense), trained once
    OUT/cells/CELL/cell.json       the cell's resolved study config (checked on resume)
    OUT/cells/CELL/run/            an ordinary run directory (base/, arms/, analysis/)
    OUT/cells/CELL/result.json     written last: present = the cell is finished, never re-run
    OUT/summary.{json,md}, OUT/figures/*.png

A killed sweep continues where it stopped: finished cells are read back, a cell
that was training resumes from its checkpoints (the trainer's resume), a base
stage likewise. Cells run one after another; `workers > 1` runs them in a spawn
process pool on this machine, `executor = "slurm"` through submitit
(`submitit-local` runs submitit's LocalExecutor: the same path, one machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_json, atomic_write_text
from moescope.io.config import bounded, deep_merge, from_dict, load_config_file, to_dict
from moescope.io.jsonfile import read_json_object
from moescope.runtime import ORPHAN_EXIT_CODE, ORPHAN_GRACE_S, exit_with_parent, orphaned
from moescope.sweep import grid as grid_mod
from moescope.sweep.grid import format_seed_interval
from moescope.train.config import MAX_SEED

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger(__name__)

EXECUTORS = ("local", "submitit-local", "slurm")


@dataclass
class SweepConfig:
    """The [sweep] table of a sweep file; the rest of the file overrides the study preset."""

    study: str = "demo"  # preset name or study config file the cells start from (relative to the sweep file)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # "experiment.moe.top_k" = [1, 2]
    seeds: list[int] = bounded(default_factory=lambda: [0], low=0, high=MAX_SEED)  # experiment.train.seed of each replicate
    share_base: bool = True  # cells whose dense base (and identical arms on it) match train them once
    cluster: bool = False  # also cluster the experts in every cell (the demo's last analysis stage)
    confidence_level: float = bounded(0.95, low=0.0, high=1.0, low_open=True, high_open=True)  # of the t-intervals


def load_sweep(config: str, grid_items: list[str] | None = None, seeds: list[int] | None = None,
               overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], SweepConfig]:
    """(study config dict, SweepConfig) from a preset name or a sweep file, plus CLI grid/seeds/--set."""
    from moescope.presets import PRESETS, preset_path

    if config in PRESETS:
        raw, sweep_raw, root = {}, {"study": config}, Path.cwd()
    else:
        path = Path(config)
        if not path.is_file():
            raise MoescopeError(f"sweep config {config!r}: not a preset ({', '.join(PRESETS)}) nor a file")
        raw = load_config_file(path)
        # without a [sweep] table the file is the study itself (a demo-style config)
        sweep_raw, root = raw.pop("sweep", None), path.parent
        if sweep_raw is None:
            sweep_raw, raw = {"study": str(path.resolve())}, {}
    scfg = from_dict(SweepConfig, sweep_raw, "sweep")
    if scfg.study in PRESETS:
        study_path = preset_path(scfg.study)
    else:
        study_path = Path(scfg.study) if Path(scfg.study).is_absolute() else root / scfg.study
    study = deep_merge(deep_merge(load_config_file(study_path), raw), overrides or {})
    grid = dict(scfg.grid)
    for item in grid_items or []:
        try:
            key, values = grid_mod.parse_grid_item(item)
        except ValueError as exc:
            raise MoescopeError(str(exc)) from exc
        grid[key] = values
    scfg = dataclasses.replace(scfg, grid=grid, seeds=list(seeds) if seeds else scfg.seeds)
    return study, scfg


def plan_sweep(study: dict[str, Any], scfg: SweepConfig, out_dir: Path) -> list[dict[str, Any]]:
    """One spec per cell, every cell's config validated before anything runs or is written."""
    from moescope.demo import DemoConfig
    from moescope.train.config import base_run_config, resolve_arms

    try:
        cells = grid_mod.expand_cells(scfg.grid, scfg.seeds)
    except ValueError as exc:
        raise MoescopeError(f"sweep: {exc}") from exc
    if grid_mod.SEED_KEY in scfg.grid:
        raise MoescopeError(f"sweep: {grid_mod.SEED_KEY} is set by --seeds, not by the grid")
    specs = []
    for cell in cells:
        cfg = from_dict(DemoConfig, deep_merge(study, cell.overrides()))
        try:
            resolve_arms(cfg.experiment)
        except MoescopeError as exc:
            raise MoescopeError(f"sweep cell {cell.cell_id}: {exc}") from exc
        data_key = _key(to_dict(cfg.data))
        data_dir = out_dir / "data" / data_key
        base_dir = None
        arm_keys = {}
        if scfg.share_base and cfg.experiment.base.init == "scratch":
            experiment = dataclasses.replace(cfg.experiment, data_dir=str(data_dir))
            base_key = _key(stage_identity(base_run_config(experiment)))
            base_dir = str(out_dir / "bases" / base_key)
            arm_keys = {name: _key([base_key, name, stage_identity(run)])
                        for name, run in resolve_arms(experiment).items()}
        specs.append({
            "cell_id": cell.cell_id, "point_id": cell.point_id, "point": dict(cell.point), "seed": cell.seed,
            "config": to_dict(cfg), "cell_dir": str(out_dir / "cells" / cell.cell_id), "data_dir": str(data_dir),
            "base_dir": base_dir, "cluster": scfg.cluster, "threads": None, "arm_keys": arm_keys,
        })
    # An arm stage that is the same in several cells (same base, same resolved config: e.g. the dense
    # arm of a grid over MoE settings) is trained once and copied, like the base.
    uses: dict[str, int] = {}
    for spec in specs:
        for key in spec["arm_keys"].values():
            uses[key] = uses.get(key, 0) + 1
    for spec in specs:
        spec["shared_arms"] = {name: str(out_dir / "stages" / key)
                               for name, key in spec.pop("arm_keys").items() if uses[key] > 1}
    return specs


def run_sweep(
    study: dict[str, Any], scfg: SweepConfig, out_dir: str | Path, *, workers: int = 1, executor: str = "local",
    executor_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the sweep into `out_dir`; returns the summary written to OUT/summary.json."""
    from moescope.data.build import build_dataset
    from moescope.demo import DemoConfig, same_study
    from moescope.train.config import validate_experiment

    out_dir = Path(out_dir)
    if executor not in EXECUTORS:
        raise MoescopeError(f"sweep: unknown executor {executor!r} (use one of {', '.join(EXECUTORS)})")
    if workers < 1:
        raise MoescopeError(f"sweep: --workers must be >= 1, got {workers}")
    check_executor(executor)
    specs = plan_sweep(study, scfg, out_dir)
    for spec in specs:  # a cell directory belongs to one config: refuse before running anything
        stored = Path(spec["cell_dir"]) / "cell.json"
        if stored.is_file() and not same_study(_read_cell_config(stored), spec["config"]):
            raise MoescopeError(f"{stored} holds another configuration for cell {spec['cell_id']}; "
                                f"use the original sweep settings or another --out")
    t_start = time.perf_counter()

    for spec in specs:  # every cell's settings are checked before anything is built
        validate_experiment(dataclasses.replace(from_dict(DemoConfig, spec["config"]).experiment,
                                                data_dir=spec["data_dir"]))
    # 1. data: built once per distinct [data] config, here (cheap next to training; reused when identical)
    for data_dir in dict.fromkeys(s["data_dir"] for s in specs):
        spec = next(s for s in specs if s["data_dir"] == data_dir)
        build_dataset(from_dict(DemoConfig, spec["config"]).data, data_dir)
    atomic_write_json(out_dir / "sweep.json", {"study": study, "sweep": to_dict(scfg), "cells": len(specs)})

    threads = max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else None
    todo = [s for s in specs if not (Path(s["cell_dir"]) / "result.json").is_file()]
    for s in specs:
        s["threads"] = threads
    log.info("sweep: %d cells, %d finished, %d to run (%s, %d worker%s)", len(specs), len(specs) - len(todo),
             len(todo), executor, workers, "s" if workers > 1 else "")

    # 2. shared dense bases (deterministic from config and seed), for the cells still to run
    bases = {s["base_dir"]: s for s in todo if s["base_dir"] and not _stage_done(Path(s["base_dir"]))}
    failures = _execute(run_base, list(bases.values()), executor, workers, out_dir, executor_params)[1]
    if failures:
        raise MoescopeError(f"sweep: {len(failures)} base stage(s) failed: {failures[0]}")
    shared = {}
    for s in todo:
        for arm, stage in s["shared_arms"].items():
            if not _stage_done(Path(stage)) and not (Path(s["cell_dir"]) / "run" / "arms" / arm).exists():
                shared.setdefault(stage, {**s, "arm": arm, "stage_dir": stage})
    failures = _execute(run_shared_arm, list(shared.values()), executor, workers, out_dir, executor_params)[1]
    if failures:
        raise MoescopeError(f"sweep: {len(failures)} shared arm stage(s) failed: {failures[0]}")

    # 3. cells
    results, failures = _execute(run_cell, todo, executor, workers, out_dir, executor_params)
    finished = [_current_rows(read_json_object(Path(s["cell_dir"]) / "result.json", {"rows": list}))
                for s in specs if (Path(s["cell_dir"]) / "result.json").is_file()]
    summary = write_summary(finished, scfg, out_dir, wall_s=time.perf_counter() - t_start)
    if failures:
        raise MoescopeError(f"sweep: {len(failures)} of {len(todo)} cells failed (first: {failures[0]}); "
                            f"rerun the same command to retry them")
    return summary


def _current_rows(result: dict[str, Any]) -> dict[str, Any]:
    """A finished cell's result with its summary rows read again from its analysis (metrics.json), so a
    cell finished by an earlier moescope gets the columns added since; as stored when that file is gone."""
    from moescope.demo import summary_rows

    path = Path(result.get("run_dir", "")) / "analysis" / "metrics.json"
    if result.get("run_dir") and path.is_file():
        try:
            result = {**result, "rows": summary_rows(json.loads(path.read_text(encoding="utf-8")))}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MoescopeError(f"{path}: not a moescope analysis ({type(exc).__name__}: {exc}); "
                                f"remove its cell directory to run the cell again") from exc
    return result


# --------------------------------------------------------------------------- work units (run in workers)


def run_base(spec: dict[str, Any]) -> str:
    """Train (or finish) the shared dense base stage of `spec` in its base_dir."""
    from moescope.demo import DemoConfig
    from moescope.train.config import base_run_config
    from moescope.train.trainer import train_run

    _set_threads(spec.get("threads"))
    cfg = from_dict(DemoConfig, spec["config"])
    experiment = dataclasses.replace(cfg.experiment, data_dir=spec["data_dir"])
    train_run(base_run_config(experiment), Path(spec["base_dir"]), init=None, name="base", resume=True)
    return spec["base_dir"]


def run_shared_arm(spec: dict[str, Any]) -> str:
    """Train (or finish) one arm stage shared by several cells, from the shared base."""
    from moescope.demo import DemoConfig
    from moescope.train.config import resolve_arms
    from moescope.train.trainer import train_run

    _set_threads(spec.get("threads"))
    cfg = from_dict(DemoConfig, spec["config"])
    run = resolve_arms(dataclasses.replace(cfg.experiment, data_dir=spec["data_dir"]), [spec["arm"]])[spec["arm"]]
    train_run(run, Path(spec["stage_dir"]), init=Path(spec["base_dir"]) / "final", name=spec["arm"], resume=True)
    return spec["stage_dir"]


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and analyse one cell (continuing a killed one); a finished cell is read back, never re-run."""
    from moescope.demo import DemoConfig, summary_rows, train_and_analyze
    from moescope.train.config import base_run_config, resolve_arms

    cell_dir = Path(spec["cell_dir"])
    result_path = cell_dir / "result.json"
    if result_path.is_file():
        return read_json_object(result_path, {"rows": list})
    _set_threads(spec.get("threads"))
    cfg = from_dict(DemoConfig, spec["config"])
    if not (cell_dir / "cell.json").is_file():
        atomic_write_json(cell_dir / "cell.json", {"cell_id": spec["cell_id"], "point": spec["point"],
                                                    "seed": spec["seed"], "config": spec["config"]})
    run_dir = cell_dir / "run"
    experiment = dataclasses.replace(cfg.experiment, data_dir=spec["data_dir"])
    if spec.get("base_dir") and not (run_dir / "base").exists():
        _copy_stage(Path(spec["base_dir"]), run_dir / "base", base_run_config(experiment), "scratch")
    for arm, stage in spec.get("shared_arms", {}).items():
        if not (run_dir / "arms" / arm).exists() and _stage_done(Path(stage)):
            _copy_stage(Path(stage), run_dir / "arms" / arm, resolve_arms(experiment, [arm])[arm],
                        str(run_dir / "base" / "final"), keep_snapshots=True)
    t0 = time.perf_counter()
    summary, metrics, timings = train_and_analyze(cfg, spec["data_dir"], run_dir, resume=True, progress=False,
                                                  cluster=spec.get("cluster", False))
    result = {"cell_id": spec["cell_id"], "point_id": spec["point_id"], "point": spec["point"], "seed": spec["seed"],
              "rows": summary_rows(metrics), "timings": {**timings, "cell_s": time.perf_counter() - t0},
              "train_tokens_per_s": {a: s.get("train_tokens_per_s") for a, s in summary.items()},
              "run_dir": str(run_dir)}
    atomic_write_json(result_path, result)
    return result


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _stage_done(stage: Path) -> bool:
    return (stage / "summary.json").is_file() and (stage / "final").is_dir()


def _copy_stage(src: Path, dst: Path, run: Any, init: str, *, keep_snapshots: bool = False) -> None:
    """A finished shared stage into a cell's run directory (model, config, summary, curve; no checkpoints).

    Its config.json then states this cell's RunConfig and init, which differ from
    the shared copy's only where :func:`stage_identity` says the stage cannot tell;
    the trainer's resume finds the stage complete with the cell's config and returns
    its summary, so the cell's run directory reads like one trained in place.
    Arms keep their snapshots (the analysis reads them); the base does not need its own.
    """
    if not _stage_done(src):
        raise MoescopeError(f"shared stage {src} is not finished")
    stored = read_json_object(src / "config.json", {"config": dict})
    if stage_identity(stored["config"]) != stage_identity(run):
        raise MoescopeError(f"shared stage {src} was trained with another configuration")
    skip = ["checkpoints", "*.lock", ".*.tmp", ".*.old"] + ([] if keep_snapshots else ["snapshots"])
    with atomic_directory(dst) as tmp:  # a killed copy leaves a temporary the next copy of dst removes
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip), dirs_exist_ok=True)
        atomic_write_json(tmp / "config.json", {**stored, "config": to_dict(run), "init": init})


# What a dense stage never reads: it has no router, so MoE settings, aux losses, collapse
# detection and the router learning rate cannot change a byte of it (the shared-stage test
# holds a copied stage equal to one trained in place).
DENSE_UNUSED = ("moe", "loss", "collapse")


def stage_identity(run: Any) -> dict[str, Any]:
    """The part of a stage's RunConfig that decides its weights: two stages with equal identities are one."""
    from moescope.train.config import comparable_config

    d = comparable_config(run)
    if d["arch"] == "dense":
        d = {k: v for k, v in d.items() if k not in DENSE_UNUSED}
        d["optim"] = {k: v for k, v in d["optim"].items() if k != "router_learning_rate_mult"}
    return d


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- executors


def check_executor(executor: str) -> None:
    """Refuse, before any data is built or cell run, an executor this machine cannot use."""
    if executor == "local":
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise MoescopeError(f"sweep: --executor {executor} needs submitit, which is not installed "
                            "(pip install 'moescope[sweep]')") from None
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None] if executor == "slurm" else []
    if missing:
        raise MoescopeError(f"sweep: --executor slurm needs SLURM, but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not on PATH on this machine (submit from a "
                            "SLURM login node, or use --executor local)")


def _execute(fn: Callable[[dict], Any], specs: list[dict], executor: str, workers: int, out_dir: Path,
             params: dict[str, Any] | None) -> tuple[list[Any], list[str]]:
    """Run fn over specs; returns (results, failure messages). Failures never stop the other cells."""
    results: list[Any] = []
    failures: list[str] = []
    if not specs:
        return results, failures
    if executor == "local" and workers == 1:
        for spec in specs:
            try:
                results.append(fn(spec))
            except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                failures.append(_failure(spec, exc))
        return results, failures
    if executor == "local":
        from concurrent.futures import as_completed

        with process_pool(workers) as pool:
            futures = {pool.submit(_pool_unit, fn, spec): spec for spec in specs}
            for fut in as_completed(futures):
                try:
                    results.append(fut.result())
                except Exception as exc:  # noqa: BLE001
                    failures.append(_failure(futures[fut], exc))
        return results, failures
    import submitit  # present: check_executor

    folder = out_dir / "submitit"
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:
        ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(**(params or {}))
    jobs = [(ex.submit(fn, spec), spec) for spec in specs]
    for job, spec in jobs:
        try:
            results.append(job.result())
        except Exception as exc:  # noqa: BLE001
            failures.append(_failure(spec, exc))
    return results, failures


def process_pool(workers: int, grace_s: float = ORPHAN_GRACE_S) -> ProcessPoolExecutor:
    """A spawn pool (a fresh interpreter per worker: no forked torch/OpenMP state) whose workers stop
    when this process dies, even by SIGKILL: none is left training, writing cells a rerun also writes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(), 0.5, grace_s))


def _pool_unit(fn: Callable[[dict], Any], spec: dict) -> Any:
    """One work unit in a pool worker. A worker whose sweep process died exits as soon as the unit ends
    (stopped by the watchdog's SIGTERM, or finished): its result has no reader."""
    try:
        return fn(spec)
    finally:
        if orphaned():
            os._exit(ORPHAN_EXIT_CODE)


def _failure(spec: dict, exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{spec.get('cell_id', spec.get('base_dir'))}: {exc.__class__.__name__}: {msg[-1] if msg else ''}"
    log.error("sweep: %s", text)
    return text


# --------------------------------------------------------------------------- summary


def write_summary(results: list[dict[str, Any]], scfg: SweepConfig, out_dir: Path, *, wall_s: float) -> dict[str, Any]:
    """OUT/summary.json and summary.md (between-seed means and t-intervals per cell) and the figures."""
    from moescope.sweep import plots

    rows = grid_mod.aggregate_cells(results, scfg.confidence_level)
    contrasts = grid_mod.axis_contrasts(results, scfg.grid, "loss_vs_dense", scfg.confidence_level)
    figs = {}
    fig_dir = out_dir / "figures"
    for name, path in (
        ("nmi_vs_loss_difference", plots.plot_nmi_vs_loss_difference(rows, fig_dir / "nmi_vs_loss_difference.png",
                                                                     scfg.confidence_level)),
        ("loss_vs_dense", plots.plot_cells(rows, "loss_vs_dense", "held-out loss - dense (nats/token, paired)",
                                           fig_dir / "loss_vs_dense.png")),
        ("nmi", plots.plot_cells(rows, "nmi", "best-layer NMI(domain; expert)", fig_dir / "nmi.png")),
    ):
        if path is not None:
            figs[name] = str(path)
    summary = {
        "interval": (f"mean over seeds with a {100 * scfg.confidence_level:.0f}% Student-t interval "
                     "(n - 1 degrees of freedom; none for n = 1)"),
        "grid": scfg.grid, "seeds": scfg.seeds, "n_cells_finished": len(results),
        "cell_seconds": sum(r.get("timings", {}).get("cell_s", 0.0) for r in results),
        "wall_s_this_invocation": wall_s, "rows": rows, "contrasts": contrasts, "figures": figs,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "summary.md", format_markdown(rows, scfg, contrasts) + "\n")
    return summary


def format_markdown(rows: list[dict[str, Any]], scfg: SweepConfig, contrasts: list[dict[str, Any]] = ()) -> str:
    """Markdown tables: a row per (grid point, arm), each metric as mean [t-interval] over seeds; each MoE
    arm's NMI and load CV per layer; and each grid axis's paired change of the loss difference."""
    level = f"{100 * scfg.confidence_level:.0f}%"
    head = ["cell", "arm", "seeds", "eval loss", "loss - dense (paired)", "best-layer NMI", "max load CV"]
    lines = [f"Mean over seeds [{level} t-interval, n - 1 df; no interval for one seed].", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["point_id"], r["arm"], str(len(r["seeds"])), format_seed_interval(r.get("eval_loss")),
            format_seed_interval(r.get("loss_vs_dense"), 4, signed=True), format_seed_interval(r.get("nmi")),
            format_seed_interval(r.get("load_cv_max"), 2),
        ]) + " |")
    layered = [r for r in rows if r.get("layers")]
    if layered:
        lines += ["", "Per MoE layer, mean over seeds [t-interval].", "",
                  "| cell | arm | layer | NMI | load CV |", "|---|---|---|---|---|"]
        for r in layered:
            for layer, m in r["layers"].items():
                lines.append(f"| {r['point_id']} | {r['arm']} | {layer} | {format_seed_interval(m['nmi'])} | "
                             f"{format_seed_interval(m['load_cv'], 2)} |")
    if contrasts:
        lines += ["", "Each grid axis against its first value: the change in loss - dense, paired within a seed "
                  "(other axes held equal, averaged over their values), mean over seeds [t-interval].", "",
                  "| axis | value vs first | arm | seeds | change | per seed |", "|---|---|---|---|---|---|"]
        for c in contrasts:
            per = " / ".join(f"{v:+.4f}" for v in c["per_seed"].values())
            lines.append(f"| {c['axis']} | {c['value']} vs {c['vs']} | {c['arm']} | {len(c['per_seed'])} | "
                         f"{format_seed_interval(c['change'], 4, signed=True)} | {per} |")
    return "\n".join(lines)


def _read_cell_config(path: Path) -> Any:
    """The study config a cell.json holds (None when the file cannot be read: then it differs)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("config")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
