"""`moescope demo`: data -> dense base -> arms at matched compute -> analysis -> report (orchestration).

The preset (moescope/presets/demo.toml) holds every setting; the resolved config,
seeds and library versions are written next to the results, so the run can be
repeated exactly. An interrupted demo resumes: the data build is reused when its
config is identical and the experiment continues from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moescope.analysis.pipeline import AnalyzeConfig
from moescope.cluster.pipeline import ClusterRunConfig
from moescope.data.config import DataBuildConfig
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_json
from moescope.io.config import deep_merge, from_dict, load_config_file, to_dict, upgrade_keys
from moescope.io.jsonfile import read_json_object
from moescope.io.provenance import environment_info
from moescope.presets import PRESETS, preset_path
from moescope.report.fmt import fmt_interval, fmt_p
from moescope.train.config import ExperimentConfig, validate_experiment

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """The whole study: how to build the data, what to train, how to analyse it."""

    data: DataBuildConfig = field(default_factory=DataBuildConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    analysis: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    cluster: ClusterRunConfig = field(default_factory=ClusterRunConfig)
    cluster_arm: str | None = "moe"  # arm whose experts are clustered by co-activation; None = skip


def load_demo_config(preset: str = "demo", overrides: dict[str, Any] | None = None) -> DemoConfig:
    """A packaged preset name or a TOML/YAML path, plus nested overrides."""
    path = preset_path(preset) if preset in PRESETS else Path(preset)
    if preset not in PRESETS and not path.is_file():
        raise MoescopeError(f"unknown demo preset {preset!r}: use one of {', '.join(PRESETS)} or a config file path")
    raw = deep_merge(load_config_file(path), overrides or {})
    return from_dict(DemoConfig, raw)


def run_demo(cfg: DemoConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the study into `out_dir` (data/, run/, run/analysis/, run/report/); returns a summary."""
    from moescope.data.build import build_dataset
    from moescope.report.build import build_report

    out_dir = Path(out_dir)
    data_dir, run_dir = out_dir / "data", out_dir / "run"
    resolved = to_dict(cfg)
    config_path = out_dir / "demo_config.json"
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    resume = run_dir.exists()
    if resume and config_path.is_file():
        previous = read_json_object(config_path).get("config")
        if not same_study(previous, _comparable(resolved, data_dir)):
            raise MoescopeError(f"{out_dir} holds a demo run with a different configuration; "
                                f"pass --overwrite to replace it or choose another --out")
    # every setting is checked before the data build writes anything
    validate_experiment(dataclasses.replace(cfg.experiment, data_dir=str(data_dir)))
    created_out = not out_dir.exists()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log.info("demo 1/4: building the data in %s", data_dir)
    try:
        store = build_dataset(cfg.data, data_dir, overwrite=overwrite)
    except BaseException:
        # The data build is atomic; a failed first stage leaves no trace (not even --out) behind.
        if created_out and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    timings["data_s"] = time.perf_counter() - t0
    # Written once the data exists, so a study that could not start leaves nothing behind.
    atomic_write_json(config_path, {"config": _comparable(resolved, data_dir), "environment": environment_info(),
                                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    summary, metrics, stage_timings = train_and_analyze(cfg, store.root, run_dir, resume=resume, progress=progress)
    timings.update(stage_timings)

    t0 = time.perf_counter()
    log.info("demo 4/4: writing the report")
    report = build_report(run_dir)
    timings["report_s"] = time.perf_counter() - t0
    result = {"report": str(report), "run_dir": str(run_dir), "data_dir": str(data_dir), "timings": timings,
              "train_summary": summary, "rows": summary_rows(metrics)}
    atomic_write_json(out_dir / "demo_summary.json", result)
    return result


def train_and_analyze(
    cfg: DemoConfig, data_dir: str | Path, run_dir: Path, *, resume: bool, progress: bool = True,
    cluster: bool = True,
) -> tuple[dict, dict, dict[str, float]]:
    """Stages 2-3 of the study on a built data directory: (train summary, metrics, timings).

    Shared by the demo and by every cell of `moescope sweep`.
    """
    from moescope.analysis.pipeline import analyze_run
    from moescope.train.experiment import run_experiment

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log.info("demo 2/4: training %s (and the dense base) in %s", ", ".join(cfg.experiment.arms), run_dir)
    experiment = dataclasses.replace(cfg.experiment, data_dir=str(data_dir))
    summary = run_experiment(experiment, run_dir, resume=resume)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("demo 3/4: analysing routing on the held-out split")
    metrics = analyze_run(run_dir, cfg.analysis, progress=progress)
    timings["analyze_s"] = time.perf_counter() - t0

    arm = cfg.cluster_arm
    if cluster and arm and arm in metrics["arms"] and metrics["arms"][arm]["kind"] == "moe":
        from moescope.cluster.pipeline import cluster_analysis_pipeline

        t0 = time.perf_counter()
        log.info("demo: clustering the experts of arm %s by co-activation", arm)
        shutil.rmtree(run_dir / "cluster", ignore_errors=True)  # cheap to redo; never mix two runs' batches
        cluster_analysis_pipeline(run_dir, Path(data_dir), run_dir / "cluster", cfg.cluster, arm=arm)
        timings["cluster_s"] = time.perf_counter() - t0
    return summary, metrics, timings


def stored_study_config(stored: Any) -> dict[str, Any] | None:
    """A study config saved by an earlier moescope, in today's form: renamed keys upgraded, settings
    added since filled with their defaults (a new setting's default is the old behaviour), so adding
    an option never makes an existing demo or sweep directory unresumable. None if it cannot be read."""
    if not isinstance(stored, dict):
        return None
    try:
        return to_dict(from_dict(DemoConfig, upgrade_keys(stored)))
    except MoescopeError:
        return None


def same_study(stored: Any, current: dict[str, Any]) -> bool:
    """Whether a saved study config is `current` (a resolved DemoConfig dict). The data directory's
    path is left out: it lies inside the output directory, whose spelling (relative, absolute, moved)
    says nothing about the data, which every stage checks by its manifest's sha256."""
    def without_data_dir(cfg: dict[str, Any]) -> dict[str, Any]:
        return {**cfg, "experiment": {k: v for k, v in cfg.get("experiment", {}).items() if k != "data_dir"}}

    upgraded = stored_study_config(stored)
    return upgraded is not None and without_data_dir(upgraded) == without_data_dir(current)


def _comparable(resolved: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    out = dict(resolved)
    out["experiment"] = {**resolved["experiment"], "data_dir": str(data_dir)}
    return out


def summary_rows(metrics: dict) -> list[dict[str, Any]]:
    """One row per arm: held-out loss and, for MoE arms, the best layer's NMI (and, with a step-0 snapshot,
    its NMI at the upcycled start), the worst load CV and each layer's NMI and load CV."""
    rows = []
    for arm, v in metrics["arms"].items():
        row: dict[str, Any] = {"arm": arm, "eval_loss": v["eval_loss"]["domain_weighted"]}
        if "eval_loss_vs_dense" in v:
            row["loss_vs_dense"] = {**v["eval_loss_vs_dense"]["domain_weighted"],
                                    "pvalue": v["eval_loss_vs_dense"]["pvalue"]}
        if v.get("kind") == "moe":
            h = v["headline"]
            row.update(best_layer=h["best_layer"], nmi=h["nmi"], nmi_pvalue=h["nmi_pvalue"],
                       load_cv_max=h["load_cv_max"], max_fraction_max=h["max_fraction_max"],
                       layers={layer: {"nmi": lv["specialization"]["nmi"]["estimate"],
                                       "load_cv": lv["load"]["load_cv"]["estimate"]}
                               for layer, lv in v["layers"].items()})
            if "nmi_start" in h:  # the best layer's NMI at the upcycled start (step-0 snapshot)
                row["nmi_start"] = h["nmi_start"]
        rows.append(row)
    return rows


def format_summary_table(rows: list[dict[str, Any]]) -> str:
    def iv(x: Any, d: int = 3) -> str:
        return fmt_interval(x, d) if isinstance(x, dict) else "-"

    head = (f"{'arm':<12} {'eval loss (domain-weighted)':<28} {'loss - dense (paired 95% CI, p)':<40} "
            f"{'best-layer NMI (95% CI)':<26} {'perm. p':<9} {'max load CV':<11}")
    start = any("nmi_start" in r for r in rows)  # a column only when some arm saved a step-0 snapshot
    head = (head + ("  NMI at step 0 (same layer)" if start else "")).rstrip()
    lines = [head, "-" * len(head)]
    for r in rows:
        p = fmt_p(r["nmi_pvalue"]) if "nmi_pvalue" in r else "-"
        cv = f"{r['load_cv_max']:.2f}" if "load_cv_max" in r else "-"
        diff = r.get("loss_vs_dense")
        paired = f"{fmt_interval(diff, 4, signed=True)} p={fmt_p(diff['pvalue'], '.2g')}" if diff else "-"
        line = f"{r['arm']:<12} {iv(r['eval_loss']):<28} {paired:<40} {iv(r.get('nmi')):<26} {p:<9} {cv:<11}"
        lines.append((line + (f"  {iv(r.get('nmi_start'))}" if start else "")).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- several seeds


def run_demo_seeds(cfg: DemoConfig, out_dir: str | Path, n_seeds: int, *, overwrite: bool = False,
                   workers: int = 1) -> dict[str, Any]:
    """The study over `n_seeds` seeds (experiment.train.seed, +1, ...) through the sweep runner.

    Layout is the sweep's (OUT/cells/base,seed=S/run/...); every seed's report gets an
    "Over seeds" section with the between-seed means and t-intervals, and
    OUT/summary.{md,json} hold the same table.
    """
    from moescope.report.build import build_report
    from moescope.sweep.grid import aggregate_cells, format_seed_interval
    from moescope.sweep.runner import SweepConfig, run_sweep

    if n_seeds < 1:
        raise MoescopeError(f"--seeds must be >= 1, got {n_seeds}")
    out_dir = Path(out_dir)
    if overwrite:
        for part in ("cells", "bases", "summary.json", "summary.md", "figures"):
            path = out_dir / part
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    first = cfg.experiment.train.seed
    scfg = SweepConfig(study="demo", seeds=list(range(first, first + n_seeds)), share_base=False, cluster=True)
    t0 = time.perf_counter()
    summary = run_sweep(to_dict(cfg), scfg, out_dir, workers=workers)
    results = [read_json_object(p)
               for p in sorted((out_dir / "cells").glob("*/result.json"))]
    rows = aggregate_cells(results, scfg.confidence_level)
    seeds_table = {
        "title": f"Between seeds: mean [{100 * scfg.confidence_level:.0f}% t-interval] over {n_seeds} seeds "
                 f"({', '.join(map(str, scfg.seeds))})",
        "columns": ["arm", "n", "eval loss (domain-weighted)", "loss - dense (paired)", "best-layer NMI",
                    "max load CV"],
        "rows": [[r["arm"], len(r["seeds"]), format_seed_interval(r.get("eval_loss")),
                  format_seed_interval(r.get("loss_vs_dense"), 4, True), format_seed_interval(r.get("nmi")),
                  format_seed_interval(r.get("load_cv_max"), 2)] for r in rows],
        "caption": "Each seed reruns the whole study (base, arms, analysis) with another experiment.train.seed on "
                   "the same data; the interval is a Student-t interval over the per-seed estimates (n - 1 degrees "
                   "of freedom), so it shows how much a result moves between reruns.",
    }
    reports = []
    for res in results:
        run_dir = Path(res["run_dir"])
        atomic_write_json(run_dir / "analysis" / "seeds.json", seeds_table)
        reports.append(str(build_report(run_dir)))
    result = {"reports": reports, "seeds": scfg.seeds, "rows": rows, "seeds_table": seeds_table,
              "wall_s": time.perf_counter() - t0, "cell_seconds": summary["cell_seconds"]}
    atomic_write_json(out_dir / "demo_summary.json", result)
    return result


def format_seeds_table(seeds_table: dict[str, Any]) -> str:
    widths = [12, 3, 28, 32, 26, 18]
    head = " ".join(f"{c:<{w}}" for c, w in zip(seeds_table["columns"], widths)).rstrip()
    lines = [seeds_table["title"], head, "-" * len(head)]
    lines += [" ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip() for row in seeds_table["rows"]]
    return "\n".join(lines)
