"""AdamW parameter groups and the warmup + cosine schedule.

Groups: weights (decayed), norms and biases (not decayed: any parameter with fewer
than two dimensions), and router weights (their own learning-rate multiplier).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from moescope.train.config import OptimConfig


def build_param_groups(model: nn.Module, cfg: OptimConfig, router_params: list[nn.Parameter]) -> list[dict]:
    router_ids = {id(p) for p in router_params}
    decay, no_decay, router = [], [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in router_ids:
            router.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.learning_rate, "name": "no_decay"},
    ]
    if router:
        groups.append({"params": router, "weight_decay": cfg.weight_decay,
                       "lr": cfg.learning_rate * cfg.router_learning_rate_mult, "name": "router"})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, router_params: list[nn.Parameter]) -> torch.optim.AdamW:
    # fused: one kernel over all parameters; the per-parameter loop costs ~3.5x more on CPU, and an
    # MoE model has E times the FFN parameters, so the loop would tax the MoE arm more than the dense one.
    device = next(model.parameters()).device.type
    return torch.optim.AdamW(
        build_param_groups(model, cfg, router_params), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device in ("cpu", "cuda"),
    )


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_` (2-norm), minus the rescale when it would multiply by exactly 1.

    torch always multiplies every gradient by min(1, max_norm / (norm + 1e-6)), even when that
    is 1.0, to avoid a host sync on accelerators. Our trainer reads the norm on the host every
    step anyway, so the pass over all gradients is skipped when nothing is clipped; the
    gradients are bit-identical either way (x * 1.0 == x; only with torch.set_flush_denormal(True)
    would torch's pass also zero denormal gradients). That pass is a read and write of every
    gradient: an MoE model has E times the FFN parameters, so it taxed the MoE arms more than
    the dense one. A non-finite norm is still applied, as torch does.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    clip_coef = max_norm / (total + 1e-6)
    if not bool(clip_coef >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def warmup_steps_for(cfg: OptimConfig, total_steps: int) -> int:
    return int(math.ceil(cfg.warmup_fraction * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warmup, then cosine down to min_learning_rate_ratio of each group's own peak (router multiplier kept)."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup_steps_for(cfg, total_steps),
        num_training_steps=total_steps,
        min_lr_rate=cfg.min_learning_rate_ratio,
    )
