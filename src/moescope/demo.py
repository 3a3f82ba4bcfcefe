"""`moescope demo`: data -> dense base -> arms at matched compute -> analysis -> report (orchestration).

The preset (moescope/presets/demo.toml) holds every setting; the resolved config,
seeds and library versions are written next to the results, so the run can be
repeated exactly. An interrupted demo resumes: the data build is reused when its
config is identical and the experiment continues from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
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
from moescope.io.config import deep_merge, from_dict, load_config_file, to_dict
from moescope.io.provenance import environment_info
from moescope.presets import PRESETS, preset_path
from moescope.train.config import ExperimentConfig

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
    from moescope.analysis.pipeline import analyze_run
    from moescope.data.build import build_dataset
    from moescope.report.build import build_report
    from moescope.train.experiment import run_experiment

    out_dir = Path(out_dir)
    data_dir, run_dir = out_dir / "data", out_dir / "run"
    resolved = to_dict(cfg)
    config_path = out_dir / "demo_config.json"
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    resume = run_dir.exists()
    if resume and config_path.is_file():
        previous = json.loads(config_path.read_text(encoding="utf-8")).get("config")
        if previous != _comparable(resolved, data_dir):
            raise MoescopeError(f"{out_dir} holds a demo run with a different configuration; "
                                f"pass --overwrite to replace it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, {"config": _comparable(resolved, data_dir), "environment": environment_info(),
                                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log.info("demo 1/4: building the data in %s", data_dir)
    store = build_dataset(cfg.data, data_dir, overwrite=overwrite)
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("demo 2/4: training %s (and the dense base) in %s", ", ".join(cfg.experiment.arms), run_dir)
    experiment = dataclasses.replace(cfg.experiment, data_dir=str(store.root))
    summary = run_experiment(experiment, run_dir, resume=resume)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("demo 3/4: analysing routing on the held-out split")
    metrics = analyze_run(run_dir, cfg.analysis, progress=progress)
    timings["analyze_s"] = time.perf_counter() - t0

    if cfg.cluster_arm and cfg.cluster_arm in metrics["arms"] and metrics["arms"][cfg.cluster_arm]["kind"] == "moe":
        from moescope.cluster.pipeline import cluster_analysis_pipeline

        t0 = time.perf_counter()
        log.info("demo: clustering the experts of arm %s by co-activation", cfg.cluster_arm)
        shutil.rmtree(run_dir / "cluster", ignore_errors=True)  # cheap to redo; never mix two runs' batches
        cluster_analysis_pipeline(run_dir, data_dir, run_dir / "cluster", cfg.cluster, arm=cfg.cluster_arm)
        timings["cluster_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log.info("demo 4/4: writing the report")
    report = build_report(run_dir)
    timings["report_s"] = time.perf_counter() - t0
    result = {"report": str(report), "run_dir": str(run_dir), "data_dir": str(data_dir), "timings": timings,
              "train_summary": summary, "rows": summary_rows(metrics)}
    atomic_write_json(out_dir / "demo_summary.json", result)
    return result


def _comparable(resolved: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    out = dict(resolved)
    out["experiment"] = {**resolved["experiment"], "data_dir": str(data_dir)}
    return out


def summary_rows(metrics: dict) -> list[dict[str, Any]]:
    """One row per arm: held-out loss and, for MoE arms, the best layer's NMI and the worst load CV."""
    rows = []
    for arm, v in metrics["arms"].items():
        row: dict[str, Any] = {"arm": arm, "eval_loss": v["eval_loss"]["domain_weighted"]}
        if v.get("kind") == "moe":
            h = v["headline"]
            row.update(best_layer=h["best_layer"], nmi=h["nmi"], nmi_pvalue=h["nmi_pvalue"],
                       load_cv_max=h["load_cv_max"], max_fraction_max=h["max_fraction_max"])
        rows.append(row)
    return rows


def format_summary_table(rows: list[dict[str, Any]]) -> str:
    def iv(x: Any, d: int = 3) -> str:
        return f"{x['estimate']:.{d}f} [{x['low']:.{d}f}, {x['high']:.{d}f}]" if isinstance(x, dict) else "-"

    head = f"{'arm':<12} {'eval loss (domain-weighted)':<28} {'best-layer NMI (95% CI)':<26} {'perm. p':<9} {'max load CV':<11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = f"{r['nmi_pvalue']:.3g}" if "nmi_pvalue" in r else "-"
        cv = f"{r['load_cv_max']:.2f}" if "load_cv_max" in r else "-"
        lines.append(f"{r['arm']:<12} {iv(r['eval_loss']):<28} {iv(r.get('nmi')):<26} {p:<9} {cv:<11}")
    return "\n".join(lines)
