"""2-D maps of held-out embeddings: projections, first-choice experts, the written picture."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analysis.table import RoutingTable
from moescope.embed.compare import plot_embedding_map
from moescope.embed.evaluate import first_choice_experts
from moescope.embed.stats import project_2d


def _clusters(n_each=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 16) * 5
    x = np.concatenate([c + rng.normal(size=(n_each, 16)) for c in centres])
    return x, ["code"] * n_each + ["math"] * n_each + ["prose"] * n_each


def test_pca_matches_the_leading_singular_vectors():
    x, _ = _clusters()
    xy = project_2d(x, "pca")
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    for j in range(2):  # equal up to each component's sign
        np.testing.assert_allclose(np.abs(xy[:, j]), np.abs(u[:, j] * s[j]), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(x, "tsne")


def test_first_choice_expert_is_the_majority_of_first_choices():
    # text 0: tokens choose 2, 2, 1 first; text 1: 0, 3 (tie -> lower); text 2: no tokens
    block = np.array([0, 0, 0, 1, 1])
    first = np.array([[2, 0], [2, 1], [1, 2], [0, 1], [3, 0]])
    n = len(block)
    table = RoutingTable(token_id=np.zeros(n, int), block=block, position=np.zeros(n, int), domain=np.zeros(n, int),
                         expert_index=first, gate_weight=np.ones((n, 2)), router_probs=np.full((n, 4), 0.25))
    np.testing.assert_array_equal(first_choice_experts(table, 3), [2, 0, -1])


def test_embedding_map_is_written(tmp_path):
    x, domains = _clusters()
    experts = np.repeat([0, 1, 1], 12)
    path = plot_embedding_map({"dense": (x, None), "moe_top1": (x, experts)}, domains, "pca", tmp_path / "m.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary file left behind


@pytest.mark.slow  # umap-learn compiles its numba kernels on first use
def test_umap_separates_clear_clusters():
    x, domains = _clusters(n_each=20)
    xy = project_2d(x, "umap", seed=0)
    labels = np.array(domains)
    centres = np.stack([xy[labels == d].mean(0) for d in ("code", "math", "prose")])
    nearest = np.argmin(((xy[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert (np.array(["code", "math", "prose"])[nearest] == labels).mean() > 0.95
    np.testing.assert_array_equal(xy, project_2d(x, "umap", seed=0))  # seeded: reproducible
