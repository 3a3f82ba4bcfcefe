"""The forward and backward passes of one optimizer step, for every load-balancing scope.

Load-balancing loss over a whole optimizer step with gradient accumulation: f_i must
count the tokens of ALL micro-batches before any backward. "keep_graphs" keeps every
micro-batch graph and backpropagates once (activation memory x accumulation steps);
"prepass" first routes all micro-batches without gradients, replaying the RNG so the
routing is identical, then runs forward + backward per micro-batch with those counts
(one extra forward per step, memory of one micro-batch). With one micro-batch both are
the plain path and cost nothing extra. Across processes the counts are all-reduced.

The loss terms themselves are computed in train/step_loss.py (tensors only); this module
decides which tokens each term sees and when backward runs, and sums the step's logged values
over all processes into one NaN/inf verdict (`StepRunner.outcome`). Clipping and the optimizer
update (or its skip) stay with the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moescope.moe.capture import record_routing
from moescope.moe.layer import update_balance_bias
from moescope.moe.routing_sums import RoutingSums, add_records, sums_by_layer
from moescope.train.config import LossConfig
from moescope.train.step_loss import (
    microbatch_balance_term, nonfinite_values, sequence_balance_terms, step_balance_term, step_record, z_term,
)

log = logging.getLogger(__name__)


@dataclass
class StepPasses:
    """What the passes of one step leave for the update: this process's mean cross-entropy over its
    micro-batches, the per-layer routing sums of this process, the step's token count over all
    processes, and whether any loss on this process was NaN/inf."""

    ce_local: float
    stats: dict[int, RoutingSums]
    n_step: int
    nonfinite: bool


class StepRunner:
    """Runs the micro-batches of one optimizer step through `forward` (input ids -> mean CE) and
    `accelerator.backward`, adding the z and balance terms of the configured lb scope."""

    def __init__(self, model, accelerator, layers: dict, loss: LossConfig, lb_coefs: dict[int, float]) -> None:
        self.model, self.accelerator, self.layers, self.loss = model, accelerator, layers, loss
        self.lb_coefs = lb_coefs
        self.top_k = {i: layer.top_k for i, layer in layers.items()}
        self.world = accelerator.num_processes
        self._nonfinite = False

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.world > 1 else t

    def totals(self, stats: dict[int, RoutingSums], n_step: int) -> dict[int, RoutingSums]:
        """The step's counts and probability sums over all processes (float64), per layer."""
        return {i: s.reduced(self.reduce_sum, n_step) for i, s in stats.items()}

    def agree_nonfinite(self, bad: list[str]) -> list[str]:
        """One decision for all processes, or they would leave the collectives out of step."""
        if self.world > 1:
            flag = self.reduce_sum(torch.tensor(float(bool(bad)), device=self.accelerator.device))
            if float(flag) > 0 and not bad:
                return ["loss on another process"]
        return bad

    def outcome(self, p: StepPasses, learning_rate: float, grad_norm: float,
                log_grad_norm: bool) -> tuple[dict[str, Any], dict[int, RoutingSums], list[str]]:
        """The step's logged values over all processes, its routing totals, and what in it is NaN/inf
        (the loss, `grad_norm`, or another process's loss: one verdict for all processes)."""
        ce = float(self.reduce_sum(torch.tensor(p.ce_local, device=self.accelerator.device))) / self.world
        totals = self.totals(p.stats, p.n_step)
        out = step_record(ce, learning_rate, grad_norm if log_grad_norm else None, p.stats, totals, self.lb_coefs,
                          self.loss.z_loss_coef)
        return out, totals, self.agree_nonfinite(nonfinite_values(out, grad_norm, p.nonfinite))

    def update_balance_bias(self, totals: dict[int, RoutingSums]) -> None:
        """Auxiliary-loss-free balancing after an applied update, from the step's counts over all
        processes: the same counts on every process, so every replica's bias stays equal."""
        rate = self.loss.bias_update_rate
        for i, t in totals.items():
            layer = self.layers[i]
            if rate > 0 and layer.balance_bias:
                update_balance_bias(layer.selection_bias, t.counts, rate)

    def _backward(self, loss) -> None:
        # Only noted here: every process still runs its backward (DDP's all-reduce needs all of them);
        # the decision to apply or drop the update is taken on values all processes share.
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite = True
        self.accelerator.backward(loss)

    def _records(self) -> dict[int, Any]:
        return {i: layer.last_record for i, layer in self.layers.items()}

    def _sync_unless_last(self, j: int, m: int):
        return self.accelerator.no_sync(self.model) if j < m - 1 and self.world > 1 else contextlib.nullcontext()

    def run(self, batches: list[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor],
            step: int) -> StepPasses:
        self._nonfinite = False
        if self.loss.load_balance_scope == "sequence":
            return self._run_per_sequence(batches, forward)
        loss_cfg, layers, m = self.loss, self.layers, len(batches)
        ce_sum = 0.0
        stats = sums_by_layer(layers)
        n_local = sum(b.numel() for b in batches)
        n_step = n_local * self.world
        scope = loss_cfg.load_balance_scope
        need_lb = any(self.lb_coefs.values())
        # Step-scope counts: all tokens of the step, all processes, known before any backward.
        step_counts: dict[int, torch.Tensor] | None = None
        if need_lb and scope == "step" and m > 1 and loss_cfg.load_balance_accumulation == "prepass":
            step_counts = self._prepass_counts(batches, forward)

        def lb_term_step(prob_sums: dict[int, torch.Tensor], counts: dict[int, torch.Tensor]):
            return step_balance_term(prob_sums, counts, self.lb_coefs, self.top_k, self.world, n_step)

        if layers and scope == "step" and m > 1 and loss_cfg.load_balance_accumulation == "keep_graphs":
            total = 0.0
            graphs = sums_by_layer(layers, detach=False)  # probability sums that keep their graphs
            for x in batches:
                ce = forward(x)
                recs = self._records()
                add_records(stats, recs)
                add_records(graphs, recs)
                ce_sum += float(ce.detach())
                total = total + ce / m + z_term(recs, n_local, loss_cfg.z_loss_coef)
            counts = {i: self.reduce_sum(stats[i].counts) for i in layers}
            self._backward(total + lb_term_step({i: g.prob_sum for i, g in graphs.items()}, counts))
            return StepPasses(ce_sum / m, stats, n_step, self._nonfinite)
        for j, x in enumerate(batches):
            with self._sync_unless_last(j, m):
                ce = forward(x)
                recs = self._records()
                add_records(stats, recs)
                loss = ce / m + z_term(recs, n_local, loss_cfg.z_loss_coef) if layers else ce / m
                if need_lb and scope == "step":
                    if step_counts is None:  # one micro-batch: its counts are the step's
                        counts = {i: self.reduce_sum(rec.tokens_per_expert) for i, rec in recs.items()}
                    else:
                        counts = step_counts
                    loss = loss + lb_term_step({i: rec.prob_sum for i, rec in recs.items()}, counts)
                elif layers and scope == "microbatch":
                    loss = loss + microbatch_balance_term(recs, self.lb_coefs, self.top_k) / m
                ce_sum += float(ce.detach())
                self._backward(loss)
        if step_counts is not None:
            for i in layers:
                replayed = self.reduce_sum(stats[i].counts)
                if not torch.equal(replayed, step_counts[i]):
                    log.warning("step %d layer %d: routing of the pre-pass differs from the training pass "
                                "(non-deterministic kernels?); the pre-pass counts were used", step, i)
        return StepPasses(ce_sum / m, stats, n_step, self._nonfinite)

    def _prepass_counts(self, batches: list[torch.Tensor], forward) -> dict[int, torch.Tensor]:
        """Expert counts of all micro-batches (all processes) from a no-grad routing pass; the RNG is
        replayed afterwards so the real forwards draw the same noise and dropout."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        sums = sums_by_layer(self.layers)
        with torch.no_grad():
            for x in batches:
                forward(x)
                add_records(sums, self._records())
        step_counts = {i: self.reduce_sum(s.counts) for i, s in sums.items()}
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return step_counts

    def _run_per_sequence(self, batches: list[torch.Tensor], forward) -> StepPasses:
        """load_balance_scope = "sequence": the balance loss of every sequence, averaged over the step's sequences.

        P per sequence needs per-token router probabilities with gradient; the layer only sums
        them over its whole input, so they are taken from the router's output via a forward
        hook, as the noise-free softmax (equal to the routed one once router noise is 0).
        """
        loss_cfg, layers, m = self.loss, self.layers, len(batches)
        n_seq_local = sum(b.shape[0] for b in batches)
        n_local = sum(b.numel() for b in batches)
        sums = sums_by_layer(layers)
        ce_sum = 0.0
        logits_seen: dict[int, torch.Tensor] = {}
        hooks = [layer.router.register_forward_hook(_store_output(logits_seen, i)) for i, layer in layers.items()]
        try:
            with record_routing(layers):  # each token's experts, for the per-sequence counts
                for j, x in enumerate(batches):
                    with self._sync_unless_last(j, m):
                        ce = forward(x)
                        add_records(sums, self._records())
                        ce_sum += float(ce.detach())
                        self._backward(self._sequence_loss(ce / m, x, logits_seen, n_local, n_seq_local))
        finally:
            for h in hooks:
                h.remove()
        return StepPasses(ce_sum / m, sums, n_local * self.world, self._nonfinite)


    def _sequence_loss(self, total, x: torch.Tensor, logits_seen: dict[int, torch.Tensor], n_local: int,
                       n_seq_local: int):
        """`total` (the micro-batch's CE share) plus its z and per-sequence balance terms, layer by layer."""
        b, t = x.shape
        for i, layer in self.layers.items():
            rec = layer.last_record
            total = total + self.loss.z_loss_coef * rec.z_loss * (rec.n_tokens / n_local)
            if not self.lb_coefs[i]:
                continue
            lb_per_seq = sequence_balance_terms(logits_seen[i], rec.expert_index, b, t, layer.n_experts, layer.top_k)
            total = total + self.lb_coefs[i] * lb_per_seq.sum() / n_seq_local
        return total


def step_schedule_only(scheduler) -> None:
    """Advance the schedule of a skipped update: torch warns when scheduler.step() comes without
    optimizer.step(), which is deliberate here (the schedule follows the step count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def _store_output(store: dict, key: int):
    def hook(module, inputs, output) -> None:  # noqa: ARG001
        store[key] = output

    return hook
