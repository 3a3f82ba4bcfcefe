"""Layer 2/3 tests: batch files, history/ensemble round trips, spawn pool = inline, failing batch named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moescope.cluster.components import TOKEN_TYPES
from moescope.cluster.io import (
    load_ensemble,
    load_merge_history,
    read_batch,
    save_merge_history,
    write_batch,
)
from moescope.cluster.merge import MergeConfig, merge_iteration
from moescope.cluster.pipeline import ClusterRunConfig, analyze_batches, make_tasks, run_merges
from moescope.errors import MoescopeError


def planted_batch(rng, n_tokens=1200, n_layers=2, n_experts=4, noise=0.15):
    """Two MoE layers, top-1: token kind p takes expert path[layer][p]; kind = domain."""
    kind = rng.integers(0, n_experts, size=n_tokens)
    acts = np.zeros((n_tokens, n_layers * n_experts), dtype=np.float32)
    for layer in range(n_layers):
        perm = np.roll(np.arange(n_experts), layer)
        expert = perm[kind]
        flip = rng.random(n_tokens) < noise
        expert[flip] = rng.integers(0, n_experts, size=flip.sum())
        acts[np.arange(n_tokens), layer * n_experts + expert] = 1.0
    labels = [f"L{layer + 2}.e{e}" for layer in range(n_layers) for e in range(n_experts)]
    arrays = {
        "token_id": rng.integers(0, 100, size=n_tokens),
        "domain": kind.astype(np.int64),
        "block": np.arange(n_tokens) // 100,
        "position": np.arange(n_tokens) % 100,
        "token_type": rng.integers(0, len(TOKEN_TYPES), size=n_tokens),
    }
    meta = {"name": "", "labels": labels, "domains": [f"d{e}" for e in range(n_experts)], "token_types": list(TOKEN_TYPES),
            "n_tokens": n_tokens}
    return acts, arrays, meta


def make_batches(root, n=3):
    rng = np.random.default_rng(0)
    dirs = []
    for i in range(n):
        acts, arrays, meta = planted_batch(rng)
        dirs.append(write_batch(root / "batches" / f"seed{i}", acts, arrays, {**meta, "name": f"seed{i}"}))
    return dirs


def test_batch_and_history_round_trip(tmp_path):
    (batch,) = make_batches(tmp_path, n=1)
    acts, arrays, meta = read_batch(batch)
    assert acts.shape == (1200, 8) and arrays["domain"].shape == (1200,) and meta["labels"][0] == "L2.e0"
    hist = merge_iteration(np.asarray(acts), MergeConfig(alpha=0.3, pair_selection="mcmc", seed=4), labels=meta["labels"])
    path = save_merge_history(hist, tmp_path / "h.npz")
    back = load_merge_history(path)
    assert back.labels == hist.labels and back.dropped == hist.dropped and back.config == hist.config
    for key in ("assignments", "merges", "costs", "mdl"):
        assert np.array_equal(getattr(back, key), getattr(hist, key))


def test_parallel_spawn_run_equals_serial_run(tmp_path):
    batches = make_batches(tmp_path)
    merge = MergeConfig(alpha=0.5, pair_selection="range", range_threshold_bits=0.05, seed=3)
    serial = analyze_batches(batches, tmp_path / "serial", ClusterRunConfig(merge=merge, workers=1))
    parallel = analyze_batches(batches, tmp_path / "parallel", ClusterRunConfig(merge=merge, workers=2))
    assert serial.members == parallel.members == ["seed0", "seed1", "seed2"]
    for name in serial.members:
        for a, b in ((serial.histories, parallel.histories), (serial.null_histories, parallel.null_histories)):
            assert np.array_equal(a[name].assignments, b[name].assignments)
            assert np.array_equal(a[name].costs, b[name].costs)
    for m in serial.distances:
        assert np.array_equal(serial.distances[m], parallel.distances[m])
    # seeds differ between members (member i merges with seed + i)
    assert [h.config.seed for h in serial.histories.values()] == [3, 4, 5]
    # outputs on disk: ensembles load back, plots exist, the summary is JSON
    norm, dist, doc = load_ensemble(tmp_path / "serial")
    assert np.array_equal(norm.assignments, serial.normalized.assignments)
    assert np.array_equal(dist["pair_matching"], serial.distances["pair_matching"])
    assert all(p.is_file() and p.stat().st_size > 1000 for p in serial.plots)
    summary = json.loads((tmp_path / "serial" / "cluster_summary.json").read_text())
    assert summary["members"] == ["seed0", "seed1", "seed2"]


def test_planted_pathways_are_stable_and_beat_the_null(tmp_path):
    batches = make_batches(tmp_path)
    res = analyze_batches(batches, tmp_path / "out", ClusterRunConfig(merge=MergeConfig(alpha=1.0, target_k=2)))
    # at k = 4 every batch finds the planted (layer-2 expert e, layer-3 expert e-1) pathways
    final = res.normalized.assignments[:, 4]  # 8 components, 4 merges -> k = 4
    d = res.distances["perm_invariant_hamming"][4]
    assert np.all(d == 0)
    for row in final:
        groups = {frozenset(np.array(res.normalized.labels)[row == g]) for g in np.unique(row)}
        assert groups == {frozenset({f"L2.e{e}", f"L3.e{(e - 1) % 4}"}) for e in range(4)}
    null_d = res.null_distances["perm_invariant_hamming"][4]
    assert null_d[np.triu_indices(3, 1)].mean() > 0
    # the MDL-optimal grouping is the planted one; each of its clusters serves most tokens of its own domain (= token kind) and few of the others
    assert res.summary["mdl_optimal_k"] == {"seed0": 4, "seed1": 4, "seed2": 4}
    clusters = res.summary["final_clusters"]["seed0"]["groups"]
    acts, _, _ = read_batch(batches[0])
    masks = np.asarray(acts) > 0
    for g in clusters:
        cols = [res.normalized.labels.index(c) for c in g["components"]]
        both, either = masks[:, cols].all(axis=1).sum(), masks[:, cols].any(axis=1).sum()
        assert g["cohesion"] == pytest.approx(both / either, abs=1e-4) and g["cohesion"] > 0.5
        e = int(sorted(g["components"])[0].split(".e")[1])
        for d in range(4):
            assert (g["domains"][f"d{d}"] > 0.8) == (d == e)


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_batch_is_named_and_other_results_kept(tmp_path, workers):
    batches = make_batches(tmp_path)
    (batches[1] / "activations.npy").write_bytes(b"not an array")
    tasks = make_tasks(batches, tmp_path / "out", MergeConfig())
    with pytest.raises(MoescopeError, match=r"1 of 3 batches: batch 'seed1'.*unreadable.*other 2 batch histories are kept"):
        run_merges(tasks, workers=workers)
    assert (tmp_path / "out" / "histories" / "seed0.npz").is_file()
    assert (tmp_path / "out" / "histories" / "seed2.npz").is_file()
    assert not (tmp_path / "out" / "histories" / "seed1.npz").exists()


def test_batch_with_only_dead_components_is_a_clear_error(tmp_path):
    (batch,) = make_batches(tmp_path, n=1)
    acts, arrays, meta = read_batch(batch)
    write_batch(batch, np.zeros_like(np.asarray(acts)), arrays, meta)
    with pytest.raises(MoescopeError, match=r"batch 'seed0'.*every component is dead"):
        run_merges(make_tasks([batch], tmp_path / "out", MergeConfig()), workers=1)
