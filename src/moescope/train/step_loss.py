"""The auxiliary terms of one optimizer step's loss and its logged values (computation only).

Tensors in, tensors out: no files, no printing, no process groups (the caller all-reduces the
counts it passes in). Every balance term is the MoE layer's own `load_balancing_loss`, taken
over the tokens its scope names:

- "step": counts of all micro-batches and processes (`step_balance_term`); each process adds
  its own micro-batch's probability sums, scaled by the world size because DDP averages
  gradients while the global loss is a sum over processes;
- "microbatch": each micro-batch alone (`microbatch_balance_term`), averaged by the caller;
- "sequence": each sequence alone (`sequence_balance_terms`), from the router's logits, since
  the layer only sums probabilities over its whole input.

The step's routing sums are `moe.routing_sums.RoutingSums` (on the device, detached), all-reduced
by the caller before `step_routing_metrics` reads them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moescope.moe.layer import load_balancing_loss
from moescope.moe.routing_sums import RoutingSums


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


def step_routing_metrics(local: dict[int, RoutingSums], total: dict[int, RoutingSums]) -> dict[str, dict[str, float]]:
    """The step's logged routing values per layer: `load_balance_loss` and `max_fraction` from the
    sums over all processes (`total`, see RoutingSums.reduced), and the token-weighted mean `z_loss`
    of this process (`local`)."""
    return {"load_balance_loss": {str(i): float(t.load_balance_loss()) for i, t in total.items()},
            "z_loss": {str(i): local[i].z_loss() for i in total},
            "max_fraction": {str(i): t.max_fraction() for i, t in total.items()}}


def step_record(ce: float, learning_rate: float, grad_norm: float | None, local: dict[int, RoutingSums],
                total: dict[int, RoutingSums], lb_coefs: dict[int, float], z_loss_coef: float) -> dict[str, Any]:
    """The logged values of one optimizer step: cross-entropy, learning rate, gradient norm (when
    clipping), the routing values of every MoE layer and the total loss."""
    out: dict[str, Any] = {"ce": ce, "learning_rate": learning_rate}
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    routing = step_routing_metrics(local, total) if total else {}
    out.update(routing)
    out["loss"] = step_total_loss(ce, routing, lb_coefs, z_loss_coef)
    return out


def nonfinite_values(out: dict[str, Any], grad_norm: float, loss_nonfinite: bool) -> list[str]:
    """Names of the step's values that are NaN/inf ("loss" also when a micro-batch's loss was)."""
    bad = [name for name, v in (("loss", out["loss"]), ("ce", out["ce"]), ("gradient norm", grad_norm))
           if not math.isfinite(v)]
    if loss_nonfinite and "loss" not in bad:
        bad.insert(0, "loss")
    return bad


def step_total_loss(ce: float, routing: dict[str, dict[str, float]], lb_coefs: dict[int, float],
                    z_loss_coef: float) -> float:
    """The logged loss of a step: cross-entropy plus each layer's weighted balance and z terms."""
    if not routing:
        return ce
    return (ce + sum(lb_coefs[int(i)] * v for i, v in routing["load_balance_loss"].items())
            + z_loss_coef * sum(routing["z_loss"].values()))
