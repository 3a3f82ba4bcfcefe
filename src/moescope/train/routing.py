"""Routing statistics of one MoE layer summed over many forwards (pure computation).

Balance is judged from the token fractions themselves (max share, coefficient of
variation), not from the load-balancing loss alone: with near-uniform router
probabilities E * sum f_i P_i is about 1 whatever the fractions are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class RoutingTotals:
    """Counts and sums over all tokens seen; `add` takes one forward's RoutingRecord."""

    n_experts: int
    top_k: int
    counts: torch.Tensor = field(init=False)
    prob_sum: torch.Tensor = field(init=False)
    n_tokens: int = 0
    dropped: int = 0
    entropy_sum: float = 0.0
    z_sum: float = 0.0
    # Expert choice: tokens no expert took; None for token-choice layers.
    unrouted: int | None = None
    # Shared experts: summed per-token output norms of the shared and routed parts.
    shared_norm: float | None = None
    routed_norm: float | None = None

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.n_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(self.n_experts, dtype=torch.float64)

    def add(self, record) -> None:
        n = int(record.n_tokens)
        self.counts += record.tokens_per_expert.detach().to("cpu", torch.float64)
        self.prob_sum += record.prob_sum.detach().to("cpu", torch.float64)
        self.n_tokens += n
        self.dropped += int(record.dropped)
        self.entropy_sum += float(record.entropy_mean) * n
        self.z_sum += float(record.z_loss.detach()) * n
        if getattr(record, "unrouted", None) is not None:
            self.unrouted = (self.unrouted or 0) + int(record.unrouted)
        if getattr(record, "shared_norm", None) is not None:
            self.shared_norm = (self.shared_norm or 0.0) + float(record.shared_norm)
            self.routed_norm = (self.routed_norm or 0.0) + float(record.routed_norm)


def summarize_routing(t: RoutingTotals) -> dict[str, float | list[float]]:
    """Token fraction per expert, max fraction, load CV, entropies (nats), dropped fraction, aux losses."""
    n, k, e = max(t.n_tokens, 1), t.top_k, t.n_experts
    assignments = t.counts.sum().clamp_min(1.0)
    frac = t.counts / assignments
    mean_probs = t.prob_sum / n
    p = mean_probs.clamp_min(1e-12)
    cv = float(t.counts.std(unbiased=False) / t.counts.mean().clamp_min(1e-12))
    lb = float(e * (t.counts / (n * k) * mean_probs).sum())
    extra: dict[str, float] = {}
    if t.unrouted is not None:  # expert choice: tokens that got no expert (zero MoE output)
        extra["unrouted_fraction"] = t.unrouted / float(n)
    if t.shared_norm is not None:  # how much of the layer's output the shared experts carry
        extra["shared_output_share"] = t.shared_norm / max(t.shared_norm + t.routed_norm, 1e-12)
    return extra | {
        "n_tokens": t.n_tokens,
        "token_fraction": [round(float(x), 6) for x in frac],
        "max_fraction": float(frac.max()),
        "argmax_expert": int(frac.argmax()),
        "load_cv": cv,
        "router_entropy_token": t.entropy_sum / n,
        "router_entropy_of_mean": float(-(p * p.log()).sum()),
        "router_entropy_max": math.log(e),
        "dropped_fraction": t.dropped / float(n * k),
        "load_balance_loss": lb,
        "z_loss": t.z_sum / n,
    }
