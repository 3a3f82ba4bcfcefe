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
    kind, how, _ = infer_scores(None, _Both(), nn.Identity())
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


def test_zero_experts_are_refused_not_counted_as_real_ones() -> None:
    """LongCat-Flash's router also scores identity ('zero') experts; the block hands those tokens to a real
    expert with weight 0, which a capture would count as that expert's load."""
    import transformers
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING["longcat_flash"](
        vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2, ffn_hidden_size=48, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=2,
        n_routed_experts=8, zero_expert_num=4, expert_ffn_hidden_size=24, pad_token_id=0, bos_token_id=0,
        eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(MoescopeError, match="scores 12 choices for 8 experts"):
        find_sites(model)


def test_a_score_function_the_router_holds_decides() -> None:
    from transformers.activations import ACT2FN

    router = _Router()
    router.score_fn = ACT2FN["sqrtsoftplus"]
    assert infer_scores(None, router, nn.Identity())[::2] == ("sqrtsoftplus", "score_fn")
    router.score_fn = ACT2FN["sigmoid"]
    assert infer_scores(None, router, nn.Identity())[::2] == ("sigmoid", "")


def test_a_setting_in_the_text_config_is_read() -> None:
    from transformers import Qwen3VLMoeConfig

    config = Qwen3VLMoeConfig()
    config.get_text_config().scoring_func = "sigmoid"

    class Both(_Both):
        pass

    assert infer_scores(config, Both(), nn.Identity())[:2] == ("sigmoid", "named by the model's settings")


def test_scores_a_router_returns_are_told_from_logits_it_returns() -> None:
    """Gemma 4's router returns softmax(...) at output 0: its entropy is of those scores. A name that may
    also hold logits (a parameter, a second assignment, a tuple target) is not taken for scores."""
    from moescope.hf.adapters import _returned_score_kind

    class Probs(nn.Module):
        def forward(self, x):
            probs = torch.softmax(x, -1)
            top, idx = probs.topk(2)
            return probs, top, idx

    class MaybeLogits(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                x = torch.softmax(x, -1)
            return x, x

    class TupleTarget(nn.Module):
        def forward(self, x):
            probs = torch.sigmoid(x)
            probs, idx = probs.topk(2)
            return probs, idx

    assert _returned_score_kind(Probs, 0) == "softmax" and _returned_score_kind(Probs, 1) is None
    assert _returned_score_kind(MaybeLogits, 0) is None and _returned_score_kind(TupleTarget, 0) is None
    assert infer_scores(None, Probs(), nn.Identity())[0] == "scores"
