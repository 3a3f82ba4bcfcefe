"""One training stage (the base stage or one arm): the loop that composes the parts.

The parts (DEVELOPERS.md lists them): the stage's build (train/stage.py), the passes of one step
(train/step.py), the evaluator and collapse watch (train/evaluator.py), the run directory
(train/rundir.py), the non-finite policy (train/nonfinite.py), the metrics log and step clock
(train/metrics_log.py). Each step's batch is fixed by (seed, step) and split into micro-batches and
per-process shards (train/order.py): the data order is the same for every arm and any world size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from moescope.data.blocks import tokenizer_dir
from moescope.errors import MoescopeError, first_line
from moescope.io.lock import run_directory_lock
from moescope.moe.model import set_training_progress
from moescope.moe.native import native_status
from moescope.runtime import StopSignal, catch_stop_signals, peak_memory_mb, reset_peak_memory
from moescope.train.accelerator import clip_gradients, process_state
from moescope.train.checkpoint import NonFiniteState
from moescope.train.config import RunConfig
from moescope.train.evaluator import CollapseWatch, evaluate_model, nonfinite_eval
from moescope.train.metrics_log import MetricsLog, StepClock, eval_record
from moescope.train.nonfinite import NonFiniteGuard, NonFiniteLoss
from moescope.train.rundir import finished_summary
from moescope.train.stage import build_stage
from moescope.train.step import StepPasses, step_schedule_only

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: a checkpoint was saved, then training stopped."""


def stop_if_signalled(stop: StopSignal, before: str) -> None:
    """Between stages: a stop signal caught since the last check ends the run here, before `before`
    starts (everything before it is complete on disk)."""
    if stop.signum is not None:
        raise TrainingInterrupted(f"{stop.name} before {before}; continue with --resume")


class Trainer:
    """Build (or restore) a run, then `fit()`. `train_step()` is public for the benchmark."""

    def __init__(self, cfg: RunConfig, out_dir: Path, *, init: str | Path | None = None, name: str = "run",
                 resume: bool = False, accelerator=None, on_step: Callable[[int, "Trainer"], None] | None = None,
                 write: bool = True) -> None:
        self.cfg, self.out_dir, self.name, self.on_step, self.write = cfg, Path(out_dir), name, on_step, write
        parts = build_stage(cfg, self.out_dir, name, init=init, resume=resume, accelerator=accelerator, write=write)
        self.store, self.manifest_sha, self.rundir, self.init = parts.store, parts.manifest_sha, parts.rundir, parts.init
        self.accelerator, self.model, self.raw_model = parts.accelerator, parts.model, parts.raw_model
        self.optimizer, self.scheduler, self.layers = parts.optimizer, parts.scheduler, parts.layers
        self.order, self.passes, self.world = parts.order, parts.passes, self.accelerator.num_processes
        self.tokens_per_step = cfg.train.batch_sequences * self.store.block_size
        self._resumed_at = int(parts.state["step"]) if parts.state is not None else None
        self.step, self._stop_reason = self._resumed_at or 0, None
        self._peak_window = False  # True once fit() has reset the peak-memory window for this stage
        self.accelerator.wait_for_everyone()  # every process has checked the directory before the main one writes
        self.metrics = MetricsLog.for_stage(self.out_dir, cfg, name, enabled=write and self.accelerator.is_main_process)
        self.collapse, self.clock = CollapseWatch(cfg.collapse), StepClock(self.tokens_per_step)
        self.guard = NonFiniteGuard(name, cfg.train, self.metrics, self.rundir.last_verified)
        for part in (self.collapse, self.clock, self.guard):  # a resumed stage continues its streaks and counters
            part.load_state_dict(parts.state or {})
        if write and self.accelerator.is_main_process:
            self.rundir.open(self.metrics, resume=resume, resumed_from=parts.checkpoint, step=self.step,
                             record={"init": self.init, "moe_layers": sorted(self.layers), "world_size": self.world})

    def save_checkpoint(self) -> Path | None:
        if not (self.write and self.accelerator.is_main_process):
            return None
        state = {"data_position_sequences": self.order.sequences_consumed(self.step),
                 "data_manifest_sha256": self.manifest_sha, **self.collapse.state_dict(), "name": self.name,
                 **self.guard.state_dict(), **self.clock.state_dict()}
        try:
            return self.rundir.save(self.step, self.raw_model, self.optimizer, self.scheduler, state)
        except NonFiniteState as exc:  # e.g. an update so large that finite gradients made infinite weights
            self.guard.stop(self.step, f"the state to checkpoint is NaN/inf ({exc})")
        except (OSError, SafetensorError) as exc:  # a full disk, a quota, a vanished directory
            raise self._write_error("the checkpoint", exc) from exc

    def _write_error(self, what: str, exc: BaseException) -> MoescopeError:
        """One line for a write that failed (a full disk, a quota): what, why, and where --resume continues."""
        last = self.rundir.last_verified()
        return MoescopeError(f"{self.name}: {what} at step {self.step} could not be written in "
                             f"{self.rundir.out_dir} ({first_line(exc)}); "
                             f"--resume continues from {last if last is not None else 'the start'}")

    # ------------------------------------------------------------------ one optimizer step

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        acc, m = self.accelerator, self.cfg.train.grad_accum_steps
        return [torch.from_numpy(self.store.gather("train", self.order.rows(step, j, m, acc.process_index, self.world)))
                .to(acc.device) for j in range(m)]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.model(input_ids=x, labels=x).loss.float()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (all micro-batches); returns the logged scalars."""
        self.model.train()
        set_training_progress(self.raw_model, self.step / self.cfg.train.steps)
        return self._finish_step(self.passes.run(self._micro_batches(self.step), self._forward, self.step))

    def _finish_step(self, result: StepPasses) -> dict[str, Any]:
        """Clip, check the loss and gradient norm are finite, then step optimizer and schedule; the
        logged values are over the whole step (all processes). A non-finite loss or gradient norm never
        reaches the weights: the update is dropped and training stops or (on_nonfinite = "skip") goes on."""
        clip = self.cfg.optim.grad_clip_norm
        # the norm is needed for the finiteness check even without clipping (an infinite limit never clips)
        norm = float(clip_gradients(self.accelerator, self.model, clip if clip is not None else math.inf))
        out, totals, bad = self.passes.outcome(result, self.scheduler.get_last_lr()[0], norm, clip is not None)
        if bad:  # no optimizer step, no balance-bias update; under "skip" the step and schedule still
            self.optimizer.zero_grad(set_to_none=True)  # advance (the batch is consumed: it would fail again)
            self.guard.skip_or_stop(self.step + 1, out, bad)
            step_schedule_only(self.scheduler)
            self.step += 1
            return {**out, "skipped_update": True}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.passes.update_balance_bias(totals)
        self.step += 1
        self.guard.in_a_row = 0
        return out

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """Loss / perplexity per domain (token- and domain-weighted) and routing metrics on the eval split."""
        return evaluate_model(self.raw_model, self.layers, self.store, self.cfg.train, self.accelerator)

    def _eval_and_record(self, tokens_per_s: float | None) -> dict[str, Any]:
        ev = self.evaluate()
        problem = nonfinite_eval(ev)
        if problem is not None:
            self.guard.stop(self.step, problem)
        # A fresh (or freshly upcycled) router can favour one expert before any training; collapse is
        # a training dynamic, so the step-0 evaluation is recorded but not counted toward the window.
        collapsed, events = self.collapse.observe(self.step, ev["routing"]) if self.layers and self.step > 0 else ([], [])
        for event in events:
            self.metrics.write(event)
            log.warning("%s: layer %s collapsed at step %d: expert %d holds %.0f%% of tokens for %d evals", self.name,
                        event["layer"], self.step, event["expert"], 100 * event["share"], event["window_evals"])
        record = eval_record(self.step, self.step * self.tokens_per_step, ev, collapsed,
                             peak_memory_mb(self._peak_window), tokens_per_s)
        self.metrics.write(record)
        if self.write and self.accelerator.is_main_process and self.cfg.train.snapshot_at_eval:
            try:
                self.rundir.save_snapshot(self.step, self.raw_model)
            except (OSError, SafetensorError) as exc:
                raise self._write_error("the snapshot", exc) from exc
        if collapsed and self.cfg.collapse.early_stop:
            self.request_stop(f"collapse in layers {collapsed}")
        return record

    # ------------------------------------------------------------------ the loop

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _interrupted(self, stop: StopSignal, saved: Path | None, what: str) -> TrainingInterrupted:
        """Record the stop signal; the exception that ends the run, saying what was saved where."""
        self.metrics.event(self.step, "interrupted", signal=stop.name, checkpoint=str(saved))
        return TrainingInterrupted(f"{self.name}: {stop.name} at step {self.step}; {what} saved to {saved}; "
                                   f"continue with --resume")

    def fit(self) -> dict[str, Any]:
        """Train to cfg.train.steps (or an early stop), evaluating, checkpointing, saving the final model."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        with catch_stop_signals() as stop_signal, contextlib.closing(self.metrics):
            self._peak_window = reset_peak_memory()
            if self.step == 0:
                self._eval_and_record(None)
            bar = tqdm(total=t.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                       disable=not (self.cfg.tracking.progress_bar and self.accelerator.is_main_process))
            # resumed from the final checkpoint (killed before the summary): its evaluation is on record
            last_eval = self.metrics.recorded("eval", self.step) if self._resumed_at is not None else None
            while self.step < t.steps and self._stop_reason is None:
                t0 = time.perf_counter()
                out = self.train_step()
                tps = self.clock.add(time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}")
                if out.get("skipped_update"):
                    pass  # recorded as a nonfinite_skip event; a train record would hold NaN
                elif self.step % t.log_every_steps == 0 or self.step == t.steps:
                    self.metrics.write({"kind": "train", "step": self.step,
                                        "tokens_seen": self.step * self.tokens_per_step, **out, "tokens_per_s": tps})
                if self.step % t.eval_every_steps == 0 or self.step == t.steps:
                    # training throughput since the previous eval (train steps only, no eval or saving)
                    last_eval = self._eval_and_record(self.clock.window_tokens_per_s())
                if self.on_step is not None:
                    self.on_step(self.step, self)
                if stop_signal.signum is not None:
                    raise self._interrupted(stop_signal, self.save_checkpoint(), "checkpoint")
                if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0 and self.step < t.steps:
                    self.save_checkpoint()
            bar.close()
            if self._stop_reason is not None:
                self.metrics.event(self.step, "early_stop", reason=self._stop_reason)
            if last_eval is None or last_eval["step"] != self.step:
                last_eval = self._eval_and_record(None)
            if self._resumed_at != self.step:  # else the checkpoint it resumed from holds this very state
                self.save_checkpoint()
            summary = {"name": self.name, "arch": self.cfg.arch, "init": self.init, "steps": self.step,
                       "tokens_seen": self.step * self.tokens_per_step, "stopped_early": self._stop_reason,
                       "final_eval": {k: last_eval[k] for k in ("loss", "ppl", "domains", "routing")},
                       "collapse_events": self.collapse.events, "train_tokens_per_s": self.clock.tokens_per_s(),
                       "nonfinite_skips": self.guard.total, **peak_memory_mb(self._peak_window),
                       # environment.json is written before any step: whether the compiled experts kernel ran is known here
                       "native_grouped_kernel": native_status()}
            if self.write and self.accelerator.is_main_process:  # final/ with the data's tokenizer, then summary.json
                try:
                    self.rundir.finish(self.raw_model, summary, tokenizer_dir(self.store.root))
                except (OSError, SafetensorError) as exc:
                    raise self._write_error("the final model", exc) from exc
            self.accelerator.wait_for_everyone()
            if stop_signal.signum is not None:  # arrived during the final evaluation, checkpoint or finish,
                # each of which completed: the stage is finished and no later stage may start
                final = self.out_dir / "final" if self.write and self.accelerator.is_main_process else None
                raise self._interrupted(stop_signal, final, "the finished stage's final model")
            return summary


def train_run(cfg: RunConfig, out_dir: Path, *, init: str | Path | None = None, name: str = "run",
              resume: bool = False, on_step=None) -> dict[str, Any]:
    """Train one run into `out_dir`; with `resume`, continue from its latest intact checkpoint (or
    return the stored summary if it already finished). The main process holds `out_dir`'s lock
    throughout: a second process on the same directory is refused, naming the holder."""
    out_dir = Path(out_dir)
    lock = run_directory_lock(out_dir) if process_state().is_main_process else contextlib.nullcontext()
    with lock:
        if resume and (done := finished_summary(cfg, out_dir)) is not None:
            return done
        return Trainer(cfg, out_dir, init=init, name=name, resume=resume, on_step=on_step).fit()


__all__ = ["Trainer", "train_run", "NonFiniteLoss", "TrainingInterrupted", "stop_if_signalled"]
