"""record_routing: per-token routing inside the block, each layer's own setting restored after it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moescope.moe.capture import record_routing
from moescope.moe.layer import MoELayer


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    experts = lambda: nn.ModuleList(nn.Linear(8, 8) for _ in range(3))  # noqa: E731
    return nn.Sequential(MoELayer(experts(), 8, top_k=2), MoELayer(experts(), 8))


def test_per_token_routing_inside_and_the_previous_flags_after_even_on_error() -> None:
    model = _model()
    model[1].capture = True  # a caller further out already listens to this one
    x = torch.randn(5, 8)
    with record_routing(model) as rec:
        model(x)
        assert rec[0].expert_index.shape == (5, 2) and rec.latest()[1].router_probs.shape == (5, 3)
    assert [m.capture for m in model] == [False, True]
    with pytest.raises(RuntimeError), record_routing(model):
        raise RuntimeError("boom")
    assert [m.capture for m in model] == [False, True]
    model(x)
    assert model[0].last_record.expert_index is None  # outside the block: sums only


def test_sums_only_mode_leaves_the_flags_alone() -> None:
    model = _model()
    with record_routing(model, per_token=False) as rec:
        model(torch.randn(4, 8))
        assert rec[0].expert_index is None and int(rec[0].tokens_per_expert.sum()) == 8
