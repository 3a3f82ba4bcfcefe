"""Evaluation of a training run on the held-out split: loss per domain, routing metrics, collapse streaks.

Runs under its own RNG fork, so an evaluation never shifts the training RNG stream (exact resume
relies on it) and in eval mode (no dropout, no router noise).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from moescope.data.batch_order import forward_order, resolve_batch_order, routes_by_batch
from moescope.data.blocks import BlockStore
from moescope.train.config import CollapseConfig, TrainConfig
from moescope.moe.routing_sums import sums_by_layer


def eval_batches(store: BlockStore, t: TrainConfig, batch_order: str) -> list[np.ndarray]:
    """The evaluation's batches as (domain_id, row) index rows: up to t.eval_max_blocks_per_domain blocks
    per domain, spread evenly over the split, cut into batches of t.eval_batch_sequences. "by_domain":
    each domain's blocks in their own batches; "mixed": the domains interleaved evenly
    (data/batch_order.py: mixed_order), so every batch holds the domains in proportion."""
    chosen = []
    for d_id, domain in enumerate(store.domains):
        n = store.n_blocks("eval", domain)
        if n == 0:
            continue
        cap = n if t.eval_max_blocks_per_domain is None else min(n, t.eval_max_blocks_per_domain)
        rows = np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))  # spread over the split
        chosen.append(np.stack([np.full(len(rows), d_id), rows], axis=1))
    size = t.eval_batch_sequences
    if batch_order == "by_domain":  # a batch never crosses a domain boundary
        return [idx[s : s + size] for idx in chosen for s in range(0, len(idx), size)]
    index = np.concatenate(chosen) if chosen else np.zeros((0, 2), np.int64)
    index = index[forward_order(index[:, 0], batch_order)]
    return [index[s : s + size] for s in range(0, len(index), size)]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, layers: dict, store: BlockStore, t: TrainConfig,
                   accelerator) -> dict[str, Any]:
    """Loss / perplexity per domain (token- and domain-weighted) and routing metrics of `model` on the
    eval split: up to t.eval_max_blocks_per_domain blocks per domain, spread evenly over it, in batches
    composed by t.eval_batch_order (resolved for `layers`; recorded in the result as "batch_order")."""
    was_training = model.training
    model.eval()
    order = resolve_batch_order(t.eval_batch_order, routes_by_batch(layers.values()))
    totals = sums_by_layer(layers, dtype=torch.float64, detail=True)  # float64 on the CPU
    loss_sum = dict.fromkeys(range(len(store.domains)), 0.0)
    n_tok = dict.fromkeys(range(len(store.domains)), 0)
    with torch.random.fork_rng(devices=[]):  # evaluation never shifts the training RNG stream
        for idx in eval_batches(store, t, order):
            x = torch.from_numpy(store.gather("eval", idx)).to(accelerator.device)
            with accelerator.autocast():
                logits = model(input_ids=x).logits
            for d_id in np.unique(idx[:, 0]):  # one domain per batch under "by_domain": the whole batch at once
                mine = slice(None) if (idx[:, 0] == d_id).all() else torch.from_numpy(
                    np.flatnonzero(idx[:, 0] == d_id)).to(x.device)
                lg, xd = logits[mine], x[mine]
                ce = F.cross_entropy(lg[:, :-1].float().reshape(-1, lg.shape[-1]), xd[:, 1:].reshape(-1),
                                     reduction="sum")
                loss_sum[int(d_id)] += float(ce)
                n_tok[int(d_id)] += xd[:, 1:].numel()
            for i, layer in layers.items():
                totals[i].add(layer.last_record)
    model.train(was_training)
    per_domain = {domain: {"loss": loss_sum[d] / n_tok[d], "tokens": n_tok[d], "ppl": _ppl(loss_sum[d] / n_tok[d])}
                  for d, domain in enumerate(store.domains) if n_tok[d]}
    tok_loss = sum(v["loss"] * v["tokens"] for v in per_domain.values()) / sum(v["tokens"] for v in per_domain.values())
    dom_loss = sum(v["loss"] for v in per_domain.values()) / len(per_domain)
    return {
        "loss": {"token_weighted": tok_loss, "domain_weighted": dom_loss},
        "ppl": {"token_weighted": _ppl(tok_loss), "domain_weighted": _ppl(dom_loss)},
        "domains": per_domain,
        "routing": {str(i): tt.summary() for i, tt in totals.items()},
        "batch_order": order,
    }


def nonfinite_eval(ev: dict[str, Any]) -> str | None:
    """What is NaN/inf in an evaluation (None when all is finite): nothing non-finite is recorded
    as an evaluation, snapshotted or checkpointed."""
    bad = sorted(d for d, v in ev.get("domains", {}).items() if not math.isfinite(v["loss"]))
    if bad or not all(math.isfinite(v) for v in ev.get("loss", {}).values()):
        return f"evaluation loss is NaN/inf (domains: {', '.join(bad) or 'all'})"
    return None


def update_collapse_streaks(streaks: dict[str, int], routing: dict[str, dict[str, Any]], threshold_share: float,
                            window_evals: int) -> tuple[list[str], list[str]]:
    """Advance each layer's count of evaluations in a row in which one expert held more than
    `threshold_share` of the tokens (reset to 0 otherwise), in place. Returns (layers collapsed
    now, layers whose streak reached `window_evals` at this evaluation)."""
    collapsed, new = [], []
    for layer, r in routing.items():
        streak = streaks.get(layer, 0) + 1 if r["max_fraction"] > threshold_share else 0
        streaks[layer] = streak
        if streak >= window_evals:
            collapsed.append(layer)
            if streak == window_evals:
                new.append(layer)
    return collapsed, new


class CollapseWatch:
    """The collapse streaks and events of one stage (both saved in checkpoints, so a streak
    survives a resume): `observe` each evaluation's routing, get the layers collapsed now and
    the collapse events that this evaluation starts."""

    def __init__(self, cfg: CollapseConfig) -> None:
        self.cfg = cfg
        self.streak: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []

    def observe(self, step: int, routing: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
        c = self.cfg
        collapsed, new = update_collapse_streaks(self.streak, routing, c.threshold_share, c.window_evals)
        events = [{"kind": "collapse", "step": step, "layer": int(layer), "expert": routing[layer]["argmax_expert"],
                   "share": routing[layer]["max_fraction"], "window_evals": c.window_evals,
                   "threshold_share": c.threshold_share, "early_stop": c.early_stop} for layer in new]
        self.events.extend(events)
        return collapsed, events

    def state_dict(self) -> dict[str, Any]:
        return {"collapse_streak": self.streak, "collapse_events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = dict(state.get("collapse_streak", {}))
        self.events = list(state.get("collapse_events", []))


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
