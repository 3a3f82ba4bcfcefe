"""The MoE layout of a model: how many experts, how tokens pick them, which blocks hold them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moescope.errors import MoescopeError
from moescope.io.config import bounded, check_fields

# Expert ids are stored as int16 in routing tables (analysis/capture, hf/recorder).
MAX_EXPERTS = 2**15 - 1


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

    Designs of today (all off by default, which is the layer above bit for bit):
    - `expert_granularity` m (DeepSeekMoE, Qwen-MoE): each of the n_experts experts is split
      into m experts of 1/m of the width (upcycling slices the dense MLP's hidden units) and
      each token takes m x top_k of them, so active and total parameters stay those of the
      coarse layer. With renormalize, the selected gates are normalized and then scaled to
      sum to (selected experts) / top_k, so each fine expert weighs like a 1/m slice of one
      coarse choice (an upcycled split layer starts at the coarse layer's output scale).
    - `n_shared_experts` s: s of the m x n_experts experts are always on and added with
      weight 1 to the routed output (optionally x sigmoid(w . x), `shared_gate`, as in
      Qwen-MoE). As in DeepSeekMoE they take their places among the m x n_experts experts
      and the m x top_k active ones: m x n_experts - s experts are routed, m x top_k - s
      per token, so the active compute is unchanged. They never go through the router.
    - `routing = "expert_choice"` (Zhou et al. 2022): each routed expert takes the
      C = ceil(capacity_factor x routed top-k x tokens / routed experts) tokens of the
      forward pass with the highest router score (capacity_factor None = 1.0); a token no
      expert takes gets a zero MoE output (it passes through the residual). Gates: "ste"
      normalizes a token's weights over the experts that took it (gradient straight to the
      probabilities), "switch" uses the probabilities (the paper). CAUSAL CAVEAT: an
      expert's choice depends on every token of the batch, including later ones, so such a
      model cannot generate autoregressively as is; `generate()` is refused.
    - `router_score = "sigmoid"` (DeepSeek-V3): per-expert sigmoid scores instead of a
      softmax; experts are chosen by score (+ the selection bias with balance_bias) and the
      gates are the chosen scores normalized over the selected experts (renormalize). The
      load-balancing statistics and captured router_probs use the scores normalized over
      all experts.
    """

    n_experts: int = bounded(8, low=1, high=MAX_EXPERTS)
    top_k: int = bounded(1, low=1, high=MAX_EXPERTS)
    # Block indices that get an MoE FFN; None = the last third of the blocks (8-11 of 12).
    layers: list[int] | None = bounded(None, low=0)
    gating: Literal["ste", "switch"] = "ste"
    renormalize: bool = True
    # Expert capacity = ceil(capacity_factor * top_k * tokens / n_experts) per forward pass;
    # None = dropless (every assignment is computed).
    capacity_factor: float | None = bounded(None, low=0.0, low_open=True)
    # Std of Gaussian noise added to router logits in training (logit units).
    router_noise_std: float = bounded(0.0, low=0.0)
    # Fraction of training (progress 0..1) over which the noise std falls linearly to 0;
    # 0 keeps it constant.
    router_noise_anneal_frac: float = bounded(0.25, low=0.0, high=1.0)
    # Multiplicative uniform jitter on the router input, x * U(1 - j, 1 + j), training only.
    input_jitter: float = bounded(0.0, low=0.0)
    # Dropout probability inside each expert, after the activation (Switch's expert dropout).
    expert_dropout: float = bounded(0.0, low=0.0, high=1.0, high_open=True)
    # "auto": the kind of the dense MLP being upcycled (SwiGLU for Llama-style decoders).
    expert_type: Literal["gelu", "swiglu", "auto"] = "gelu"
    # Upcycling noise: std of each copied parameter's noise = this x the parameter's own std.
    upcycle_noise_rel: float = bounded(1e-3, low=0.0)
    # Drop-Upcycling: fraction of each expert's hidden units re-initialized from the dense
    # weights' mean and std after copying (0 = plain copies; the paper's best was 0.5).
    upcycle_reinit_ratio: float = bounded(0.0, low=0.0, high=1.0)
    # Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): route with a per-expert
    # bias on the log-probabilities (selection only; gates and aux losses stay unbiased). The
    # bias is a buffer saved with the model; the trainer moves it by loss.bias_update_rate.
    balance_bias: bool = False
    # Hidden width of each expert; None = the dense MLP's width (required for upcycling).
    expert_ff: int | None = bounded(None, low=1)
    # Always-on experts, counted among the m x n_experts experts and m x top_k active ones.
    n_shared_experts: int = bounded(0, low=0)
    # Qwen-MoE's scalar sigmoid gate on the shared experts' output (one per layer).
    shared_gate: bool = False
    # Split every expert into this many experts of 1/m of the width; route m x top_k of them.
    expert_granularity: int = bounded(1, low=1, high=MAX_EXPERTS)
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    router_score: Literal["softmax", "sigmoid"] = "softmax"

    @property
    def routed_experts(self) -> int:
        """Experts behind the router: m x n_experts - n_shared_experts."""
        return self.expert_granularity * self.n_experts - self.n_shared_experts

    @property
    def routed_top_k(self) -> int:
        """Routed experts per token (token choice; the mean for expert choice): m x top_k - n_shared_experts."""
        return self.expert_granularity * self.top_k - self.n_shared_experts

    @property
    def routed_gate_scale(self) -> float:
        """Sum of a token's renormalized routed gates: routed_top_k / top_k (1 for the coarse layer)."""
        return self.routed_top_k / self.top_k

    def __post_init__(self) -> None:
        check_fields(self, "moe")  # each setting within its bounds; below, how they relate
        if not self.top_k <= self.n_experts:
            raise MoescopeError(f"moe.top_k must be in 1..n_experts={self.n_experts}, got {self.top_k}")
        if self.gating not in ("ste", "switch"):
            raise MoescopeError(f"moe.gating must be 'ste' or 'switch', got {self.gating!r}")
        if self.expert_type not in ("gelu", "swiglu", "auto"):
            raise MoescopeError(f"moe.expert_type must be 'gelu', 'swiglu' or 'auto', got {self.expert_type!r}")
        if self.layers is not None:
            if not self.layers:
                raise MoescopeError("moe.layers is empty: list the blocks to make MoE (or leave it unset for the default)")
            if len(set(self.layers)) != len(self.layers):
                raise MoescopeError(f"moe.layers must be distinct block indices, got {self.layers}")
        m, s = self.expert_granularity, self.n_shared_experts
        if self.expert_ff is not None and self.expert_ff % m:
            raise MoescopeError(f"moe.expert_ff={self.expert_ff} is not divisible by moe.expert_granularity={m}")
        if not 0 <= s < m * self.top_k:
            raise MoescopeError(
                f"moe.n_shared_experts must be in 0..{m * self.top_k - 1} (shared experts take places among the "
                f"expert_granularity x top_k = {m * self.top_k} active experts), got {s}"
            )
        if self.routed_experts < self.routed_top_k:
            raise MoescopeError(f"moe: {self.routed_experts} routed experts cannot serve top-{self.routed_top_k}")
        if self.routed_experts > MAX_EXPERTS:
            raise MoescopeError(f"moe: {self.routed_experts} routed experts (expert_granularity x n_experts - "
                                f"n_shared_experts); at most {MAX_EXPERTS}, since routing tables store expert ids "
                                "as int16")
        if self.shared_gate and s == 0:
            raise MoescopeError("moe.shared_gate needs moe.n_shared_experts >= 1")
        if self.routing not in ("token_choice", "expert_choice"):
            raise MoescopeError(f"moe.routing must be 'token_choice' or 'expert_choice', got {self.routing!r}")
        if self.router_score not in ("softmax", "sigmoid"):
            raise MoescopeError(f"moe.router_score must be 'softmax' or 'sigmoid', got {self.router_score!r}")
        if self.routing == "expert_choice" and self.balance_bias:
            raise MoescopeError("moe.balance_bias does nothing with routing = 'expert_choice' (balanced by construction)")


def default_moe_layers(n_blocks: int) -> list[int]:
    """The last third of the blocks (at least one): 8-11 of GPT-2 small's 12."""
    n = max(1, round(n_blocks / 3))
    return list(range(n_blocks - n, n_blocks))
