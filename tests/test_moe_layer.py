"""MoELayer against transformers' own MoE blocks and loss functions, plus its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, SwitchTransformersConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lb_loss
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func as switch_lb_loss,
)
from transformers.models.switch_transformers.modeling_switch_transformers import (
    router_z_loss_func as switch_z_loss,
)

from moescope.moe.config import MoEConfig
from moescope.moe.experts import GeluExpert, SwiGLUExpert, build_experts
from moescope.moe.layer import MoELayer, load_balancing_loss, router_z_loss, update_balance_bias

D, FF, E = 32, 64, 4


def _gelu_layer(seed: int = 0, **kwargs) -> MoELayer:
    torch.manual_seed(seed)
    experts = build_experts(E, D, FF, expert_type="gelu")
    for ex in experts:  # non-trivial biases so bias handling is exercised
        nn.init.normal_(ex.c_fc.bias, std=0.1)
        nn.init.normal_(ex.c_proj.bias, std=0.1)
    return MoELayer(experts, D, **kwargs).eval()


def _mixtral_pair(top_k: int, seed: int = 0) -> tuple[MixtralSparseMoeBlock, MoELayer]:
    """A Mixtral sparse MoE block and our layer holding the same router and SwiGLU expert weights."""
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=top_k,
        hidden_act="silu", router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.normal_(std=0.5)
        block.experts.gate_up_proj.normal_(std=0.2)
        block.experts.down_proj.normal_(std=0.2)
    ours = MoELayer(
        nn.ModuleList(SwiGLUExpert(D, FF) for _ in range(E)), D, top_k=top_k, gating="ste", renormalize=True
    ).eval()
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        for e, ex in enumerate(ours.experts):
            ex.gate_proj.weight.copy_(block.experts.gate_up_proj[e, :FF])
            ex.up_proj.weight.copy_(block.experts.gate_up_proj[e, FF:])
            ex.down_proj.weight.copy_(block.experts.down_proj[e])
    return block, ours


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_output_matches_mixtral_block(top_k: int) -> None:
    block, ours = _mixtral_pair(top_k)
    x = torch.randn(3, 40, D)
    with torch.no_grad():
        ref = block(x.clone())
        out = ours(x)
        _, _, ref_idx = block.gate(x.reshape(-1, D))
    rec = ours.last_record
    assert rec.dropped.item() == 0 and rec.capacity is None
    assert rec.tokens_per_expert.sum().item() == 120 * top_k
    assert torch.equal(rec.tokens_per_expert, torch.bincount(ref_idx.reshape(-1), minlength=E))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_capture_matches_mixtral_routing() -> None:
    block, ours = _mixtral_pair(2)
    ours.capture = True
    x = torch.randn(50, D)
    with torch.no_grad():
        ours(x)
        _, ref_w, ref_idx = block.gate(x)
    rec = ours.last_record
    assert torch.equal(rec.expert_index, ref_idx)
    torch.testing.assert_close(rec.gate_weight, ref_w)
    torch.testing.assert_close(rec.router_probs.sum(-1), torch.ones(50))


def _switch_pair(capacity: int, seed: int = 0) -> tuple[SwitchTransformersSparseMLP, MoELayer, SwitchTransformersConfig]:
    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(
        d_model=D, d_ff=FF, num_experts=E, expert_capacity=capacity, router_bias=False,
        router_jitter_noise=0.0, dense_act_fn="gelu_new", dropout_rate=0.0,
    )
    ref = SwitchTransformersSparseMLP(cfg).eval()
    experts = build_experts(E, D, FF, expert_type="gelu", activation="gelu_new")
    ours = MoELayer(experts, D, top_k=1, gating="switch").eval()
    with torch.no_grad():
        # a router that sends most tokens to expert 0: a known overflow
        w = torch.randn(E, D) * 0.1
        w[0] += 0.5
        ref.router.classifier.weight.copy_(w)
        ours.router.weight.copy_(w)
        for e, ex in enumerate(ours.experts):
            sw = ref.experts[f"expert_{e}"]
            ex.c_fc.weight.copy_(sw.wi.weight.T)
            ex.c_proj.weight.copy_(sw.wo.weight.T)
            ex.c_fc.bias.zero_()
            ex.c_proj.bias.zero_()
    return ref, ours, cfg


def test_capacity_mode_matches_switch_formulation_on_overflow() -> None:
    n_tokens, capacity = 64, 8
    ref, ours, _ = _switch_pair(capacity)
    ours.capacity_factor = capacity * E / n_tokens  # ceil(0.5 * 64 / 4) = 8
    assert ours.capacity(n_tokens) == capacity
    x = torch.randn(1, n_tokens, D) + 0.5  # mean shift so expert 0 wins often
    with torch.no_grad():
        out = ours(x)
        expected = ref(x.clone())
        dispatch, _, _ = ref.router(x.clone())
    rec = ours.last_record
    counts = rec.tokens_per_expert
    assert counts.max().item() > capacity  # the case really overflows
    assert rec.dropped.item() == (counts - capacity).clamp(min=0).sum().item()
    kept_ref = dispatch.sum(-1).reshape(-1).bool()
    kept_ours = out.reshape(n_tokens, D).abs().sum(-1) > 0
    assert torch.equal(kept_ours, kept_ref)
    assert rec.dropped.item() == (~kept_ref).sum().item()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_capacity_priority_is_token_order_and_dropped_output_is_zero() -> None:
    layer = _gelu_layer(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # every token with x[:, 0] > 0 goes to expert 2
    x = torch.randn(40, D, requires_grad=True)
    with torch.no_grad():
        x[:, 0] = 1.0
    out = layer(x)
    cap = layer.capacity(40)
    assert cap == 10
    assert layer.last_record.dropped.item() == 30
    assert (out[:cap] != 0).any(dim=-1).all()
    assert torch.equal(out[cap:], torch.zeros(30, D))  # exactly zero, not merely small
    out.sum().backward()
    assert torch.equal(x.grad[cap:], torch.zeros(30, D))


def test_top2_capacity_serves_first_choices_before_second() -> None:
    layer = _gelu_layer(top_k=2, capacity_factor=0.5)
    layer.capture = True
    x = torch.randn(64, D)
    with torch.no_grad():
        layer(x)
    rec = layer.last_record
    cap = layer.capacity(64)
    idx, kept = rec.expert_index, rec.gate_weight > 0
    for e in range(E):
        first = (idx[:, 0] == e)
        second = (idx[:, 1] == e)
        n_first_kept = (first & kept[:, 0]).sum().item()
        assert n_first_kept == min(first.sum().item(), cap)
        if first.sum().item() >= cap:  # no room left for any second choice
            assert not (second & kept[:, 1]).any()
        # within a rank, the kept tokens are the earliest ones
        pos = torch.nonzero(first).flatten()
        assert torch.equal(kept[pos, 0], torch.arange(len(pos)) < cap)
    assert rec.dropped.item() == (~kept).sum().item()


def test_load_balancing_loss_matches_transformers_mixtral_and_switch() -> None:
    for top_k in (1, 2, 3):
        layer = _gelu_layer(top_k=top_k)
        x = torch.randn(2, 30, D)
        with torch.no_grad():
            layer(x)
            logits = layer.router(x.reshape(-1, D))
        rec = layer.last_record
        ours = load_balancing_loss(rec.tokens_per_expert, rec.prob_sum, rec.n_tokens, top_k)
        theirs = mixtral_lb_loss((logits,), E, top_k)
        torch.testing.assert_close(ours * top_k, theirs)  # Mixtral counts f per token, not per assignment
        if top_k == 1:
            probs = torch.softmax(logits, -1)
            torch.testing.assert_close(ours, switch_lb_loss(probs[None], probs.argmax(-1)[None]))
        torch.testing.assert_close(rec.z_loss, switch_z_loss(logits[None]))
        torch.testing.assert_close(rec.z_loss, router_z_loss(logits))


def test_load_balancing_loss_accumulates_over_micro_batches() -> None:
    layer = _gelu_layer(top_k=2)
    micro = [torch.randn(16, D), torch.randn(24, D), torch.randn(8, D)]
    counts = torch.zeros(E, dtype=torch.long)
    prob_sum = torch.zeros(E)
    n = 0
    for x in micro:
        layer(x)
        rec = layer.last_record
        counts += rec.tokens_per_expert
        prob_sum = prob_sum + rec.prob_sum
        n += rec.n_tokens
    with torch.no_grad():
        logits = layer.router(torch.cat(micro))
    whole = mixtral_lb_loss((logits,), E, 2) / 2
    torch.testing.assert_close(load_balancing_loss(counts, prob_sum.detach(), n, 2), whole)
    # differentiable through the summed prob sums
    load_balancing_loss(counts, prob_sum, n, 2).backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_perfect_balance_scores_one(top_k: int) -> None:
    n = 64
    counts = torch.full((8,), n * top_k // 8)
    prob_sum = torch.full((8,), n / 8)
    assert load_balancing_loss(counts, prob_sum, n, top_k).item() == pytest.approx(1.0)
    skewed = torch.tensor([n * top_k] + [0] * 7)
    assert load_balancing_loss(skewed, torch.tensor([float(n)] + [0.0] * 7), n, top_k).item() == pytest.approx(8.0)


def test_ste_forward_is_exact_expert_output_and_backward_goes_through_prob() -> None:
    layer = _gelu_layer(top_k=1, gating="ste")
    layer.capture = True
    x = torch.randn(50, D)
    out = layer(x)
    idx = layer.last_record.expert_index[:, 0]
    with torch.no_grad():
        direct = torch.stack([layer.experts[int(e)](x[i : i + 1])[0] for i, e in enumerate(idx)])
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.last_record.gate_weight, torch.ones(50, 1))
    # reference STE: y * (1 + p - p.detach()), written with plain autograd
    g = torch.randn(50, D)
    (out * g).sum().backward()
    ours_grad = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    probs = torch.softmax(layer.router(x), -1)
    p = probs.gather(1, idx[:, None])
    ys = torch.stack([layer.experts[int(e)](x[i : i + 1])[0] for i, e in enumerate(idx)])
    ((ys * (1 + p - p.detach())) * g).sum().backward()
    assert ours_grad.abs().sum() > 0
    torch.testing.assert_close(ours_grad, layer.router.weight.grad, rtol=1e-4, atol=1e-6)


def test_switch_gating_scales_by_prob() -> None:
    ste = _gelu_layer(top_k=1, gating="ste")
    sw = _gelu_layer(top_k=1, gating="switch")
    sw.capture = True
    x = torch.randn(30, D)
    with torch.no_grad():
        a, b = ste(x), sw(x)
    p = sw.last_record.gate_weight
    assert (p < 1).all()
    torch.testing.assert_close(b, a * p, rtol=1e-5, atol=1e-6)


def test_router_noise_anneals_and_is_training_only() -> None:
    layer = _gelu_layer(top_k=1, router_noise_std=2.0, router_noise_anneal_frac=0.25)
    layer.capture = True
    x = torch.randn(200, D)
    assert layer.current_noise_std() == 2.0
    layer.progress = 0.125
    assert layer.current_noise_std() == pytest.approx(1.0)
    layer.progress = 0.5
    assert layer.current_noise_std() == 0.0
    layer.progress = 0.0
    with torch.no_grad():
        layer.eval()
        layer(x)
        clean = layer.last_record.expert_index.clone()
        layer.train()
        torch.manual_seed(1)
        layer(x)
        noisy = layer.last_record.expert_index.clone()
        layer.progress = 0.3
        layer(x)
        annealed = layer.last_record.expert_index.clone()
    assert not torch.equal(clean, noisy)
    assert torch.equal(clean, annealed)


def test_input_jitter_only_in_training() -> None:
    layer = _gelu_layer(top_k=1, input_jitter=0.5)
    layer.capture = True
    x = torch.randn(100, D)
    with torch.no_grad():
        layer(x)
        p_eval = layer.last_record.router_probs.clone()
        torch.testing.assert_close(p_eval, torch.softmax(layer.router(x), -1))
        layer.train()
        layer(x)
        assert not torch.allclose(layer.last_record.router_probs, p_eval)


def test_expert_dropout_is_inside_experts() -> None:
    cfg = MoEConfig(n_experts=E, expert_dropout=0.5)
    experts = build_experts(E, D, FF, dropout=cfg.expert_dropout)
    layer = MoELayer.from_config(cfg, experts, D)
    assert all(ex.dropout.p == 0.5 for ex in layer.experts)
    assert layer.output_dropout.p == 0.0
    x = torch.randn(40, D)
    with torch.no_grad():
        layer.eval()
        a = layer(x)
        b = layer(x)
        layer.train()
        c = layer(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_record_on_every_forward_and_arbitrary_expert_modules() -> None:
    # a BERT-style FFN (Linear-GELU-Linear) as the expert: any [n, d] -> [n, d] module works
    experts = nn.ModuleList(nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D)) for _ in range(E))
    layer = MoELayer(experts, D, top_k=2)
    x = torch.randn(2, 5, 7, D)
    out = layer(x)
    assert out.shape == x.shape
    rec = layer.last_record
    assert rec.n_tokens == 70 and rec.tokens_per_expert.sum().item() == 140
    assert rec.expert_index is None  # capture off: no per-token tensors kept
    assert rec.prob_sum.requires_grad and rec.z_loss.requires_grad
    assert 0 < rec.entropy_mean.item() <= math.log(E) + 1e-6
    torch.testing.assert_close(rec.prob_sum.sum(), torch.tensor(70.0))


def test_experts_never_called_on_empty_slices() -> None:
    calls: list[int] = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return self.lin(x)

    layer = MoELayer(nn.ModuleList(Counting() for _ in range(E)), D)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 5.0
        x = torch.randn(20, D)
        x[:, 0] = 1.0
        layer(x)
    assert calls == [20]


def test_gelu_expert_has_gpt2_mlp_names_and_shapes() -> None:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    dense = GPT2MLP(FF, GPT2Config(n_embd=D))
    ex = GeluExpert(D, FF)
    assert {k: v.shape for k, v in dense.state_dict().items()} == {k: v.shape for k, v in ex.state_dict().items()}


def test_deterministic_under_seed_and_dtype_preserved() -> None:
    a = _gelu_layer(seed=3, top_k=2)
    b = _gelu_layer(seed=3, top_k=2)
    x = torch.randn(30, D)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        y = a.double()(x.double())
    assert y.dtype == torch.float64


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
@pytest.mark.parametrize("top_k,capacity_factor", [(1, None), (2, None), (1, 0.75)])
def test_grouped_matmul_path_equals_calling_each_expert(expert_type: str, top_k: int, capacity_factor) -> None:
    torch.manual_seed(0)
    experts = build_experts(E, D, FF, expert_type=expert_type)
    grouped = MoELayer(experts, D, top_k=top_k, capacity_factor=capacity_factor)
    looped = MoELayer(build_experts(E, D, FF, expert_type=expert_type), D, top_k=top_k,
                      capacity_factor=capacity_factor)
    looped.load_state_dict(grouped.state_dict())
    looped.grouped_experts = False
    with torch.no_grad():  # skewed router: one expert gets a tiny slice, one gets none
        grouped.router.weight.normal_(std=0.3)
        grouped.router.weight[3] -= 5.0
        looped.router.weight.copy_(grouped.router.weight)
    x = torch.randn(45, D)
    g = torch.randn(45, D)
    outs, grads = [], []
    for layer in (grouped, looped):
        xx = x.clone().requires_grad_()
        out = layer(xx)
        out.backward(g)
        outs.append(out)
        grads.append([xx.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        if b is None:  # an expert that got no tokens gets no gradient on either path
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_output_does_not_depend_on_how_many_tokens_share_its_expert() -> None:
    layer = _gelu_layer(top_k=1)
    x = torch.randn(100, D)
    with torch.no_grad():
        full = layer(x)
        for i in (0, 17, 99):  # alone, each token is an expert slice of one row
            assert torch.equal(layer(x[i : i + 1]), full[i : i + 1])


# --------------------------------------------------------------------------- auxiliary-loss-free balancing


def test_update_balance_bias_moves_each_expert_by_the_sign_of_its_load_error():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    update_balance_bias(bias, torch.tensor([10, 0, 5, 5]), 0.1)  # mean load 5
    assert torch.allclose(bias, torch.tensor([-0.1, 0.6, -0.5, 0.0]))


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_bias_steers_selection_but_not_gates_or_losses(top_k):
    torch.manual_seed(0)
    d, n_exp = 16, 4
    plain = MoELayer(build_experts(n_exp, d, 32), d, top_k=top_k).eval()
    biased = MoELayer(build_experts(n_exp, d, 32), d, top_k=top_k, balance_bias=True).eval()
    biased.load_state_dict({**plain.state_dict(), "selection_bias": torch.zeros(n_exp)})
    plain.capture = biased.capture = True
    x = torch.randn(64, d)
    # a zero bias routes exactly like no bias
    torch.testing.assert_close(biased(x), plain(x), rtol=0, atol=0)
    # a large bias on expert 2 makes it every token's first choice; gate weights and the
    # router statistics are still those of the unbiased probabilities
    biased.selection_bias[2] = 100.0
    biased(x)
    rec, ref = biased.last_record, plain.last_record
    assert torch.all(rec.expert_index[:, 0] == 2)
    torch.testing.assert_close(rec.router_probs, ref.router_probs)
    torch.testing.assert_close(rec.prob_sum, ref.prob_sum)
    torch.testing.assert_close(rec.z_loss, ref.z_loss)
    if top_k == 2:
        chosen = rec.router_probs.gather(-1, rec.expert_index)
        torch.testing.assert_close(rec.gate_weight, chosen / chosen.sum(-1, keepdim=True))
    assert int(rec.tokens_per_expert[2]) == 64


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_top1_ste_gradients_equal_a_masked_autograd_reference(capacity_factor) -> None:
    """Every gradient of the dispatch (gather, grouped experts, combine; permutation and
    dropped-token paths) against plain masked indexing differentiated by autograd."""
    layer = _gelu_layer(seed=5, capacity_factor=capacity_factor).train()
    x = torch.randn(60, D, requires_grad=True)
    g = torch.randn(60, D)
    layer(x).backward(g)
    rec_x = x.grad.clone()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    x.grad = None

    probs = torch.softmax(layer.router(x).float(), dim=-1)
    top = probs.argmax(-1)
    p = probs.gather(-1, top[:, None])
    kept = torch.ones(60, dtype=torch.bool)
    if capacity_factor is not None:  # Switch order: earlier tokens first
        cap = layer.capacity(60)
        rank = torch.stack([(top[: i + 1] == top[i]).sum() for i in range(60)]) - 1
        kept = rank < cap
    ref = torch.zeros(60, D)
    for e in range(E):
        m = (top == e) & kept
        if m.any():
            ref[m] = layer.experts[e](x[m]) * (1.0 + p[m] - p[m].detach())  # x 1.0; d/dp = expert output
    ref.backward(g)
    torch.testing.assert_close(rec_x, x.grad, rtol=1e-5, atol=1e-6)
    for n, param in layer.named_parameters():
        if param.grad is None:
            assert n not in got
        else:
            torch.testing.assert_close(got[n], param.grad, rtol=1e-4, atol=1e-6)
