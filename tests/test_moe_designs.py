"""MoE designs of today: shared experts, fine-grained experts, expert choice, sigmoid scores.

Each test holds a design to a reference (the dense MLP, the coarse layer, an explicit
sum over experts, transformers' DeepSeek-V3 router) or to an invariant of its definition.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moescope.errors import MoescopeError
from moescope.io.config import load_config_file
from moescope.moe.config import MoEConfig
from moescope.moe.designs import slice_expert, split_experts
from moescope.moe.experts import build_experts
from moescope.moe.capture import generate_with_routing
from moescope.moe.install import install_moe
from moescope.moe.layer import MoELayer
from moescope.train.config import experiment_config_from_dict, resolve_arms
from moescope.moe.routing_sums import RoutingSums

D, FF = 32, 64


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=2, n_inner=FF, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial MLP biases, so bias splitting is exercised
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_(std=0.1)
            block.mlp.c_proj.bias.normal_(std=0.1)
    return model


def _moe(**kw) -> MoEConfig:
    return MoEConfig(**{"n_experts": 4, "layers": [1], "upcycle_noise_rel": 0.0, **kw})


def _layer(n_experts: int = 4, ff: int = FF, seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    experts = build_experts(n_experts, D, ff)
    for ex in experts:
        nn.init.normal_(ex.c_fc.bias, std=0.1)
        nn.init.normal_(ex.c_proj.bias, std=0.1)
    layer = MoELayer(experts, D, **kw).eval()
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
    return layer


# ------------------------------------------------------------------ fine-grained experts


def test_granularity_one_is_the_current_layer_bit_for_bit() -> None:
    """The design options at their coarse values build and train exactly the layer of before."""
    x = torch.randint(0, 64, (2, 24))
    runs = []
    for cfg in (_moe(upcycle_noise_rel=0.5, upcycle_reinit_ratio=0.25),
                _moe(upcycle_noise_rel=0.5, upcycle_reinit_ratio=0.25, expert_granularity=1, n_shared_experts=0,
                     routing="token_choice", router_score="softmax")):
        model = _gpt2()
        layer = install_moe(model, cfg, seed=3)[1]
        assert layer.shared_experts is None and layer.gate_scale == 1.0
        model.train()
        torch.manual_seed(1)
        loss = model(x, labels=x).loss
        loss.backward()
        runs.append((loss, model))
    (la, a), (lb, b) = runs
    assert torch.equal(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert (pa.grad is None and pb.grad is None) or torch.equal(pa.grad, pb.grad), name
    experts = build_experts(2, D, FF)
    assert split_experts(experts, _moe(n_experts=2)) == (experts, None)


@pytest.mark.parametrize("parts", [2, 4])
def test_slices_of_an_expert_sum_to_the_expert(parts: int) -> None:
    expert = build_experts(1, D, FF)[0]
    with torch.no_grad():
        expert.c_fc.bias.normal_(std=0.1)
        expert.c_proj.bias.normal_(std=0.1)
    x = torch.randn(20, D)
    fine = slice_expert(expert, parts)
    assert all(f.c_fc.nf == FF // parts for f in fine)
    torch.testing.assert_close(sum(f(x) for f in fine), expert(x), rtol=1e-5, atol=1e-6)
    swiglu = build_experts(1, D, FF, expert_type="swiglu")[0]
    torch.testing.assert_close(sum(f(x) for f in slice_expert(swiglu, parts)), swiglu(x), rtol=1e-5, atol=1e-6)


def _expert_flops(layer: MoELayer, x: torch.Tensor) -> int:
    """Matmul FLOPs of one forward minus the router's (counted on the per-expert loop)."""
    layer.grouped_experts = False  # the compiled kernel is invisible to the FLOP counter
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert int(layer.last_record.tokens_per_expert.min()) >= 16  # no zero-padded slices
    return counter.get_total_flops() - 2 * x.shape[0] * D * layer.n_experts


@pytest.mark.parametrize("parts", [2, 4])
def test_fine_grained_layer_has_the_coarse_layers_active_and_total_weights_and_flops(parts: int) -> None:
    coarse_cfg, fine_cfg = _moe(top_k=1), _moe(top_k=1, expert_granularity=parts)
    coarse = install_moe(_gpt2(), coarse_cfg)[1]
    fine = install_moe(_gpt2(), fine_cfg)[1]
    assert (fine.n_experts, fine.top_k) == (4 * parts, parts)

    def matmul_weights(experts) -> int:
        return sum(p.numel() for n, p in experts.named_parameters() if n.endswith("weight"))

    # active: k coarse experts vs m x k fine ones; total: all experts
    assert matmul_weights(fine.experts) == matmul_weights(coarse.experts)
    assert matmul_weights(fine.experts[:parts]) == matmul_weights(coarse.experts[:1])
    x = torch.randn(2048, D)
    assert _expert_flops(fine, x) == _expert_flops(coarse, x) == 2 * 2 * 2048 * D * FF


def test_fine_grained_gates_sum_to_the_coarse_weight() -> None:
    """Top-(m x k) renormalized gates are scaled to sum to m x k / k: each fine expert weighs
    like a 1/m slice of one coarse choice."""
    layer = install_moe(_gpt2(), _moe(top_k=1, expert_granularity=4))[1]
    layer.capture = True
    layer(torch.randn(50, D))
    torch.testing.assert_close(layer.last_record.gate_weight.sum(-1), torch.full((50,), 4.0))


# ------------------------------------------------------------------ shared experts


@pytest.mark.parametrize("granularity,top_k,shared", [(1, 2, 1), (2, 2, 2)])
def test_shared_experts_with_zero_routed_contribution_equal_the_dense_mlp(granularity, top_k, shared) -> None:
    dense = _gpt2()
    x = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        ref = dense(x).logits
    model = _gpt2()
    layer = install_moe(model, _moe(top_k=top_k, expert_granularity=granularity, n_shared_experts=shared))[1]
    assert len(layer.shared_experts) == shared and layer.n_experts == 4 * granularity - shared
    with torch.no_grad():
        for ex in layer.experts:  # the routed experts contribute exactly zero
            ex.c_proj.weight.zero_()
            ex.c_proj.bias.zero_()
        out = model(x).logits
    if granularity == 1:  # the shared expert is an exact copy of the dense MLP
        assert torch.equal(out, ref)
    else:  # two halves of it: the same up to the rounding of two partial sums
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rec = layer.last_record
    assert float(rec.routed_norm) == 0.0 and float(rec.shared_norm) > 0
    assert int(rec.tokens_per_expert.sum()) == 48 * (granularity * top_k - shared)


def test_shared_gate_scales_the_shared_output_by_a_sigmoid() -> None:
    layer = _layer(n_experts=3, top_k=1, shared_experts=build_experts(1, D, FF), shared_gate=True)
    x = torch.randn(40, D)
    with torch.no_grad():
        layer.shared_gate.weight.normal_()
        out = layer(x)
        layer_no_shared = MoELayer(layer.experts, D).eval()
        layer_no_shared.router = layer.router
        routed = layer_no_shared(x)
        expected = routed + torch.sigmoid(x @ layer.shared_gate.weight.t()) * layer.shared_experts[0](x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_shared_experts_are_not_routed_experts_and_their_share_is_reported() -> None:
    model = _gpt2()
    layer = install_moe(model, _moe(top_k=1, expert_granularity=2, n_shared_experts=1))[1]
    layer.capture = True
    model(torch.randint(0, 64, (2, 24)))
    rec = layer.last_record
    # the router, its counts and the captured choices cover the 7 routed experts only
    assert layer.router.weight.shape[0] == rec.tokens_per_expert.numel() == rec.router_probs.shape[1] == 7
    assert int(rec.expert_index.max()) < 7
    totals = RoutingSums(layer.n_experts, layer.top_k, dtype=torch.float64, detail=True)
    totals.add(rec)
    share = totals.summary()["shared_output_share"]
    assert share == pytest.approx(float(rec.shared_norm) / float(rec.shared_norm + rec.routed_norm))
    assert 0 < share < 1


# ------------------------------------------------------------------ expert choice


@pytest.mark.parametrize("gating", ["ste", "switch"])
def test_expert_choice_at_capacity_factor_e_processes_every_token_in_every_expert(gating) -> None:
    layer = _layer(routing="expert_choice", capacity_factor=4.0, gating=gating)
    layer.capture = True
    x = torch.randn(30, D)
    out = layer(x)
    rec = layer.last_record
    assert rec.expert_mask.all() and int(rec.unrouted) == 0 and rec.capacity == 30
    assert rec.tokens_per_expert.tolist() == [30] * 4
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    # every expert on every token, weighted by its probability (normalized over all E: the same)
    expected = sum(probs[:, e : e + 1] * layer.experts[e](x) for e in range(4))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_expert_choice_takes_each_experts_top_tokens_and_zeroes_the_unrouted() -> None:
    layer = _layer(routing="expert_choice", capacity_factor=0.5)
    layer.capture = True
    x = torch.randn(64, D)
    with torch.no_grad():
        out = layer(x)
    rec = layer.last_record
    assert rec.capacity == 8 and rec.tokens_per_expert.tolist() == [8] * 4
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    for e in range(4):
        assert set(torch.nonzero(rec.expert_mask[:, e]).flatten().tolist()) == set(probs[:, e].topk(8).indices.tolist())
    unrouted = ~rec.expert_mask.any(-1)
    assert int(rec.unrouted) == int(unrouted.sum()) >= 64 - 32
    assert torch.equal(out[unrouted], torch.zeros_like(out[unrouted]))
    assert (out[~unrouted].abs().sum(-1) > 0).all()
    # ste: a token's weights are normalized over the experts that took it
    assert torch.allclose(rec.gate_weight[~unrouted].sum(-1), torch.ones(int((~unrouted).sum())))
    totals = RoutingSums(layer.n_experts, layer.top_k, dtype=torch.float64, detail=True)
    totals.add(rec)
    stats = totals.summary()
    assert stats["unrouted_fraction"] == int(rec.unrouted) / 64 and stats["load_cv"] == 0.0


def test_expert_choice_grouped_kernel_equals_the_expert_loop() -> None:
    x = torch.randn(70, D, requires_grad=True)
    results = []
    for grouped in (True, False):
        layer = _layer(routing="expert_choice", capacity_factor=1.5).train()
        layer.grouped_experts = grouped
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x, layer.router.weight, layer.experts[0].c_fc.weight])
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generate_is_refused_for_expert_choice_and_the_config_says_why() -> None:
    model = _gpt2()
    install_moe(model, _moe(routing="expert_choice"))
    x = torch.randint(1, 64, (1, 5))
    with pytest.raises(MoescopeError, match="expert choice"):
        model.generate(x, max_new_tokens=2)
    with pytest.raises(MoescopeError, match="autoregressively"):
        generate_with_routing(model, x, max_new_tokens=2)
    ok = _gpt2()
    install_moe(ok, _moe())
    assert generate_with_routing(ok, x, max_new_tokens=2, do_sample=False)[0].shape == (1, 7)
    with pytest.raises(MoescopeError, match="balance_bias"):
        MoEConfig(routing="expert_choice", balance_bias=True)


# ------------------------------------------------------------------ DeepSeek-V3 scoring


@pytest.mark.parametrize("top_k", [2, 3])
def test_sigmoid_scores_match_transformers_deepseek_v3_router(top_k: int) -> None:
    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=8, num_experts_per_tok=top_k, n_group=1, topk_group=1,
                           norm_topk_prob=True, routed_scaling_factor=1.0)
    ref = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        ref.weight.normal_(std=0.5)
        ref.e_score_correction_bias.normal_(std=0.3)
    layer = _layer(n_experts=8, top_k=top_k, router_score="sigmoid", balance_bias=True)
    with torch.no_grad():
        layer.router.weight.copy_(ref.weight)
        layer.selection_bias.copy_(ref.e_score_correction_bias)
    layer.capture = True
    x = torch.randn(50, D)
    with torch.no_grad():
        _, ref_w, ref_i = ref(x)
        layer(x)
    rec = layer.last_record
    ours_i, order = rec.expert_index.sort(dim=-1)
    theirs_i, their_order = ref_i.sort(dim=-1)
    assert torch.equal(ours_i, theirs_i)
    torch.testing.assert_close(rec.gate_weight.gather(1, order), ref_w.gather(1, their_order), rtol=1e-5, atol=1e-6)


def test_selection_bias_changes_only_the_selection_with_sigmoid_scores() -> None:
    layer = _layer(n_experts=8, top_k=2, router_score="sigmoid", balance_bias=True)
    layer.capture = True
    x = torch.randn(40, D)
    with torch.no_grad():
        layer(x)
        plain = layer.last_record
        layer.selection_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
        layer(x)
        biased = layer.last_record
    assert (biased.expert_index.sort(-1).values == torch.tensor([0, 1])).all()  # the bias chose
    scores = torch.sigmoid(x @ layer.router.weight.t())
    chosen = scores[:, :2]
    # the gates are the unbiased scores of the chosen experts, normalized over them
    torch.testing.assert_close(biased.gate_weight.sort(-1).values, (chosen / chosen.sum(-1, keepdim=True)).sort(-1).values)
    torch.testing.assert_close(biased.prob_sum, plain.prob_sum)
    torch.testing.assert_close(biased.router_probs, scores / scores.sum(-1, keepdim=True))
    assert torch.equal(biased.z_loss, plain.z_loss)


# ------------------------------------------------------------------ configs and arms


def test_config_rejects_impossible_designs() -> None:
    with pytest.raises(MoescopeError, match="n_shared_experts"):
        MoEConfig(n_experts=4, top_k=1, n_shared_experts=1)  # no active place left for routing
    with pytest.raises(MoescopeError, match="divisible"):
        MoEConfig(expert_ff=100, expert_granularity=3)
    with pytest.raises(MoescopeError, match="shared_gate"):
        MoEConfig(shared_gate=True)
    with pytest.raises(MoescopeError, match="routing"):
        MoEConfig(routing="token-choice")
    cfg = MoEConfig(n_experts=16, top_k=1, expert_granularity=4, n_shared_experts=1)
    assert (cfg.routed_experts, cfg.routed_top_k) == (63, 3)


def test_designs_config_resolves_the_five_arms_at_matched_active_compute() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "designs.toml"
    cfg = experiment_config_from_dict(load_config_file(path))
    runs = resolve_arms(cfg)
    assert list(runs) == ["dense", "moe", "moe-shared", "moe-fine", "moe-ec"]
    for name in ("moe", "moe-shared", "moe-fine", "moe-ec"):
        moe = runs[name].moe
        # active width per token: (routed + shared) experts x width 1/m = one coarse expert
        assert (moe.routed_top_k + moe.n_shared_experts) / moe.expert_granularity == 1
    assert runs["moe-ec"].moe.routing == "expert_choice" and runs["moe-ec"].loss.bias_update_rate == 0
    assert runs["moe-shared"].moe.n_shared_experts == 1 and runs["moe-fine"].moe.expert_granularity == 4
    assert runs["moe"].train == runs["moe-ec"].train and runs["moe"].model == runs["moe-fine"].model
