"""One training run (the base stage or one arm): the loop, evaluation, checkpoints, signals.

Run directory of one stage (see DEVELOPERS.md, "Run directory")::

    config.json        resolved RunConfig (+ where the weights came from)
    metrics.jsonl      train / eval / collapse / event records
    checkpoints/       step_XXXXXX/{model/, trainer_state.json, trainer_tensors.safetensors, manifest.json},
                       latest (see train/checkpoint.py)
    snapshots/         step_XXXXXX/ model only, one per evaluation
    final/             the trained model (save_moe_model)
    summary.json       final evaluation and run statistics (present = stage complete)

The loop runs through accelerate's Accelerator, so `accelerate launch -m moescope.cli
train ...` gives DDP with no code change; one CPU process is the default. Each step's
batch is fixed by (seed, step) and split into micro-batches and per-process shards
(moescope.train.order), so the data order is the same for every arm and any number
of processes.

Load-balancing loss over a whole optimizer step with gradient accumulation: f_i must
count the tokens of ALL micro-batches before any backward. "keep_graphs" keeps every
micro-batch graph and backpropagates once (activation memory x accumulation steps);
"prepass" first routes all micro-batches without gradients, replaying the RNG so the
routing is identical, then runs forward + backward per micro-batch with those counts
(one extra forward per step, memory of one micro-batch). With one micro-batch both are
the plain path and cost nothing extra. Across processes the counts are all-reduced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from moescope.data.blocks import BlockStore, tokenizer_dir
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_json, remove_orphaned_temporaries
from moescope.io.config import to_dict
from moescope.io.lock import is_empty_ignoring_lock, run_directory_lock
from moescope.io.provenance import sha256_file
from moescope.moe.gpt2 import (
    install_moe, moe_layers, router_parameters, save_moe_model, set_training_progress,
)
from moescope.moe.layer import load_balancing_loss, update_balance_bias
from moescope.runtime import peak_memory_mb, reset_peak_memory
from moescope.train.checkpoint import (
    NonFiniteState, last_verified_checkpoint, newest_intact_checkpoint, point_latest, restore_rng_state,
    save_checkpoint,
)
from moescope.train.config import RunConfig
from moescope.train.metrics_log import MetricsLog, read_metrics
from moescope.train.model import build_scratch_model, check_model_matches_data, load_init_model
from moescope.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from moescope.train.order import TrainOrder
from moescope.train.evaluator import evaluate_model, update_collapse_streaks
from moescope.train.step_loss import (
    StepRoutingSums, microbatch_balance_term, sequence_balance_terms, step_balance_term, z_term,
)
from moescope.train.rundir import (
    CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, check_same_config, read_stored_config,
)

log = logging.getLogger(__name__)

# Set-ups whose gradients are plain, whole tensors on every process (one process, or DDP on any
# device), clipped by moescope itself; the others (FSDP, DeepSpeed, XLA, Megatron-LM) shard or
# compile the gradients and keep accelerate's own clipping.
_PLAIN_CLIP_SETUPS = frozenset(
    getattr(DistributedType, name)
    for name in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                 "MULTI_HPU", "MULTI_NEURON")
    if hasattr(DistributedType, name)
)


class NonFiniteLoss(MoescopeError):
    """A loss, gradient norm, evaluation loss or weight became NaN or infinite and training stopped
    (train.on_nonfinite = "stop", or too many skipped updates in a row); nothing non-finite was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: a checkpoint was saved, then training stopped."""


def open_store(data_dir: str | Path) -> BlockStore:
    if not str(data_dir):
        raise MoescopeError("data_dir is not set (config key data_dir, or --set data_dir=DIR)")
    path = Path(data_dir)
    if not path.is_dir():
        raise MoescopeError(f"data directory not found: {path} (build it with `moescope data build --out {path}`)")
    store = BlockStore.open(path)
    for split in ("train", "eval"):
        if sum(store.n_blocks(split, d) for d in store.domains) == 0:
            raise MoescopeError(f"{path}: the {split} split has no blocks")
    return store


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cuda)
    # Experts that receive no token in a micro-batch have no gradient: DDP must allow that.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.arch == "moe")]
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=handlers)


class Trainer:
    """Build (or restore) a run, then `fit()`. `train_step()` is public for the benchmark."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: Path,
        *,
        init: str | Path | None = None,
        name: str = "run",
        resume: bool = False,
        accelerator=None,
        on_step: Callable[[int, "Trainer"], None] | None = None,
        write: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.name = name
        self.on_step = on_step
        self.write = write
        self.store = open_store(cfg.data_dir)
        self.manifest_sha = sha256_file(self.store.root / "manifest.json")
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.collapse_streak: dict[str, int] = {}
        self.collapse_events: list[dict[str, Any]] = []
        self._stop_signal: int | None = None
        self._stop_reason: str | None = None
        self._peak_window = False  # True once fit() has reset the peak-memory window for this stage
        self.last_good_checkpoint: Path | None = None
        self.nonfinite_skips_in_a_row = 0
        self.nonfinite_skips_total = 0
        self.train_seconds = 0.0  # training time of the steps so far, over every resume (for tokens/s)
        self.timed_steps = 0
        self._resumed_at: int | None = None

        found = self._checkpoint_to_resume() if resume else None
        if found is None and write and not resume and not is_empty_ignoring_lock(self.out_dir):
            raise MoescopeError(f"{self.out_dir} already exists and is not empty; pass --resume or choose another --out")
        state: dict[str, Any] | None = None
        ckpt: Path | None = None
        if found is not None:
            ckpt, model, state = found
            self._check_state_matches(state, ckpt)
            self.last_good_checkpoint = ckpt
        else:
            from accelerate.utils import set_seed

            set_seed(cfg.train.seed)
            model = self._initial_model(init)
        check_model_matches_data(model, self.store, where=f"{name}")
        model.config.use_cache = False
        self.init = str(init) if init is not None else "scratch"
        self.layers = moe_layers(model)
        if cfg.arch == "dense" and self.layers:
            raise MoescopeError(f"{name}: arch is dense but the starting model {init} has MoE layers")
        self._lb_coefs = {
            i: float(cfg.loss.lb_coef_by_layer.get(str(i), cfg.loss.lb_coef)) for i in self.layers
        }
        self.top_k = {i: layer.top_k for i, layer in self.layers.items()}

        if cfg.train.cpu_threads is not None:
            torch.set_num_threads(cfg.train.cpu_threads)
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        self.world = acc.num_processes
        t = cfg.train
        if t.batch_sequences % (t.grad_accum_steps * self.world):
            raise MoescopeError(
                f"train.batch_sequences={t.batch_sequences} must be divisible by grad_accum_steps x processes "
                f"= {t.grad_accum_steps} x {self.world}"
            )
        model.to(acc.device)
        optimizer = build_optimizer(model, cfg.optim, router_parameters(model))
        self.scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
        if state is not None:
            try:
                optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise MoescopeError(f"checkpoint {ckpt}: optimizer/scheduler state does not fit this model "
                                    f"({type(exc).__name__}: {exc})") from None
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)
        self.order = TrainOrder(self.store.index("train"), t.seed, t.batch_sequences)
        self.tokens_per_step = t.batch_sequences * self.store.block_size

        if state is not None:
            self.step = int(state["step"])
            self.collapse_streak = dict(state.get("collapse_streak", {}))
            self.collapse_events = list(state.get("collapse_events", []))
            self.nonfinite_skips_in_a_row = int(state.get("nonfinite_skips_in_a_row", 0))
            self.nonfinite_skips_total = int(state.get("nonfinite_skips_total", 0))
            self.train_seconds = float(state.get("train_seconds", 0.0))
            self.timed_steps = int(state.get("timed_steps", 0))
            self._resumed_at = self.step
            restore_rng_state(state["rng"])
        acc.wait_for_everyone()  # every process has checked the directory before the main one writes
        self.metrics = MetricsLog(
            self.out_dir / METRICS_NAME,
            tensorboard_dir=self.out_dir / "tensorboard" if cfg.tracking.tensorboard else None,
            wandb_dir=self.out_dir if cfg.tracking.wandb else None,
            wandb_name=name,
            config=to_dict(cfg),
            enabled=write and acc.is_main_process,
        )
        if write and acc.is_main_process:
            # orphans of a checkpoint write or prune killed mid-way; callers hold the run-directory lock
            for orphan in remove_orphaned_temporaries(self.ckpt_dir):
                log.warning("%s: removed %s, left by an interrupted checkpoint write", name, orphan)
            if state is None and resume:
                self.metrics.truncate_after(-1)  # an attempt that never reached a checkpoint starts over
            if state is not None:
                point_latest(self.ckpt_dir, ckpt)  # killed between commit and pointer, or fell back
                self.metrics.truncate_after(self.step)
                self.metrics.write({"kind": "event", "step": self.step, "event": "resume", "checkpoint": str(ckpt)})
            else:
                if self.out_dir.exists() and (self.out_dir / CONFIG_NAME).exists() and not resume:
                    raise MoescopeError(f"{self.out_dir} was written by another process while starting")
                atomic_write_json(self.out_dir / CONFIG_NAME, {
                    "name": name, "init": self.init, "config": to_dict(cfg),
                    "data_manifest_sha256": self.manifest_sha,
                    "moe_layers": sorted(self.layers), "world_size": self.world,
                })

    # ------------------------------------------------------------------ set-up helpers

    def _initial_model(self, init: str | Path | None):
        cfg = self.cfg
        if init is None:
            model = build_scratch_model(cfg.model, self.store, cfg.train.seed)
        else:
            model = load_init_model(init)
        if cfg.arch == "moe" and not moe_layers(model):
            install_moe(model, cfg.moe, seed=cfg.train.seed)
        model.train()
        return model

    def _checkpoint_to_resume(self) -> tuple[Path, torch.nn.Module, dict[str, Any]] | None:
        stored = self.out_dir / CONFIG_NAME
        if stored.is_file():
            check_same_config(self.cfg, read_stored_config(stored), str(stored))
        return newest_intact_checkpoint(self.ckpt_dir)

    def _check_state_matches(self, state: dict, ckpt: Path) -> None:
        check_same_config(self.cfg, state["config"], f"checkpoint {ckpt}")
        if state.get("data_manifest_sha256") != self.manifest_sha:
            raise MoescopeError(
                f"checkpoint {ckpt} was trained on another data directory (manifest hash differs from "
                f"{self.store.root / 'manifest.json'})"
            )

    # ------------------------------------------------------------------ one optimizer step

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        acc, m = self.accelerator, self.cfg.train.grad_accum_steps
        out = []
        for micro in range(m):
            rows = self.order.rows(step, micro, m, acc.process_index, self.world)
            out.append(torch.from_numpy(self.store.gather("train", rows)).to(acc.device))
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.model(input_ids=x, labels=x).loss.float()

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.world > 1 else t

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (all micro-batches); returns the logged scalars."""
        cfg, step = self.cfg, self.step
        self._local_nonfinite = False
        self.model.train()
        set_training_progress(self.raw_model, step / cfg.train.steps)
        batches = self._micro_batches(step)
        m = len(batches)
        scope = cfg.loss.lb_scope
        layers = self.layers
        if scope == "sequence":
            return self._train_step_per_sequence(batches)

        ce_sum = 0.0
        sums = StepRoutingSums(layers)
        stats = sums.by_layer
        n_local = sum(b.numel() for b in batches)

        def records():
            return {i: layer.last_record for i, layer in layers.items()}

        # Step-scope counts: all tokens of the step, all processes, known before any backward.
        step_counts: dict[int, torch.Tensor] | None = None
        n_step = n_local * self.world
        need_lb = any(self._lb_coefs.values())
        if need_lb and scope == "step" and m > 1 and cfg.loss.lb_accumulation == "prepass":
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            counts = {i: 0 for i in layers}
            with torch.no_grad():
                for x in batches:
                    self._forward(x)
                    for i, rec in records().items():
                        counts[i] = counts[i] + rec.tokens_per_expert
            step_counts = {i: self._reduce_sum(c) for i, c in counts.items()}
            torch.set_rng_state(rng)  # replay: the real forwards draw the same noise and dropout
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

        def lb_term_step(prob_sums: dict[int, torch.Tensor], counts: dict[int, torch.Tensor]):
            return step_balance_term(prob_sums, counts, self._lb_coefs, self.top_k, self.world, n_step)

        if layers and scope == "step" and m > 1 and cfg.loss.lb_accumulation == "keep_graphs":
            total = 0.0
            prob_sums: dict[int, torch.Tensor] = {i: 0 for i in layers}
            for x in batches:
                ce = self._forward(x)
                recs = records()
                sums.add(recs)
                for i, rec in recs.items():
                    prob_sums[i] = prob_sums[i] + rec.prob_sum
                ce_sum += float(ce.detach())
                total = total + ce / m + z_term(recs, n_local, cfg.loss.z_coef)
            counts = {i: self._reduce_sum(stats[i]["counts"]) for i in layers}
            total = total + lb_term_step(prob_sums, counts)
            self._note_loss(total)
            self.accelerator.backward(total)
        else:
            for j, x in enumerate(batches):
                sync = j == m - 1
                ctx = self.accelerator.no_sync(self.model) if not sync and self.world > 1 else contextlib.nullcontext()
                with ctx:
                    ce = self._forward(x)
                    recs = records()
                    sums.add(recs)
                    loss = ce / m + z_term(recs, n_local, cfg.loss.z_coef) if layers else ce / m
                    if need_lb and scope == "step":
                        if step_counts is None:  # one micro-batch: its counts are the step's
                            counts = {i: self._reduce_sum(rec.tokens_per_expert) for i, rec in recs.items()}
                        else:
                            counts = step_counts
                        loss = loss + lb_term_step({i: rec.prob_sum for i, rec in recs.items()}, counts)
                    elif layers and scope == "microbatch":
                        loss = loss + microbatch_balance_term(recs, self._lb_coefs, self.top_k) / m
                    ce_sum += float(ce.detach())
                    self._note_loss(loss)
                    self.accelerator.backward(loss)
            if step_counts is not None:
                for i in layers:
                    replayed = self._reduce_sum(stats[i]["counts"])
                    if not torch.equal(replayed, step_counts[i]):
                        log.warning("step %d layer %d: routing of the pre-pass differs from the training pass "
                                    "(non-deterministic kernels?); the pre-pass counts were used", step, i)
        return self._finish_step(ce_sum / m, stats, n_step)

    def _train_step_per_sequence(self, batches: list[torch.Tensor]) -> dict[str, Any]:
        """lb_scope = "sequence": the balance loss of every sequence, averaged over the step's sequences.

        P per sequence needs per-token router probabilities with gradient; the layer only sums
        them over its whole input, so they are taken from the router's output via a forward
        hook, as the noise-free softmax (equal to the routed one once router noise is 0).
        """
        cfg, layers, m = self.cfg, self.layers, len(batches)
        n_seq_local = sum(b.shape[0] for b in batches)
        n_local = sum(b.numel() for b in batches)
        sums = StepRoutingSums(layers)
        stats = sums.by_layer
        ce_sum = 0.0
        logits_seen: dict[int, torch.Tensor] = {}
        hooks = [layer.router.register_forward_hook(_store_output(logits_seen, i)) for i, layer in layers.items()]
        for layer in layers.values():
            layer.capture = True
        try:
            for j, x in enumerate(batches):
                ctx = self.accelerator.no_sync(self.model) if j < m - 1 and self.world > 1 else contextlib.nullcontext()
                with ctx:
                    ce = self._forward(x)
                    b, t = x.shape
                    loss = ce / m
                    sums.add({i: layer.last_record for i, layer in layers.items()})
                    for i, layer in layers.items():
                        rec = layer.last_record
                        loss = loss + cfg.loss.z_coef * rec.z_loss * (rec.n_tokens / n_local)
                        if not self._lb_coefs[i]:
                            continue
                        lb_per_seq = sequence_balance_terms(logits_seen[i], rec.expert_index, b, t,
                                                            layer.n_experts, layer.top_k)
                        loss = loss + self._lb_coefs[i] * lb_per_seq.sum() / n_seq_local
                    ce_sum += float(ce.detach())
                    self._note_loss(loss)
                    self.accelerator.backward(loss)
        finally:
            for h in hooks:
                h.remove()
            for layer in layers.values():
                layer.capture = False
        return self._finish_step(ce_sum / m, stats, n_local * self.world)

    def _note_loss(self, loss: torch.Tensor) -> None:
        # Only noted here: every process still runs its backward (DDP's all-reduce needs all of them);
        # the decision to apply or drop the update is taken in _finish_step, on values all processes share.
        if not bool(torch.isfinite(loss.detach()).all()):
            self._local_nonfinite = True

    def _finish_step(self, ce_local: float, stats: dict, n_step: int) -> dict[str, Any]:
        """Clip, check every value is finite, then step optimizer and schedule; the logged values are
        over the whole step (all processes). A non-finite loss or gradient norm never reaches the
        weights: the update is dropped and training stops or (train.on_nonfinite = "skip") goes on."""
        cfg = self.cfg
        # the norm is needed for the finiteness check even without clipping (an infinite limit never clips)
        norm = float(self._clip_gradients(cfg.optim.grad_clip_norm if cfg.optim.grad_clip_norm is not None
                                          else math.inf))
        grad_norm = norm if cfg.optim.grad_clip_norm is not None else None
        lr = self.scheduler.get_last_lr()[0]
        ce = float(self._reduce_sum(torch.tensor(ce_local, device=self.accelerator.device))) / self.world
        out: dict[str, Any] = {"ce": ce, "lr": lr}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        step_counts: dict[int, torch.Tensor] = {}
        if self.layers:
            lb, z, max_frac = {}, {}, {}
            for i, s in stats.items():
                counts = self._reduce_sum(s["counts"].to(torch.float64))
                step_counts[i] = counts
                prob_sum = self._reduce_sum(s["prob_sum"].to(torch.float64))
                lb[str(i)] = float(load_balancing_loss(counts, prob_sum, n_step, self.top_k[i]))
                z[str(i)] = s["z"] / max(s["n"], 1)
                max_frac[str(i)] = float(counts.max() / counts.sum().clamp_min(1))
            out["lb"] = lb
            out["z"] = z
            out["max_fraction"] = max_frac
            out["loss"] = ce + sum(self._lb_coefs[int(i)] * v for i, v in lb.items()) + cfg.loss.z_coef * sum(z.values())
        else:
            out["loss"] = ce
        bad = [name for name, v in (("loss", out["loss"]), ("ce", ce), ("gradient norm", norm)) if not math.isfinite(v)]
        if self._local_nonfinite and "loss" not in bad:
            bad.insert(0, "loss")
        if self.world > 1:  # one decision for all processes, or they would leave the collectives out of step
            flag = self._reduce_sum(torch.tensor(float(bool(bad)), device=self.accelerator.device))
            if float(flag) > 0 and not bad:
                bad = ["loss on another process"]
        if bad:
            return self._drop_update(out, bad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for i, counts in step_counts.items():
            layer = self.layers[i]
            if cfg.loss.bias_update_rate > 0 and layer.balance_bias:
                # same reduced counts on every process, so every replica's bias stays equal
                update_balance_bias(layer.selection_bias, counts, cfg.loss.bias_update_rate)
        self.step += 1
        self.nonfinite_skips_in_a_row = 0
        return out

    def _drop_update(self, out: dict[str, Any], bad: list[str]) -> dict[str, Any]:
        """The step's values are not finite: no optimizer step, no balance-bias update. "stop" (or the
        max_nonfinite_skips_in_a_row-th skip in a row) raises NonFiniteLoss; "skip" advances the step
        and the learning-rate schedule (the batch is consumed: it would fail again) and goes on."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        what = f"{' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN/inf"
        step = self.step + 1
        if t.on_nonfinite == "stop":
            self._raise_non_finite(step, what)
        self.nonfinite_skips_in_a_row += 1
        self.nonfinite_skips_total += 1
        self.metrics.write({"kind": "event", "step": step, "event": "nonfinite_skip", "reason": what,
                            "in_a_row": self.nonfinite_skips_in_a_row, "total": self.nonfinite_skips_total,
                            **{k: _json_float(out[k]) for k in ("ce", "loss", "grad_norm") if k in out}})
        log.warning("%s: %s at step %d; update skipped (%d in a row, %d in total)", self.name, what, step,
                    self.nonfinite_skips_in_a_row, self.nonfinite_skips_total)
        if self.nonfinite_skips_in_a_row >= t.max_nonfinite_skips_in_a_row:
            self._raise_non_finite(step, what, f" ({self.nonfinite_skips_in_a_row} skipped updates in a row, "
                                               f"train.max_nonfinite_skips_in_a_row={t.max_nonfinite_skips_in_a_row})")
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": deliberate here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step = step
        return {**out, "skipped_update": True}

    def _clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm`; returns the norm before clipping.

        One process or DDP on any device (gradients already averaged, so every process sees the
        same norm): moescope's `clip_grad_norm`, which skips the no-op rescale. FSDP, DeepSpeed,
        XLA and Megatron-LM keep accelerate's own clipping (see _PLAIN_CLIP_SETUPS).
        """
        if self.accelerator.distributed_type in _PLAIN_CLIP_SETUPS:
            self.accelerator.unscale_gradients()
            return clip_grad_norm(self.model.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def _raise_non_finite(self, step: int, what: str, detail: str = "") -> None:
        # "last good" = verified now (manifest digests) and finite (save_checkpoint refuses anything else)
        last = last_verified_checkpoint(self.ckpt_dir, self.last_good_checkpoint) if self.write else None
        self.metrics.write({"kind": "event", "step": step, "event": "nonfinite_stop", "reason": what,
                            "checkpoint": str(last) if last is not None else None})
        raise NonFiniteLoss(
            f"{self.name}: {what} at step {step}{detail}; training stopped, nothing saved from it; last good "
            f"checkpoint: {last if last is not None else 'none (no checkpoint written yet)'}"
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """Loss / perplexity per domain (token- and domain-weighted) and routing metrics on the eval split."""
        return evaluate_model(self.raw_model, self.layers, self.store, self.cfg.train, self.accelerator)

    def _check_collapse(self, ev: dict[str, Any]) -> list[str]:
        """Update the per-layer streaks of max share > threshold; returns layers collapsed now,
        recording (and warning about) each layer whose streak reaches the window this evaluation."""
        c = self.cfg.collapse
        collapsed, new = update_collapse_streaks(self.collapse_streak, ev["routing"], c.threshold_share, c.window_evals)
        for layer in new:
            r = ev["routing"][layer]
            event = {"kind": "collapse", "step": self.step, "layer": int(layer),
                     "expert": r["argmax_expert"], "share": r["max_fraction"],
                     "window_evals": c.window_evals, "threshold_share": c.threshold_share,
                     "early_stop": c.early_stop}
            self.collapse_events.append(event)
            self.metrics.write(event)
            log.warning("%s: layer %s collapsed at step %d: expert %d holds %.0f%% of tokens for %d evals",
                        self.name, layer, self.step, r["argmax_expert"], 100 * r["max_fraction"],
                        self.collapse_streak[layer])
        return collapsed

    # ------------------------------------------------------------------ checkpoints and the loop

    def save_checkpoint(self) -> Path | None:
        if not (self.write and self.accelerator.is_main_process):
            return None
        try:
            path = save_checkpoint(
                self.ckpt_dir, self.step, self.raw_model, self.optimizer.optimizer
                if hasattr(self.optimizer, "optimizer") else self.optimizer, self.scheduler,
                {"config": to_dict(self.cfg), "data_position_sequences": self.order.sequences_consumed(self.step),
                 "data_manifest_sha256": self.manifest_sha, "collapse_streak": self.collapse_streak,
                 "collapse_events": self.collapse_events, "name": self.name,
                 "nonfinite_skips_in_a_row": self.nonfinite_skips_in_a_row,
                 "nonfinite_skips_total": self.nonfinite_skips_total,
                 "train_seconds": self.train_seconds, "timed_steps": self.timed_steps},
                keep=self.cfg.train.keep_checkpoints,
            )
        except NonFiniteState as exc:  # e.g. an update so large that finite gradients made infinite weights
            self._raise_non_finite(self.step, f"the state to checkpoint is NaN/inf ({exc})")
        self.last_good_checkpoint = path
        return path

    def _recorded_eval(self, step: int) -> dict[str, Any] | None:
        if not self.metrics.enabled:
            return None
        found = [r for r in read_metrics(self.metrics.path, "eval") if r.get("step") == step]
        return found[-1] if found else None

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _eval_and_record(self, tokens_per_s: float | None) -> dict[str, Any]:
        ev = self.evaluate()
        bad = sorted(d for d, v in ev.get("domains", {}).items() if not math.isfinite(v["loss"]))
        if bad or not all(math.isfinite(v) for v in ev.get("loss", {}).values()):
            # nothing non-finite is recorded as an evaluation, snapshotted or checkpointed
            self._raise_non_finite(self.step, f"evaluation loss is NaN/inf (domains: {', '.join(bad) or 'all'})")
        # A fresh (or freshly upcycled) router can favour one expert before any training; collapse is
        # a training dynamic, so the step-0 evaluation is recorded but not counted toward the window.
        collapsed = self._check_collapse(ev) if self.layers and self.step > 0 else []
        record = {"kind": "eval", "step": self.step, "tokens_seen": self.step * self.tokens_per_step, **ev,
                  "collapsed_layers": [int(x) for x in collapsed], **peak_memory_mb(self._peak_window)}
        if tokens_per_s is not None:
            record["tokens_per_s"] = tokens_per_s
        self.metrics.write(record)
        if self.write and self.accelerator.is_main_process and self.cfg.train.snapshot_at_eval:
            save_moe_model(self.raw_model, self.out_dir / "snapshots" / f"step_{self.step:06d}")
        if collapsed and self.cfg.collapse.early_stop:
            self.request_stop(f"collapse in layers {collapsed}")
        return record

    def fit(self) -> dict[str, Any]:
        """Train to cfg.train.steps (or an early stop), evaluating, checkpointing, saving the final model."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self._peak_window = reset_peak_memory()
        try:
            if self.step == 0:
                self._eval_and_record(None)
            bar = tqdm(total=t.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                       disable=not (self.cfg.tracking.progress_bar and self.accelerator.is_main_process))
            window_time, window_steps = 0.0, 0
            # resumed from the final checkpoint (killed before the summary): its evaluation is on record
            last_eval = self._recorded_eval(self.step) if self._resumed_at is not None else None
            while self.step < t.steps and self._stop_reason is None:
                t0 = time.perf_counter()
                out = self.train_step()
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                self.timed_steps += 1
                window_time += dt
                window_steps += 1
                tps = self.tokens_per_step / dt
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}")
                if out.get("skipped_update"):
                    pass  # recorded as a nonfinite_skip event; a train record would hold NaN
                elif self.step % t.log_every_steps == 0 or self.step == t.steps:
                    self.metrics.write({"kind": "train", "step": self.step,
                                        "tokens_seen": self.step * self.tokens_per_step, **out,
                                        "tokens_per_s": tps})
                if self.step % t.eval_every_steps == 0 or self.step == t.steps:
                    # training throughput since the previous eval (train steps only, no eval or saving)
                    last_eval = self._eval_and_record(self.tokens_per_step * window_steps / max(window_time, 1e-9))
                    window_time, window_steps = 0.0, 0
                if self.on_step is not None:
                    self.on_step(self.step, self)
                if self._stop_signal is not None:
                    path = self.save_checkpoint()
                    name = signal.Signals(self._stop_signal).name
                    self.metrics.write({"kind": "event", "step": self.step, "event": "interrupted", "signal": name,
                                        "checkpoint": str(path)})
                    raise TrainingInterrupted(
                        f"{self.name}: {name} at step {self.step}; checkpoint saved to {path}; continue with --resume"
                    )
                if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0 and self.step < t.steps:
                    self.save_checkpoint()
            bar.close()
            if self._stop_reason is not None:
                self.metrics.write({"kind": "event", "step": self.step, "event": "early_stop",
                                    "reason": self._stop_reason})
            if last_eval is None or last_eval["step"] != self.step:
                last_eval = self._eval_and_record(None)
            if self._resumed_at != self.step:  # else the checkpoint it resumed from holds this very state
                self.save_checkpoint()
            summary = {
                "name": self.name, "arch": self.cfg.arch, "init": self.init, "steps": self.step,
                "tokens_seen": self.step * self.tokens_per_step,
                "stopped_early": self._stop_reason, "final_eval": {k: last_eval[k] for k in
                                                                   ("loss", "ppl", "domains", "routing")},
                "collapse_events": self.collapse_events,
                "train_tokens_per_s": (self.tokens_per_step * self.timed_steps / self.train_seconds
                                       if self.train_seconds else None),
                "nonfinite_skips": self.nonfinite_skips_total,
                **peak_memory_mb(self._peak_window),
            }
            if self.write and self.accelerator.is_main_process:
                tokenizer = tokenizer_dir(self.store.root)  # the data's tokenizer travels with the model
                save_moe_model(self.raw_model, self.out_dir / "final", tokenizer=tokenizer if tokenizer.is_dir() else None)
                atomic_write_json(self.out_dir / SUMMARY_NAME, summary)
            self.accelerator.wait_for_everyone()
            return summary
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            self.metrics.close()


def process_state():
    """accelerate's view of this process (rank, world); one CPU process unless launched distributed."""
    from accelerate import PartialState

    # cpu=True lets accelerate see a CPU launch (torchrun / mpirun) as MULTI_CPU with gloo.
    return PartialState(cpu=not torch.cuda.is_available())


def train_run(cfg: RunConfig, out_dir: Path, *, init: str | Path | None = None, name: str = "run",
              resume: bool = False, on_step=None) -> dict[str, Any]:
    """Train one run into `out_dir`; with `resume`, continue from its latest intact checkpoint (or
    return the stored summary if it already finished). The main process holds `out_dir`'s lock
    throughout: a second process on the same directory is refused, naming the holder."""
    out_dir = Path(out_dir)
    lock = run_directory_lock(out_dir) if process_state().is_main_process else contextlib.nullcontext()
    with lock:
        if resume and (out_dir / SUMMARY_NAME).is_file() and (out_dir / "final").is_dir():
            check_same_config(cfg, read_stored_config(out_dir / CONFIG_NAME), str(out_dir / CONFIG_NAME))
            return json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
        return Trainer(cfg, out_dir, init=init, name=name, resume=resume, on_step=on_step).fit()


# ---------------------------------------------------------------------- small helpers


def _json_float(x: float | None) -> float | str | None:
    """Non-finite floats as strings: strict JSON readers (browsers) reject NaN/Infinity tokens."""
    return x if x is None or math.isfinite(x) else str(x)


def _store_output(store: dict, key: int):
    def hook(module, inputs, output) -> None:  # noqa: ARG001
        store[key] = output

    return hook


__all__ = ["Trainer", "train_run", "NonFiniteLoss", "TrainingInterrupted", "open_store"]
