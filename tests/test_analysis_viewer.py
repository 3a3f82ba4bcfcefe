"""viewer.json content: per-sample tokens, experts and probabilities in block order."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analysis.table import RoutingTable
from moescope.analysis.viewer import choose_sample_rows, viewer_arm


def table_for(expert_of_position: np.ndarray, shuffle_seed: int) -> RoutingTable:
    """Blocks 10 (domain 0) and 11 (domain 1), 3 tokens each, rows in shuffled order."""
    block = np.repeat([10, 11], 3)
    position = np.tile(np.arange(3), 2)
    expert = expert_of_position[block - 10, position]
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), expert] = 0.7
    order = np.random.default_rng(shuffle_seed).permutation(6)
    return RoutingTable(
        token_id=np.arange(6)[order], block=block[order], position=position[order], domain=(block - 10)[order],
        expert_index=expert[order, None], gate_weight=np.ones((6, 1))[order], router_probs=probs[order],
    )


def test_viewer_arm_orders_tokens_by_position() -> None:
    layer2 = table_for(np.array([[0, 1, 2], [3, 3, 0]]), 0)
    layer3 = table_for(np.array([[1, 1, 1], [2, 0, 2]]), 1)
    pieces = {10: ["def", " f", "()"], 11: ["The", " cat", "."]}
    arm = viewer_arm({3: layer3, 2: layer2}, [10, 11], ["code", "prose"], pieces)
    assert arm["layers"] == [2, 3] and arm["n_experts"] == 4
    first, second = arm["samples"]
    assert first["domain"] == "code" and first["tokens"] == ["def", " f", "()"]
    assert first["experts"] == {"2": [0, 1, 2], "3": [1, 1, 1]}
    assert second["experts"] == {"2": [3, 3, 0], "3": [2, 0, 2]}
    assert second["probs"]["2"] == pytest.approx([0.7, 0.7, 0.7])
    assert second["text_id"] == "prose:eval-block-11"
    with pytest.raises(ValueError, match="block 12"):
        viewer_arm({2: layer2}, [12], ["code", "prose"], {12: ["x"]})
    with pytest.raises(ValueError, match="token texts"):
        viewer_arm({2: layer2}, [10], ["code", "prose"], {10: ["x"]})


def test_choose_sample_rows() -> None:
    rows = np.arange(20, 30)
    domain = np.array([0] * 6 + [1] * 4)
    assert choose_sample_rows(rows, domain, 3) == [20, 22, 25, 26, 28, 29]  # numpy rounds halves to even
    assert choose_sample_rows(rows, domain, 10) == list(range(20, 30))


def test_viewer_topk_packing_and_dominant_domains() -> None:
    from report_fixtures import planted_table

    from moescope.analysis.viewer import expert_domains, unpack_topk

    tables = {layer: planted_table(layer) for layer in (3, 7)}
    pieces = {row: [f"t{j}" for j in range(48)] for row in range(10)}
    arm = viewer_arm(tables, [0, 1], [f"d{i}" for i in range(5)], pieces, max_tokens=20)
    assert arm["top_k"] == 8 and arm["n_experts"] == 64 and arm["layers"] == [3, 7]
    sample = arm["samples"][1]  # block 1, domain 1
    assert len(sample["tokens"]) == 20 and "experts" not in sample  # the first choice is topk's first column
    ids, weights = unpack_topk(sample["topk"]["7"], sample["topk_weights"]["7"], 8, 64)
    t = tables[7]
    rows = np.flatnonzero(t.block == 1)[:20]
    np.testing.assert_array_equal(ids, t.expert_index[rows])
    np.testing.assert_allclose(weights, t.gate_weight[rows], atol=0.5 / 255 + 1e-7)
    # planted: domain d owns experts 8d .. 8d+7
    dominant, share = expert_domains(t, 5)
    np.testing.assert_array_equal(dominant[:40], np.repeat(np.arange(5), 8))
    assert arm["expert_domain"]["7"] == dominant.tolist()
    assert (share[:40] > 0.5).all() and (share <= 1).all()
