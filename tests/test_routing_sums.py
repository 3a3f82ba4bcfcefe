"""RoutingSums, the one aggregator of routing statistics: sums of split passes equal one pass."""

from __future__ import annotations

import pytest
import torch

from moescope.moe.layer import MoELayer, load_balancing_loss
from moescope.moe.routing_sums import RoutingSums


def _layer_and_parts():
    torch.manual_seed(0)
    layer = MoELayer(torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4)), 8, top_k=2)
    x = torch.randn(40, 8)
    layer(x)
    whole = layer.last_record
    parts = []
    for part in (x[:13], x[13:29], x[29:]):
        layer(part)
        parts.append(layer.last_record)
    return layer, whole, parts


def test_balance_loss_of_summed_passes_equals_one_pass_over_the_whole_batch_with_gradient() -> None:
    layer, whole, parts = _layer_and_parts()
    sums = RoutingSums(layer.n_experts, layer.top_k, detach=False)
    for rec in parts:
        sums.add(rec)
    expected = load_balancing_loss(whole.tokens_per_expert, whole.prob_sum, 40, 2)
    torch.testing.assert_close(sums.load_balance_loss(), expected)
    assert int(sums.counts.sum()) == 80 and sums.n_tokens == 40
    z = sum(float(r.z_loss.detach()) * r.n_tokens for r in parts) / 40
    assert float(sums.z_loss().detach()) == pytest.approx(z, rel=1e-6)
    (sums.load_balance_loss() + sums.z_loss()).backward()  # detach=False: the loss trains the router
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_detached_sums_merge_and_reduce_like_one_aggregator() -> None:
    layer, whole, parts = _layer_and_parts()
    one = RoutingSums(layer.n_experts, layer.top_k)
    a, b = RoutingSums(layer.n_experts, layer.top_k), RoutingSums(layer.n_experts, layer.top_k)
    for rec in parts:
        one.add(rec)
    a.add(parts[0])
    b.add(parts[1])
    b.add(parts[2])
    a.merge(b)
    assert torch.equal(a.counts, one.counts) and a.n_tokens == one.n_tokens and a.z_sum == pytest.approx(one.z_sum)
    assert not one.prob_sum.requires_grad and isinstance(one.z_sum, float)
    # over "all processes" (one here): float64, the loss of the whole batch, the largest share
    total = one.reduced(lambda t: t, n_tokens=40)
    assert total.counts.dtype == torch.float64
    expected = load_balancing_loss(whole.tokens_per_expert.double(), whole.prob_sum.detach().double(), 40, 2)
    assert float(total.load_balance_loss()) == pytest.approx(float(expected), rel=1e-6)
    counts = whole.tokens_per_expert.double()
    assert total.max_fraction() == float(counts.max() / counts.sum())


def test_first_record_is_never_written_into() -> None:
    layer, _, parts = _layer_and_parts()
    before = parts[0].tokens_per_expert.clone()
    sums = RoutingSums(layer.n_experts, layer.top_k)
    for rec in parts:
        sums.add(rec)
    assert torch.equal(parts[0].tokens_per_expert, before)
