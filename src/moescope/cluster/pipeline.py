"""Clustering orchestration (layer 3): capture batches, one merge per batch in a process pool, compare.

Workers are started with the *spawn* method and receive only file paths, a
config dict and a seed; they return the path of the history they wrote.  The
reference's fork-based pool broke because model state (CUDA in their case)
does not survive fork; spawned workers here never even import torch.  A
failing batch does not stop the others: their histories are on disk, and the
error names every batch that failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moescope.cluster.components import null_blocks
from moescope.cluster.distances import DISTANCE_METHODS, compute_distances
from moescope.cluster.ensemble import NormalizedHistories, normalize_ensemble
from moescope.cluster.evidence import ALPHAS, alpha_sensitivity, measure_evidence
from moescope.cluster.io import (
    CaptureConfig,
    MergeTask,
    capture_batches,
    describe_clusters,
    load_merge_history,
    plot_cluster_sizes,
    plot_distance_vs_k,
    plot_final_clusters,
    process_batch,
    read_batch,
    resolve_model_dir,
    save_ensemble,
)
from moescope.cluster.merge import MergeConfig, MergeHistory, shuffle_tokens
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_json
from moescope.io.config import bounded, check_fields, to_dict
from moescope.io.provenance import environment_info

log = logging.getLogger(__name__)

NULL_SEED_OFFSET = 10_000  # null member i shuffles tokens with seed merge.seed + NULL_SEED_OFFSET + i


@dataclass
class ClusterRunConfig:
    """A whole clustering run: capture, merge, null model, comparison, parallelism."""

    merge: MergeConfig = field(default_factory=MergeConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    workers: int = bounded(1, low=1, high=1024)  # 1 = merge inline in this process (debugging); >1 = spawn-context pool
    null_model: bool = True  # also merge token-shuffled copies of every batch
    distance_methods: list[str] = field(default_factory=lambda: list(DISTANCE_METHODS))
    # alpha-sensitivity table: k and stability re-merged at each alpha (batches and nulls); [] = skip
    sensitivity_alphas: list[float] = field(default_factory=lambda: list(ALPHAS))

    def __post_init__(self) -> None:
        check_fields(self, "cluster")
        for m in self.distance_methods:
            if m not in DISTANCE_METHODS:
                raise MoescopeError(f"unknown distance method {m!r}; choose from {list(DISTANCE_METHODS)}")


@dataclass
class ClusteringResults:
    out_dir: Path
    members: list[str]
    histories: dict[str, MergeHistory]
    normalized: NormalizedHistories
    distances: dict[str, np.ndarray]
    null_histories: dict[str, MergeHistory]
    null_normalized: NormalizedHistories | None
    null_distances: dict[str, np.ndarray]
    summary: dict
    plots: list[Path]


def _limit_threads(n_threads: int) -> None:
    """Worker initializer: share the cores between workers instead of oversubscribing BLAS."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n_threads)


def run_merges(tasks: list[MergeTask], workers: int = 1) -> dict[str, Path]:
    """Run every task; {name: history path}.  Raises naming the failed batches after the rest finish."""
    from tqdm.auto import tqdm

    done: dict[str, Path] = {}
    failed: dict[str, str] = {}
    if workers <= 1 or len(tasks) <= 1:
        for task in tqdm(tasks, desc="merge batches", unit="batch"):
            try:
                done[task.name] = Path(process_batch(task))
            except Exception as exc:  # noqa: BLE001 - every batch is reported, none stops the rest
                failed[task.name] = f"{type(exc).__name__}: {exc}"
    else:
        n = min(workers, len(tasks))
        ctx = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // n)
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_limit_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(process_batch, task): task for task in tasks}
            for fut in tqdm(as_completed(futures), total=len(futures), desc="merge batches", unit="batch"):
                task = futures[fut]
                try:
                    done[task.name] = Path(fut.result())
                except Exception as exc:  # noqa: BLE001
                    failed[task.name] = f"{type(exc).__name__}: {exc}"
    if failed:
        kept = f"; the other {len(done)} batch histories are kept" if done else ""
        detail = "; ".join(f"batch {name!r}: {msg}" for name, msg in sorted(failed.items()))
        raise MoescopeError(f"merge failed for {len(failed)} of {len(tasks)} batches: {detail}{kept}")
    return {task.name: done[task.name] for task in tasks}


def make_tasks(batch_dirs: list[Path], out_dir: Path, merge: MergeConfig, null: bool = False) -> list[MergeTask]:
    """One task per batch; member i merges with seed merge.seed + i (its null with a shuffled copy)."""
    sub = "null_histories" if null else "histories"
    tasks = []
    for i, batch in enumerate(batch_dirs):
        name = Path(batch).name
        tasks.append(MergeTask(
            name=f"{name} (null)" if null else name,
            batch_dir=str(batch),
            result_path=str(out_dir / sub / f"{name}.npz"),
            merge=to_dict(merge),
            seed=merge.seed + i,
            shuffle_seed=merge.seed + NULL_SEED_OFFSET + i if null else None,
        ))
    return tasks


def _compare(histories: dict[str, MergeHistory], methods: list[str]) -> tuple[NormalizedHistories, dict[str, np.ndarray]]:
    normalized = normalize_ensemble(list(histories.values()))
    return normalized, {m: compute_distances(normalized, m) for m in methods}


def analyze_batches(batch_dirs: list[Path], out_dir: str | Path, cfg: ClusterRunConfig) -> ClusteringResults:
    """Merge every captured batch (and its null), compare members, write ensemble files, summary and plots."""
    out_dir = Path(out_dir)
    batch_dirs = [Path(b) for b in batch_dirs]
    tasks = make_tasks(batch_dirs, out_dir, cfg.merge)
    if cfg.null_model:
        tasks += make_tasks(batch_dirs, out_dir, cfg.merge, null=True)
    paths = run_merges(tasks, cfg.workers)
    names = [b.name for b in batch_dirs]
    histories = {n: load_merge_history(paths[n]) for n in names}
    null_histories = {n: load_merge_history(paths[f"{n} (null)"]) for n in names} if cfg.null_model else {}

    normalized, distances = _compare(histories, cfg.distance_methods)
    null_normalized, null_distances = _compare(null_histories, cfg.distance_methods) if null_histories else (None, {})
    clusters = {n: describe_clusters(histories[n], b) for n, b in zip(names, batch_dirs)}
    summary = summarize(names, histories, normalized, distances, null_normalized, null_distances, clusters)
    if null_histories:
        summary["null_mdl_optimal_k"] = {n: int(h.n_groups[h.best_step]) for n, h in null_histories.items()}
    summary.update(null_comparison(batch_dirs, names, histories, null_histories, cfg))
    summary["config"] = to_dict(cfg)
    summary["environment"] = environment_info()
    save_ensemble(out_dir, normalized, distances, names, prefix="ensemble")
    if null_normalized is not None:
        save_ensemble(out_dir, null_normalized, null_distances, names, prefix="null_ensemble")
    atomic_write_json(out_dir / "cluster_summary.json", summary)

    plots = [plot_cluster_sizes(histories, out_dir / "cluster_sizes.png")]
    method = cfg.distance_methods[0]
    if len(names) > 1:
        plots.append(plot_distance_vs_k(normalized, distances[method], out_dir / "distance_vs_k.png",
                                        null_normalized, null_distances.get(method), method))
    for n in names:
        plots.append(plot_final_clusters(clusters[n], out_dir / f"final_clusters_{n}.png",
                                         title=f"MDL-optimal clusters of batch {n} (k = {clusters[n]['n_groups']})"))
    return ClusteringResults(out_dir, names, histories, normalized, distances, null_histories,
                             null_normalized, null_distances, summary, plots)


def null_comparison(batch_dirs: list[Path], names: list[str], histories: dict[str, MergeHistory],
                    null_histories: dict[str, MergeHistory], cfg: ClusterRunConfig) -> dict:
    """{"evidence": stability / co-firing / description length against the null, with the pathway
    sentence; "alpha_sensitivity": k and stability per alpha}. Nulls are rebuilt with the seeds the
    merge workers used (make_tasks), so the shuffled masks are exactly the ones they merged."""
    acts = [np.asarray(read_batch(b)[0]) for b in batch_dirs]
    labels = read_batch(batch_dirs[0])[2]["labels"]
    thr = cfg.merge.activation_threshold
    null_acts = [shuffle_tokens(a, np.random.default_rng(cfg.merge.seed + NULL_SEED_OFFSET + i), null_blocks(labels))
                 for i, a in enumerate(acts)] if null_histories else []

    def masks(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [a[:, [labels.index(c) for c in histories[n].labels]] > thr for a, n in zip(arrays, names)]

    ev = measure_evidence(masks(acts), [histories[n] for n in names], masks(null_acts),
                          [null_histories[n] for n in names] if null_histories else [])
    out: dict = {"evidence": ev.as_dict()}
    if cfg.sensitivity_alphas:
        out["alpha_sensitivity"] = alpha_sensitivity(acts, labels, cfg.merge, cfg.sensitivity_alphas,
                                                     null_seed=cfg.merge.seed + NULL_SEED_OFFSET)
    return out


def summarize(
    names: list[str],
    histories: dict[str, MergeHistory],
    normalized: NormalizedHistories,
    distances: dict[str, np.ndarray],
    null_normalized: NormalizedHistories | None,
    null_distances: dict[str, np.ndarray],
    clusters: dict[str, dict],
) -> dict:
    """Numbers a reader wants: mean distance between members at each k, against the null, and the final clusters."""

    def mean_pairs(norm: NormalizedHistories, dist: np.ndarray) -> list[float | None]:
        if norm.n_members < 2:
            return [None] * dist.shape[0]
        iu = np.triu_indices(norm.n_members, 1)
        return [round(float(v), 4) for v in dist[:, iu[0], iu[1]].mean(axis=1)]

    stability = {}
    for method, dist in distances.items():
        entry = {"n_groups": normalized.n_groups.mean(axis=0).round(2).tolist(), "mean_distance": mean_pairs(normalized, dist)}
        if null_normalized is not None and method in null_distances:
            entry["null_n_groups"] = null_normalized.n_groups.mean(axis=0).round(2).tolist()
            entry["null_mean_distance"] = mean_pairs(null_normalized, null_distances[method])
        stability[method] = entry
    return {
        "members": names,
        "n_components": len(normalized.labels),
        "n_tokens": {n: histories[n].n_tokens for n in names},
        "dropped": {n: histories[n].dropped for n in names},
        "mdl_optimal_k": {n: int(histories[n].n_groups[histories[n].best_step]) for n in names},
        "stability": stability,
        "final_clusters": clusters,
    }


def cluster_analysis_pipeline(
    run_or_model: str | Path,
    data_dir: str | Path | None,
    out_dir: str | Path,
    cfg: ClusterRunConfig,
    arm: str = "moe",
) -> ClusteringResults:
    """Capture activations for every batch from a saved MoE model (or a run's arm), then analyze_batches."""
    out_dir = Path(out_dir)
    model_dir, recorded = resolve_model_dir(run_or_model, arm)
    data_dir = data_dir or recorded
    if not data_dir:
        raise MoescopeError(f"{run_or_model}: no data directory recorded; pass --data DIR")
    fresh = not out_dir.exists() or not any(out_dir.iterdir())
    try:
        atomic_write_json(out_dir / "cluster_config.json", {"model_dir": str(model_dir), "data_dir": str(data_dir),
                                                            "config": to_dict(cfg)})
        log.info("capturing %s batches from %s", cfg.capture.batch_by, model_dir)
        batch_dirs = capture_batches(model_dir, data_dir, out_dir / "batches", cfg.capture)
        return analyze_batches(batch_dirs, out_dir, cfg)
    except BaseException:
        if fresh:  # a failed first attempt leaves nothing that would block the corrected rerun
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
