"""The generic adapter: families without an adapter of their own are read from the model itself."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import ARCHITECTURES, build_model
from torch import nn

from moescope.errors import MoescopeError
from moescope.hf.adapters import find_sites, generic_adapter, infer_scores, sites_of, takes_routing


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "dbrx"])
def test_generic_reading_agrees_with_each_named_adapter(arch: str) -> None:
    """On every family that has a hand-written adapter, the generic one finds the same routers, experts,
    layer counts and router distribution (DBRX names no router recording, so only its own adapter reads it)."""
    model = build_model(arch, 64)
    named, sites = find_sites(model)
    generic = generic_adapter(model)
    assert generic is not None, arch
    adapter, routers = generic
    assert adapter.scores == named.scores, arch
    assert adapter.logits_index == named.logits_index
    if named.dense_scores_index is not None:  # Llama 4 hands its experts no ids: the generic reading refuses it
        with pytest.raises(MoescopeError, match="not called with the dispatched experts"):
            sites_of(model, adapter, routers)
        return
    shape = [(s.layer, s.path, s.n_experts, s.top_k, s.n_shared_experts, s.router, s.experts, s.shared_gate)
             for s in sites]
    assert [(s.layer, s.path, s.n_experts, s.top_k, s.n_shared_experts, s.router, s.experts, s.shared_gate)
            for s in sites_of(model, adapter, routers)] == shape


class _Router(nn.Module):
    def __init__(self, fn: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 8))
        if fn is not None:
            self.expert_selection_fn = fn

    def forward(self, x):
        # a comment that says softmax is not code
        return torch.sigmoid(x @ self.weight.t())


class _Both(nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1) if x.sum() > 0 else torch.sigmoid(x)


def test_scores_named_by_a_setting_win_over_the_code() -> None:
    assert infer_scores(None, _Router("softmax"), nn.Identity())[0] == "softmax"
    assert infer_scores(None, _Router(), nn.Identity())[0] == "sigmoid"  # code calls sigmoid only; comment ignored
    kind, how = infer_scores(None, _Both(), nn.Identity())
    assert kind == "softmax" and how.startswith("assumed")


def test_experts_called_without_ids_are_not_taken_for_dispatch() -> None:
    class ByIds(nn.Module):
        def forward(self, hidden, top_k_index, top_k_weights):
            return hidden

    class Dense(nn.Module):
        def forward(self, hidden):
            return hidden

    assert takes_routing(ByIds()) and not takes_routing(Dense())


def test_block_whose_experts_take_no_ids_is_refused_by_name() -> None:
    """A recorded router whose block runs its experts some other way: one clear error, never a wrong capture."""
    model = build_model("mixtral", 64)

    class Dense(nn.Module):
        def forward(self, hidden):
            return hidden

    new_router = type("NewRouter", (type(model.model.layers[0].mlp.gate),), {})  # a class no adapter names
    for layer in model.model.layers:
        layer.mlp.gate.__class__ = new_router
        layer.mlp.experts = Dense()
    model.model._can_record_outputs = {"router_logits": new_router}  # on the instance: the class stays intact
    with pytest.raises(MoescopeError, match="not called with the dispatched experts"):
        find_sites(model)


def test_zero_top_k_is_refused_not_guessed() -> None:
    model = build_model("mixtral", 64)
    model.config.num_experts_per_tok = 0
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 0
        layer.mlp.top_k = 0
    with pytest.raises(MoescopeError, match="give no positive top-k"):
        find_sites(model)
