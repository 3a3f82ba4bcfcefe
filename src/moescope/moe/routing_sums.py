"""Routing statistics of one MoE layer summed over many forward passes: the one aggregator.

Every place that adds up `RoutingRecord`s uses `RoutingSums`: the training step (counts and
probability sums on the device, all-reduced once per step), the evaluation (float64 on the
CPU, plus entropy, dropped and unrouted tokens) and the embedding trainer's auxiliary loss
(`detach=False`, so the loss keeps its gradient to the routers). The balance loss is always the
layer's own `load_balancing_loss`, taken on the sums: the balance is asked of every token the
sums cover, not of each forward pass separately.

Balance is judged from the token fractions themselves (max share, coefficient of variation),
not from the load-balancing loss alone: with near-uniform router probabilities E * sum f_i P_i
is about 1 whatever the fractions are.

Pure computation: tensors in, numbers out; no files, no printing, no process groups (the
caller passes its all-reduce to `reduced`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moescope.moe.layer import load_balancing_loss


@dataclass
class RoutingSums:
    """Counts and sums over every token seen by one layer; `add` takes one forward's RoutingRecord.

    `dtype` None keeps the records' own dtype and device (no copy off the accelerator); a dtype
    (the evaluation's float64) moves every record to the CPU in that dtype before adding.
    `detach=False` keeps the probability and z-loss sums differentiable (a loss built from them
    trains the routers); otherwise the z-loss is summed on the host. `detail` also sums what the
    evaluation reports beside the losses (dropped assignments, router entropy, unrouted tokens,
    shared-expert share), each a host read per forward.
    """

    n_experts: int
    top_k: int
    dtype: torch.dtype | None = None
    detach: bool = True
    detail: bool = False
    counts: torch.Tensor | None = field(default=None, init=False)  # assignments per expert [E]
    prob_sum: torch.Tensor | None = field(default=None, init=False)  # router probabilities summed [E]
    n_tokens: int = field(default=0, init=False)
    z_sum: Any = field(default=0.0, init=False)  # z-loss x tokens: a float, or a tensor with detach=False
    dropped: int = field(default=0, init=False)
    entropy_sum: float = field(default=0.0, init=False)
    # Expert choice: tokens no expert took; None for token-choice layers.
    unrouted: int | None = field(default=None, init=False)
    # Shared experts: summed per-token output norms of the shared and routed parts.
    shared_norm: float | None = field(default=None, init=False)
    routed_norm: float | None = field(default=None, init=False)

    def _as_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.detach:
            t = t.detach()
        return t if self.dtype is None else t.to("cpu", self.dtype)

    def add(self, record) -> None:
        """Add one forward pass of the layer (a RoutingRecord)."""
        n = int(record.n_tokens)
        counts, prob_sum = self._as_sum(record.tokens_per_expert), self._as_sum(record.prob_sum)
        # out of place: the first record's own tensors must never be written into
        self.counts = counts if self.counts is None else self.counts + counts
        self.prob_sum = prob_sum if self.prob_sum is None else self.prob_sum + prob_sum
        self.n_tokens += n
        if self.detach:
            self.z_sum += float(record.z_loss.detach()) * n
        else:
            self.z_sum = self.z_sum + record.z_loss * n
        if self.detail:
            self.dropped += int(record.dropped)
            self.entropy_sum += float(record.entropy_mean) * n
            if getattr(record, "unrouted", None) is not None:
                self.unrouted = (self.unrouted or 0) + int(record.unrouted)
            if getattr(record, "shared_norm", None) is not None:
                self.shared_norm = (self.shared_norm or 0.0) + float(record.shared_norm)
                self.routed_norm = (self.routed_norm or 0.0) + float(record.routed_norm)

    def merge(self, other: RoutingSums) -> None:
        """Add the sums of `other` (the same layer, over other tokens) into these."""
        for name in ("counts", "prob_sum"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs if mine is None else mine + theirs)
        self.n_tokens += other.n_tokens
        self.z_sum = self.z_sum + other.z_sum
        self.dropped += other.dropped
        self.entropy_sum += other.entropy_sum
        if other.unrouted is not None:
            self.unrouted = (self.unrouted or 0) + other.unrouted
        if other.shared_norm is not None:
            self.shared_norm = (self.shared_norm or 0.0) + other.shared_norm
            self.routed_norm = (self.routed_norm or 0.0) + other.routed_norm

    def reduced(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], n_tokens: int) -> RoutingSums:
        """Counts and probability sums added over all processes (`reduce_sum`, in float64), covering
        `n_tokens` tokens in all; what a step's balance loss and max share are read from. The other
        sums are left out: they stay per process."""
        out = RoutingSums(self.n_experts, self.top_k, dtype=torch.float64)
        out.counts = reduce_sum(self._filled("counts").to(torch.float64))
        out.prob_sum = reduce_sum(self._filled("prob_sum").to(torch.float64))
        out.n_tokens = n_tokens
        return out

    def _filled(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        return value if value is not None else torch.zeros(self.n_experts, dtype=self.dtype or torch.float32)

    # ------------------------------------------------------------------ results

    def load_balance_loss(self) -> torch.Tensor:
        """The layer's `load_balancing_loss` over every token summed (differentiable with detach=False)."""
        return load_balancing_loss(self._filled("counts"), self._filled("prob_sum"), max(self.n_tokens, 1), self.top_k)

    def z_loss(self):
        """Token-weighted mean z-loss (a float, or a tensor with detach=False)."""
        return self.z_sum / max(self.n_tokens, 1)

    def max_fraction(self) -> float:
        """The largest expert's share of the assignments."""
        counts = self._filled("counts")
        return float(counts.max() / counts.sum().clamp_min(1))

    def summary(self) -> dict[str, Any]:
        """Token fraction per expert, max fraction, load CV, entropies (nats), dropped fraction, aux losses
        (entropies and dropped/unrouted tokens need `detail`)."""
        n, k, e = max(self.n_tokens, 1), self.top_k, self.n_experts
        counts, prob_sum = self._filled("counts"), self._filled("prob_sum")
        frac = counts / counts.sum().clamp_min(1.0)
        p = (prob_sum / n).clamp_min(1e-12)
        cv = float(counts.std(unbiased=False) / counts.mean().clamp_min(1e-12))
        extra: dict[str, float] = {}
        if self.unrouted is not None:  # expert choice: tokens that got no expert (zero MoE output)
            extra["unrouted_fraction"] = self.unrouted / float(n)
        if self.shared_norm is not None:  # how much of the layer's output the shared experts carry
            extra["shared_output_share"] = self.shared_norm / max(self.shared_norm + self.routed_norm, 1e-12)
        return extra | {
            "n_tokens": self.n_tokens,
            "token_fraction": [round(float(x), 6) for x in frac],
            "max_fraction": self.max_fraction(),
            "argmax_expert": int(frac.argmax()),
            "load_cv": cv,
            "router_entropy_token": self.entropy_sum / n,
            "router_entropy_of_mean": float(-(p * p.log()).sum()),
            "router_entropy_max": math.log(e),
            "dropped_fraction": self.dropped / float(n * k),
            "load_balance_loss": float(self.load_balance_loss()),
            "z_loss": float(self.z_loss()),
        }


def sums_by_layer(layers: dict[int, Any], **options: Any) -> dict[int, RoutingSums]:
    """One empty RoutingSums per MoE layer ({block index: MoELayer}), all with the same `options`."""
    return {i: RoutingSums(layer.n_experts, layer.top_k, **options) for i, layer in layers.items()}


def add_records(sums: dict[int, RoutingSums], records: dict[int, Any]) -> None:
    """Add one forward pass's records ({block index: RoutingRecord}) to the matching sums."""
    for i, rec in records.items():
        sums[i].add(rec)


__all__ = ["RoutingSums", "add_records", "sums_by_layer"]
