"""Expert FFNs: GPT-2's MLP (same shapes and parameter names) and a SwiGLU variant.

Any module mapping [n, d] -> [n, d] can be an expert of `MoELayer`; these two are the
ones moescope builds itself.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D


class GeluExpert(nn.Module):
    """GPT-2's MLP: c_fc (Conv1D d -> ff), activation, expert dropout, c_proj (Conv1D ff -> d).

    Parameter names and shapes equal `GPT2MLP`'s (c_fc.weight [d, ff], c_proj.weight
    [ff, d]), so a dense MLP's state dict loads into it unchanged. The default activation
    is torch's fused tanh GELU, the function GPT-2's Python gelu_new computes (see
    moe/activation.py). Expert dropout sits after the activation, where Switch puts it;
    GPT-2's residual dropout after c_proj belongs to the block, not to the expert
    (MoELayer applies it once to the combined output).
    """

    def __init__(
        self, d_model: int, d_ff: int, *, activation: str = "gelu_pytorch_tanh", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.c_fc = Conv1D(d_ff, d_model)
        self.c_proj = Conv1D(d_model, d_ff)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.dropout(self.act(self.c_fc(x))))


class SwiGLUExpert(nn.Module):
    """SwiGLU FFN (LLaMA/Mixtral): down(dropout(silu(gate(x)) * up(x))), no biases."""

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)))


def build_experts(
    n_experts: int,
    d_model: int,
    d_ff: int,
    *,
    expert_type: str = "gelu",
    activation: str = "gelu_pytorch_tanh",
    dropout: float = 0.0,
) -> nn.ModuleList:
    """A fresh ModuleList of `n_experts` experts of one type."""
    if expert_type == "gelu":
        return nn.ModuleList(
            GeluExpert(d_model, d_ff, activation=activation, dropout=dropout) for _ in range(n_experts)
        )
    if expert_type == "swiglu":
        return nn.ModuleList(SwiGLUExpert(d_model, d_ff, dropout=dropout) for _ in range(n_experts))
    raise ValueError(f"unknown expert_type {expert_type!r}")
