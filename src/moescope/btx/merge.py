"""Branch-Train-MiX (Sukhbaatar et al. 2024): branches' MLPs become the experts of one MoE.

Pure computation on in-memory models: average the branches' shared parameters, measure
each partition's mean MLP input, and build the MoE whose router starts from those means
(the ModularForge reference left the assembled router random, so routing had nothing to
do with which partition trained which expert).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from moescope.moe.config import MoEConfig
from moescope.moe.install import install_moe

_EXPERT_PARAMS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


@torch.no_grad()
def average_models(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of models[0] whose every floating-point parameter/buffer is the mean over `models`."""
    if not models:
        raise ValueError("no models to average")
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = out.state_dict()
    for key, value in merged.items():
        if not torch.is_floating_point(value):
            continue
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"cannot average {key}: shapes differ across models {sorted(shapes)}")
        value.copy_(torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype))
    return out


@torch.no_grad()
def mlp_input_moments(
    model: nn.Module, batches: Iterable[torch.Tensor], layers: Sequence[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Mean [d] and mean per-dimension variance [] of the MLP input (post-ln_2) at `layers`.

    `batches` are token-id tensors [b, T]; every token position counts once.
    """
    blocks = model.transformer.h
    sums: dict[int, torch.Tensor] = {}
    sq: dict[int, torch.Tensor] = {}
    count = {i: 0 for i in layers}

    def hook_for(i: int):
        def hook(module, args):  # noqa: ARG001
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[i] = sums.get(i, 0) + x.sum(0)
            sq[i] = sq.get(i, 0) + (x * x).sum(0)
            count[i] += x.shape[0]

        return hook

    handles = [blocks[i].mlp.register_forward_pre_hook(hook_for(i)) for i in layers]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(input_ids=x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for i in layers:
        if count[i] == 0:
            raise ValueError("no tokens seen: empty batches")
        mean = sums[i] / count[i]
        var = (sq[i] / count[i] - mean * mean).clamp_min(0).mean()
        out[i] = (mean, var)
    return out


@torch.no_grad()
def mlp_inputs(model: nn.Module, batches: Iterable[torch.Tensor], layer: int, max_tokens: int | None = None) -> torch.Tensor:
    """The MLP inputs (post-ln_2) at block `layer` of every token of `batches`: float [n, d] (first max_tokens)."""
    rows: list[torch.Tensor] = []

    def hook(module, args):  # noqa: ARG001
        rows.append(args[0].detach().float().reshape(-1, args[0].shape[-1]))

    handle = model.transformer.h[layer].mlp.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(input_ids=x)
            if max_tokens is not None and sum(len(r) for r in rows) >= max_tokens:
                break
    finally:
        handle.remove()
        model.train(was_training)
    if not rows:
        raise ValueError("no tokens seen: empty batches")
    return torch.cat(rows)[:max_tokens]


def fit_router(features: Sequence[torch.Tensor], l2: float = 1e-2, max_iter: int = 100) -> torch.Tensor:
    """Router weight [E, d] fitted so that x from partition e scores expert e highest: bias-free
    multinomial logistic regression (the router has no bias), each partition weighted equally,
    L2 penalty `l2` on the weights, L-BFGS on the full set.

    Why not the means alone: without a bias the Gaussian score loses its -|mu_e|^2 / 2s^2 term, so
    x . mu_e favours the partition whose mean points furthest along x, not the nearest one, and one
    partition can take another's tokens. The penalty keeps the logits moderate, so the fine-tune's
    z-loss (mean logsumexp^2) starts small instead of dominating the gradient.
    """
    x = torch.cat([f.float() for f in features])
    y = torch.cat([torch.full((len(f),), e, dtype=torch.long) for e, f in enumerate(features)])
    weight = torch.cat([torch.full((len(f),), 1.0 / (len(f) * len(features))) for f in features])
    scale = x.std(0).mean().clamp_min(1e-6)  # fit on unit-scale inputs: the penalty means the same at any width
    xs = x / scale
    w = torch.zeros(len(features), x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(xs @ w.T, y, reduction="none") * weight).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / scale).contiguous()


def router_from_means(means: torch.Tensor, variance: torch.Tensor | float) -> torch.Tensor:
    """Router weight [E, d] that scores x by closeness to each partition's mean hidden state.

    With a shared isotropic variance s^2, the log-likelihood of x under partition e's
    Gaussian is x . mu_e / s^2 - |mu_e|^2 / (2 s^2) + const. The router has no bias, so we
    keep the linear term with the means centred across partitions (the shared part scores
    every expert alike): W_e = (mu_e - mean_e mu_e) / s^2.
    """
    means = means.float()
    return (means - means.mean(0, keepdim=True)) / max(float(variance), 1e-8)


@torch.no_grad()
def merge_branches(
    branches: Sequence[nn.Module],
    moe_cfg: MoEConfig,
    router_weights: dict[int, torch.Tensor] | None = None,
) -> nn.Module:
    """The BTX model: MoE layers at `moe_cfg.layers` whose expert e is branch e's MLP.

    Every other parameter (attention, norms, embeddings, the MLPs of non-MoE blocks) is
    the mean over branches. `router_weights` ({block: [E, d]}) sets the routers; without
    it they keep install_moe's random init.
    """
    if moe_cfg.n_experts != len(branches):
        raise ValueError(f"moe.n_experts={moe_cfg.n_experts} but {len(branches)} branches")
    merged = average_models(branches)
    cfg = copy.deepcopy(moe_cfg)
    cfg.upcycle_noise_rel = 0.0  # the experts are overwritten below
    layers = install_moe(merged, cfg, seed=0)
    for i, layer in layers.items():
        for e, branch in enumerate(branches):
            dense = branch.transformer.h[i].mlp
            expert = layer.experts[e]
            for name in _EXPERT_PARAMS:
                expert.get_parameter(name).copy_(dense.get_parameter(name))
        if router_weights is not None and i in router_weights:
            layer.router.weight.copy_(router_weights[i].to(layer.router.weight.dtype))
    return merged


@torch.no_grad()
def routing_shares(model: nn.Module, batches_by_partition: Sequence[Sequence[torch.Tensor]]) -> dict[int, torch.Tensor]:
    """{block: [P, E]} share of partition p's token assignments that go to expert e.

    With routers initialized from the partition means, the diagonal should dominate:
    tokens go to the expert trained on their partition.
    """
    from moescope.moe.model import moe_layers

    layers = moe_layers(model)
    out = {i: torch.zeros(len(batches_by_partition), layer.n_experts) for i, layer in layers.items()}
    was_training = model.training
    model.eval()
    try:
        for p, batches in enumerate(batches_by_partition):
            for x in batches:
                model(input_ids=x)
                for i, layer in layers.items():
                    out[i][p] += layer.last_record.tokens_per_expert.float().cpu()
    finally:
        model.train(was_training)
    return {i: m / m.sum(1, keepdim=True).clamp_min(1) for i, m in out.items()}
