"""Fine-grained and shared experts made from coarse ones, and the expert-choice generation guard.

Fine-grained experts (DeepSeekMoE, Qwen-MoE upcycling): a coarse expert of width ff is
cut into m experts of width ff/m by its hidden units. Hidden unit j of a GELU expert is
column j of c_fc.weight, element j of c_fc.bias and row j of c_proj.weight; of a SwiGLU
expert row j of gate_proj/up_proj and column j of down_proj. The output bias (c_proj.bias)
is split evenly, so the m slices summed equal the coarse expert (up to the rounding of
summing partial products). Upcycling therefore stays what it was (noisy copies and
Drop-Upcycling of the dense MLP, moe/upcycle.py) and the copies are then sliced.
"""

from __future__ import annotations

import torch
from torch import nn

from moescope.errors import MoescopeError
from moescope.moe.experts import GeluExpert, SwiGLUExpert


@torch.no_grad()
def slice_expert(expert: nn.Module, parts: int) -> list[nn.Module]:
    """`parts` experts, each holding 1/parts of `expert`'s hidden units (contiguous) and of its output bias."""
    if isinstance(expert, GeluExpert):
        ff = expert.c_fc.nf
    elif isinstance(expert, SwiGLUExpert):
        ff = expert.gate_proj.out_features
    else:
        raise MoescopeError(f"cannot split a {type(expert).__name__} expert (GELU and SwiGLU experts only)")
    if ff % parts:
        raise MoescopeError(f"expert width {ff} is not divisible by moe.expert_granularity={parts}")
    width = ff // parts
    out: list[nn.Module] = []
    for j in range(parts):
        units = slice(j * width, (j + 1) * width)
        if isinstance(expert, GeluExpert):
            d = expert.c_fc.weight.shape[0]
            fine = GeluExpert(d, width, dropout=expert.dropout.p)
            fine.act = expert.act  # the same (stateless) activation module
            fine.c_fc.weight.copy_(expert.c_fc.weight[:, units])
            fine.c_fc.bias.copy_(expert.c_fc.bias[units])
            fine.c_proj.weight.copy_(expert.c_proj.weight[units, :])
            fine.c_proj.bias.copy_(expert.c_proj.bias / parts)
        else:
            d = expert.gate_proj.in_features
            fine = SwiGLUExpert(d, width, dropout=expert.dropout.p)
            fine.gate_proj.weight.copy_(expert.gate_proj.weight[units])
            fine.up_proj.weight.copy_(expert.up_proj.weight[units])
            fine.down_proj.weight.copy_(expert.down_proj.weight[:, units])
        ref = next(expert.parameters())
        out.append(fine.to(device=ref.device, dtype=ref.dtype))
    return out


def split_experts(experts: nn.ModuleList, cfg) -> tuple[nn.ModuleList, nn.ModuleList | None]:
    """(routed, shared) experts of a layer from its cfg.n_experts coarse ones.

    Each coarse expert is cut into cfg.expert_granularity slices (in order: coarse expert 0's
    slices first); the first cfg.n_shared_experts slices become the shared experts. The
    coarse layout (granularity 1, no shared experts) returns `experts` itself, untouched.
    """
    m, s = cfg.expert_granularity, cfg.n_shared_experts
    if m == 1 and s == 0:
        return experts, None
    fine = [f for expert in experts for f in slice_expert(expert, m)] if m > 1 else list(experts)
    shared = nn.ModuleList(fine[:s]) if s else None
    return nn.ModuleList(fine[s:]), shared


def _refuse_generate(*args, **kwargs):
    raise MoescopeError(
        "this model routes by expert choice (moe.routing = 'expert_choice'): each expert picks tokens "
        "from the whole batch, later positions included, so it cannot generate autoregressively"
    )


def refuse_generation_if_noncausal(model: nn.Module, cfg) -> None:
    """Make `model.generate` raise a clear MoescopeError when its MoE layers use expert choice."""
    if cfg.routing == "expert_choice":
        model.generate = _refuse_generate
