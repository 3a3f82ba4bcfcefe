"""BTX merge and c-BTM ensemble math on tiny in-memory GPT-2s (no files)."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.btx.ensemble import ensemble_weights, mix_target_logprobs
from moescope.btx.merge import average_models, merge_branches, mlp_input_moments, router_from_means, routing_shares
from moescope.btx.scoring import continuation_losses, target_logprobs
from moescope.moe.config import MoEConfig


def tiny_gpt2(seed, n_layer=2):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()


def test_average_models_is_the_parameter_mean():
    a, b = tiny_gpt2(0), tiny_gpt2(1)
    m = average_models([a, b])
    for (k, va), vb, vm in zip(a.state_dict().items(), b.state_dict().values(), m.state_dict().values()):
        if torch.is_floating_point(va):
            assert torch.allclose(vm, (va + vb) / 2), k
    assert m is not a and a.transformer.h[0].mlp.c_fc.weight.data_ptr() != m.transformer.h[0].mlp.c_fc.weight.data_ptr()


def test_merged_experts_are_the_branches_mlps_and_routing_to_one_reproduces_its_mlp():
    branches = [tiny_gpt2(s) for s in range(3)]
    merged = merge_branches(branches, MoEConfig(n_experts=3, top_k=1, layers=[1]))
    layer = merged.transformer.h[1].mlp
    x = torch.randn(5, 16)
    for e, br in enumerate(branches):
        assert torch.equal(layer.experts[e].c_fc.weight, br.transformer.h[1].mlp.c_fc.weight)
        assert torch.allclose(layer.experts[e](x), br.transformer.h[1].mlp(x), atol=1e-6)
    soup = average_models(branches)
    assert torch.allclose(merged.transformer.h[0].mlp.c_fc.weight, soup.transformer.h[0].mlp.c_fc.weight)
    assert torch.allclose(merged.transformer.h[0].attn.c_attn.weight, soup.transformer.h[0].attn.c_attn.weight)
    # a router that always picks expert 2 (STE top-1: weight exactly 1) -> the layer equals branch 2's MLP
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 100.0
    xp = torch.rand(7, 16) + 0.1  # positive inputs: logit of expert 2 is the largest
    assert torch.allclose(layer(xp), branches[2].transformer.h[1].mlp(xp), atol=1e-5)


def test_router_from_means_routes_each_partition_to_its_expert():
    # three partitions whose tokens come from disjoint vocabulary bands: their hidden states differ
    branches = [tiny_gpt2(s) for s in range(3)]
    soup = average_models(branches)
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randint(13 * p, 13 * p + 13, (4, 16), generator=gen)] for p in range(3)]
    moments = [mlp_input_moments(soup, b, [0, 1]) for b in batches]
    # the moments are the plain mean / variance of the hooked MLP inputs
    captured = []
    h = soup.transformer.h[1].mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 16)))
    with torch.no_grad():
        soup(input_ids=batches[0][0])
    h.remove()
    assert torch.allclose(moments[0][1][0], captured[0].mean(0), atol=1e-5)
    assert moments[0][1][1] == pytest.approx(float(captured[0].var(0, unbiased=False).mean()), rel=1e-4)
    router = {i: router_from_means(torch.stack([m[i][0] for m in moments]),
                                   float(torch.stack([m[i][1] for m in moments]).mean())) for i in (0, 1)}
    assert torch.allclose(router[0].sum(0), torch.zeros(16), atol=1e-5)  # centred across partitions
    merged = merge_branches(branches, MoEConfig(n_experts=3, top_k=1, layers=[0, 1]), router)
    shares = routing_shares(merged, batches)
    # layer 0 sees the partition means it was built from (same inputs as the soup): clear own-expert routing
    assert torch.allclose(shares[0].sum(1), torch.ones(3))
    assert shares[0].argmax(1).tolist() == [0, 1, 2]  # each partition's tokens mostly go to its own expert
    random_merged = merge_branches(branches, MoEConfig(n_experts=3, top_k=1, layers=[0, 1]))
    assert shares[0].diagonal().mean() > routing_shares(random_merged, batches)[0].diagonal().mean()


def test_ensemble_weights_known_values_and_top_k():
    centroids = np.array([[0.0, 0.0], [1.0, 0.0]])
    x = np.array([[0.0, 0.0], [0.5, 0.0]])
    w = ensemble_weights(x, centroids, temperature=1.0)
    # d^2 = (0, 1) -> softmax(0, -1); equidistant -> (0.5, 0.5)
    assert w[0] == pytest.approx([1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))])
    assert w[1] == pytest.approx([0.5, 0.5])
    w1 = ensemble_weights(np.array([[0.2, 0.0]]), centroids, temperature=0.1, top_k=1)
    assert w1.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError):
        ensemble_weights(x, centroids, temperature=0.0)


def test_mixing_target_probabilities_equals_mixing_full_distributions():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 11)  # experts, blocks, positions, vocab
    targets = torch.randint(0, 11, (2, 5))
    w = torch.softmax(torch.randn(2, 3), -1)
    full = torch.einsum("ne,enTv->nTv", w, torch.softmax(logits, -1))  # the mixture distribution
    want = torch.log(full.gather(-1, targets[..., None]).squeeze(-1))
    lp = torch.log_softmax(logits, -1).gather(-1, targets[None, ..., None].expand(3, 2, 5, 1)).squeeze(-1)
    assert torch.allclose(mix_target_logprobs(lp, w).float(), want, atol=1e-5)


def test_target_logprobs_and_continuation_losses():
    model = tiny_gpt2(0)
    x = torch.randint(0, 40, (3, 16))
    lp = target_logprobs(model, x, batch_sequences=2)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(input_ids=x).logits[:, :-1].reshape(-1, 40),
                                                x[:, 1:].reshape(-1), reduction="none").reshape(3, 15)
    assert torch.allclose(-lp, ref, atol=1e-5)
    res = continuation_losses(lp, np.array([0, 0, 1]), ["a", "b"], context_tokens=4)
    # predicting tokens 4..15 = logprob columns 3..14
    assert res["domains"]["a"]["tokens"] == 24 and res["domains"]["b"]["tokens"] == 12
    assert res["domains"]["b"]["loss"] == pytest.approx(float(ref[2, 3:].mean()), rel=1e-5)
    assert res["domain_weighted"] == pytest.approx((res["domains"]["a"]["loss"] + res["domains"]["b"]["loss"]) / 2)


def test_forward_flops_known_value_and_top1_moe_costs_a_dense_mlp_plus_router():
    from moescope.btx.scoring import forward_flops_per_token

    d, f, v, L, T = 16, 64, 40, 2, 16
    dense = tiny_gpt2(0)
    # per block: qkv 3d^2 + proj d^2 + MLP 2 d f; the tied unembedding d v; attention 2 x 2 T d
    expected = 2 * (L * (4 * d * d + 2 * d * f) + d * v) + 4 * L * T * d
    assert forward_flops_per_token(dense, T) == expected
    merged = merge_branches([tiny_gpt2(s) for s in range(3)], MoEConfig(n_experts=3, top_k=1, layers=[0, 1]))
    assert forward_flops_per_token(merged, T) == pytest.approx(expected + 2 * L * d * 3)  # + two 3-way routers
    top2 = merge_branches([tiny_gpt2(s) for s in range(3)], MoEConfig(n_experts=3, top_k=2, layers=[1]))
    assert forward_flops_per_token(top2, T) == pytest.approx(expected + 2 * d * f * 2 + 2 * d * 3)


def test_fitted_router_separates_partitions_the_bias_free_means_router_misroutes():
    from moescope.btx.merge import fit_router

    # two partitions on one side of the origin with a shared constant feature (like ln_2's bias):
    # x . mu_e favours the partition with the larger mean for every token; a fitted router does not
    torch.manual_seed(0)
    feats = [torch.stack([1 + 0.3 * torch.randn(400), torch.ones(400)], 1),
             torch.stack([3 + 0.3 * torch.randn(400), torch.ones(400)], 1)]
    means = router_from_means(torch.stack([f.mean(0) for f in feats]), 0.09)
    fitted = fit_router(feats)

    def own_share(w):
        return float(np.mean([(f @ w.T).argmax(1).eq(e).float().mean() for e, f in enumerate(feats)]))

    assert own_share(means) == pytest.approx(0.5)  # everything goes to partition 1's expert
    assert own_share(fitted) > 0.95


def test_fine_tune_lr_defaults_to_where_the_branch_schedules_ended():
    from moescope.btx.config import BTXConfig
    from moescope.train.config import OptimConfig

    cfg = BTXConfig(optim=OptimConfig(learning_rate=2e-3, min_learning_rate_ratio=0.1))
    assert cfg.resolved_finetune_learning_rate() == pytest.approx(2e-4)
    assert BTXConfig(finetune_learning_rate=5e-4).resolved_finetune_learning_rate() == 5e-4
