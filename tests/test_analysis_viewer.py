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
