"""The MoE layout of a model: how many experts, how tokens pick them, which blocks hold them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moescope.errors import MoescopeError


@dataclass
class MoEConfig:
    """Settings of every MoE layer in a model (one config, shared by all its MoE blocks).

    Routing: a bias-free router scores the experts, softmax over all of them, top-k.
    `gating` applies to top-1 only: "ste" multiplies the chosen expert's output by
    exactly 1.0 in the forward pass and sends the gradient through the chosen
    probability (straight-through), so an upcycled model equals its dense parent at
    step 0; "switch" multiplies by the probability (Switch Transformer). For k > 1
    the chosen probabilities are the weights, renormalized to sum to 1 when
    `renormalize` is set (Mixtral).
    """

    n_experts: int = 8
    top_k: int = 1
    # Block indices that get an MoE FFN; None = the last third of the blocks (8-11 of 12).
    layers: list[int] | None = None
    gating: Literal["ste", "switch"] = "ste"
    renormalize: bool = True
    # Expert capacity = ceil(capacity_factor * top_k * tokens / n_experts) per forward pass;
    # None = dropless (every assignment is computed).
    capacity_factor: float | None = None
    # Std of Gaussian noise added to router logits in training (logit units).
    router_noise_std: float = 0.0
    # Fraction of training (progress 0..1) over which the noise std falls linearly to 0;
    # 0 keeps it constant.
    router_noise_anneal_frac: float = 0.25
    # Multiplicative uniform jitter on the router input, x * U(1 - j, 1 + j), training only.
    input_jitter: float = 0.0
    # Dropout probability inside each expert, after the activation (Switch's expert dropout).
    expert_dropout: float = 0.0
    # "auto": the kind of the dense MLP being upcycled (SwiGLU for Llama-style decoders).
    expert_type: Literal["gelu", "swiglu", "auto"] = "gelu"
    # Upcycling noise: std of each copied parameter's noise = this x the parameter's own std.
    upcycle_noise_rel: float = 1e-3
    # Drop-Upcycling: fraction of each expert's hidden units re-initialized from the dense
    # weights' mean and std after copying (0 = plain copies; the paper's best was 0.5).
    upcycle_reinit_ratio: float = 0.0
    # Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): route with a per-expert
    # bias on the log-probabilities (selection only; gates and aux losses stay unbiased). The
    # bias is a buffer saved with the model; the trainer moves it by loss.bias_update_rate.
    balance_bias: bool = False
    # Hidden width of each expert; None = the dense MLP's width (required for upcycling).
    expert_ff: int | None = None

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise MoescopeError(f"moe.n_experts must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise MoescopeError(f"moe.top_k must be in 1..n_experts={self.n_experts}, got {self.top_k}")
        if self.gating not in ("ste", "switch"):
            raise MoescopeError(f"moe.gating must be 'ste' or 'switch', got {self.gating!r}")
        if self.expert_type not in ("gelu", "swiglu", "auto"):
            raise MoescopeError(f"moe.expert_type must be 'gelu', 'swiglu' or 'auto', got {self.expert_type!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise MoescopeError(f"moe.capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")
        for name in ("router_noise_std", "input_jitter", "upcycle_noise_rel"):
            if getattr(self, name) < 0:
                raise MoescopeError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.upcycle_reinit_ratio <= 1.0:
            raise MoescopeError(f"moe.upcycle_reinit_ratio must be in [0, 1], got {self.upcycle_reinit_ratio}")
        if not 0.0 <= self.router_noise_anneal_frac <= 1.0:
            raise MoescopeError(f"moe.router_noise_anneal_frac must be in [0, 1], got {self.router_noise_anneal_frac}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise MoescopeError(f"moe.expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.layers is not None:
            if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
                raise MoescopeError(f"moe.layers must be distinct non-negative block indices, got {self.layers}")
        if self.expert_ff is not None and self.expert_ff < 1:
            raise MoescopeError(f"moe.expert_ff must be >= 1, got {self.expert_ff}")


def default_moe_layers(n_blocks: int) -> list[int]:
    """The last third of the blocks (at least one): 8-11 of GPT-2 small's 12."""
    n = max(1, round(n_blocks / 3))
    return list(range(n_blocks - n, n_blocks))
