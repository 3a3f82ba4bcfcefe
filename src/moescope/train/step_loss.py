"""The auxiliary terms of one optimizer step's loss and the step's routing sums (computation only).

Tensors in, tensors out: no files, no printing, no process groups (the caller all-reduces the
counts it passes in). Every balance term is the MoE layer's own `load_balancing_loss`, taken
over the tokens its scope names:

- "step": counts of all micro-batches and processes (`step_balance_term`); each process adds
  its own micro-batch's probability sums, scaled by the world size because DDP averages
  gradients while the global loss is a sum over processes;
- "microbatch": each micro-batch alone (`microbatch_balance_term`), averaged by the caller;
- "sequence": each sequence alone (`sequence_balance_terms`), from the router's logits, since
  the layer only sums probabilities over its whole input.
"""

from __future__ import annotations

from typing import Any

import torch

from moescope.moe.layer import load_balancing_loss


class StepRoutingSums:
    """Per-layer sums over the micro-batches of one step: expert counts, router-probability sums
    (detached), z-loss x tokens and tokens; what the step's logged lb, z and max_fraction come from."""

    def __init__(self, layers) -> None:
        self.by_layer: dict[int, dict[str, Any]] = {i: {"counts": 0, "prob_sum": 0, "z": 0.0, "n": 0} for i in layers}

    def add(self, records: dict[int, Any]) -> None:
        for i, rec in records.items():
            s = self.by_layer[i]
            s["counts"] = s["counts"] + rec.tokens_per_expert
            s["prob_sum"] = s["prob_sum"] + rec.prob_sum.detach()
            s["z"] += float(rec.z_loss.detach()) * rec.n_tokens
            s["n"] += rec.n_tokens


def z_term(records: dict[int, Any], n_local: int, z_loss_coef: float):
    """z-loss of one micro-batch, each layer weighted by its share of the step's local tokens."""
    total = 0.0
    for rec in records.values():
        total = total + rec.z_loss * (rec.n_tokens / n_local)
    return z_loss_coef * total


def step_balance_term(prob_sums: dict[int, torch.Tensor], counts: dict[int, torch.Tensor], coefs: dict[int, float],
                      top_k: dict[int, int], world: int, n_step: int):
    """Balance loss with step-wide (all micro-batches, all processes) counts and this process's
    probability sums; layers with coefficient 0 are left out."""
    total = 0.0
    for i, ps in prob_sums.items():
        if coefs[i] == 0.0:
            continue
        total = total + coefs[i] * load_balancing_loss(counts[i], ps * world, n_step, top_k[i])
    return total


def microbatch_balance_term(records: dict[int, Any], coefs: dict[int, float], top_k: dict[int, int]):
    """Balance loss of one micro-batch taken on its own tokens (the caller divides by the micro-batch count)."""
    lb = 0.0
    for i, rec in records.items():
        if coefs[i]:
            lb = lb + coefs[i] * load_balancing_loss(rec.tokens_per_expert, rec.prob_sum, rec.n_tokens, top_k[i])
    return lb


def sequence_balance_terms(router_logits: torch.Tensor, expert_index: torch.Tensor, n_seq: int, seq_len: int,
                           n_experts: int, top_k: int) -> torch.Tensor:
    """Balance loss of each of `n_seq` sequences [n_seq], from the router's logits (noise-free softmax,
    equal to the routed probabilities once router noise is 0) and the chosen experts."""
    b, t, e, k = n_seq, seq_len, n_experts, top_k
    probs = torch.softmax(router_logits.float().reshape(b, t, e), dim=-1)
    idx = expert_index.reshape(b, t * k)
    seq_counts = torch.zeros(b, e, device=idx.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    f = seq_counts / (t * k)
    p = probs.mean(dim=1)
    return e * (f * p).sum(dim=1)


def step_routing_metrics(reduced: dict[int, tuple[torch.Tensor, torch.Tensor]], stats: dict[int, dict[str, Any]],
                         n_step: int, top_k: dict[int, int]) -> dict[str, dict[str, float]]:
    """The step's logged routing values per layer: `load_balance_loss` and `max_fraction` from the
    step's counts and probability sums over all processes (`reduced[i] = (counts, prob_sum)`, as
    float64), and the token-weighted mean `z_loss` of this process."""
    lb, z, max_frac = {}, {}, {}
    for i, (counts, prob_sum) in reduced.items():
        s = stats[i]
        lb[str(i)] = float(load_balancing_loss(counts, prob_sum, n_step, top_k[i]))
        z[str(i)] = s["z"] / max(s["n"], 1)
        max_frac[str(i)] = float(counts.max() / counts.sum().clamp_min(1))
    return {"load_balance_loss": lb, "z_loss": z, "max_fraction": max_frac}


def step_total_loss(ce: float, routing: dict[str, dict[str, float]], lb_coefs: dict[int, float],
                    z_loss_coef: float) -> float:
    """The logged loss of a step: cross-entropy plus each layer's weighted balance and z terms."""
    if not routing:
        return ce
    return (ce + sum(lb_coefs[int(i)] * v for i, v in routing["load_balance_loss"].items())
            + z_loss_coef * sum(routing["z_loss"].values()))
