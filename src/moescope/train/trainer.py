"""One training stage (the base stage or one arm): the loop that composes the parts.

The parts, each in its own module: the passes of one step and its balance accounting
(train/step.py, train/step_loss.py), the evaluator (train/evaluator.py), the run directory and
its checkpoints (train/rundir.py, train/checkpoint.py), the non-finite policy
(train/nonfinite.py), the accelerate set-up (train/accelerator.py) and per-stage peak memory
(runtime.py). Each step's batch is fixed by (seed, step) and split into micro-batches and
per-process shards (moescope.train.order), so the data order is the same for every arm and any
number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import logging

import torch

from moescope.data.blocks import BlockStore, tokenizer_dir
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_json
from moescope.io.config import to_dict
from moescope.io.lock import run_directory_lock
from moescope.io.provenance import sha256_file
from moescope.moe.hf_model import save_moe_model
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers, router_parameters, set_training_progress
from moescope.moe.layer import update_balance_bias
from moescope.runtime import peak_memory_mb, reset_peak_memory
from moescope.train.accelerator import clip_gradients, make_accelerator, process_state
from moescope.train.checkpoint import NonFiniteState, restore_rng_state
from moescope.train.config import RunConfig
from moescope.train.evaluator import evaluate_model, update_collapse_streaks
from moescope.train.metrics_log import MetricsLog, read_metrics
from moescope.train.model import build_scratch_model, check_model_matches_data, load_init_model
from moescope.train.nonfinite import NonFiniteGuard, NonFiniteLoss
from moescope.train.optim import build_optimizer, build_scheduler
from moescope.train.order import TrainOrder
from moescope.train.rundir import (
    CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, StageDirectory, check_same_config, read_stored_config,
)
from moescope.train.step import StepRunner
from moescope.train.step_loss import step_routing_metrics, step_total_loss

log = logging.getLogger(__name__)


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
        self.cfg, self.out_dir, self.name, self.on_step, self.write = cfg, Path(out_dir), name, on_step, write
        self.store = open_store(cfg.data_dir)
        self.manifest_sha = sha256_file(self.store.root / "manifest.json")
        self.rundir = StageDirectory(self.out_dir, name, cfg, self.manifest_sha, self.store.root / "manifest.json",
                                     write=write)
        self.step = 0
        self.collapse_streak: dict[str, int] = {}
        self.collapse_events: list[dict[str, Any]] = []
        self._stop_signal: int | None = None
        self._stop_reason: str | None = None
        self._peak_window = False  # True once fit() has reset the peak-memory window for this stage
        self.train_seconds = 0.0  # training time of the steps so far, over every resume (for tokens/s)
        self.timed_steps = 0
        self._resumed_at: int | None = None

        found = self.rundir.find_resume(resume)
        ckpt, state = (found[0], found[2]) if found is not None else (None, None)
        if found is not None:
            model = found[1]
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
        loss = cfg.loss
        self._lb_coefs = {i: float(loss.load_balance_coef_by_layer.get(str(i), loss.load_balance_coef)) for i in self.layers}

        if cfg.train.cpu_threads is not None:
            torch.set_num_threads(cfg.train.cpu_threads)
        self.accelerator = acc = accelerator or make_accelerator(cfg)
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
        self.passes = StepRunner(self.model, acc, self.layers, cfg.loss, self._lb_coefs)
        skips = self._restore_state(state) if state is not None else (0, 0)
        acc.wait_for_everyone()  # every process has checked the directory before the main one writes
        self.metrics = MetricsLog(
            self.out_dir / METRICS_NAME,
            tensorboard_dir=self.out_dir / "tensorboard" if cfg.tracking.tensorboard else None,
            wandb_dir=self.out_dir if cfg.tracking.wandb else None,
            wandb_name=name,
            config=to_dict(cfg),
            enabled=write and acc.is_main_process,
        )
        self.guard = NonFiniteGuard(name, t, self.metrics, self.rundir.last_verified, *skips)
        if write and acc.is_main_process:
            self.rundir.open(self.metrics, resume=resume, resumed_from=ckpt, step=self.step,
                             record={"init": self.init, "moe_layers": sorted(self.layers), "world_size": self.world})

    # ------------------------------------------------------------------ state

    def _initial_model(self, init: str | Path | None):
        cfg = self.cfg
        model = build_scratch_model(cfg.model, self.store, cfg.train.seed) if init is None else load_init_model(init)
        if cfg.arch == "moe" and not moe_layers(model):
            install_moe(model, cfg.moe, seed=cfg.train.seed)
        model.train()
        return model

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds beside model, optimizer, scheduler and RNG (see _restore_state)."""
        return {"data_position_sequences": self.order.sequences_consumed(self.step),
                "data_manifest_sha256": self.manifest_sha, "collapse_streak": self.collapse_streak,
                "collapse_events": self.collapse_events, "name": self.name,
                "nonfinite_skips_in_a_row": self.guard.in_a_row, "nonfinite_skips_total": self.guard.total,
                "train_seconds": self.train_seconds, "timed_steps": self.timed_steps}

    def _restore_state(self, state: dict[str, Any]) -> tuple[int, int]:
        """Continue from a checkpoint's state; returns its non-finite skip counts (in a row, total)."""
        self.step = int(state["step"])
        self.collapse_streak = dict(state.get("collapse_streak", {}))
        self.collapse_events = list(state.get("collapse_events", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))
        self._resumed_at = self.step
        restore_rng_state(state["rng"])
        return int(state.get("nonfinite_skips_in_a_row", 0)), int(state.get("nonfinite_skips_total", 0))

    @property
    def nonfinite_skips_in_a_row(self) -> int:
        return self.guard.in_a_row

    @property
    def nonfinite_skips_total(self) -> int:
        return self.guard.total

    def save_checkpoint(self) -> Path | None:
        if not (self.write and self.accelerator.is_main_process):
            return None
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        try:
            return self.rundir.save(self.step, self.raw_model, optimizer, self.scheduler, self._trainer_state())
        except NonFiniteState as exc:  # e.g. an update so large that finite gradients made infinite weights
            self.guard.stop(self.step, f"the state to checkpoint is NaN/inf ({exc})")

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

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (all micro-batches); returns the logged scalars."""
        self.model.train()
        set_training_progress(self.raw_model, self.step / self.cfg.train.steps)
        passes = self.passes.run(self._micro_batches(self.step), lambda x: self._forward(x), self.step)
        self._local_nonfinite = passes.nonfinite
        return self._finish_step(passes.ce_local, passes.stats, passes.n_step)

    def _finish_step(self, ce_local: float, stats: dict, n_step: int) -> dict[str, Any]:
        """Clip, check every value is finite, then step optimizer and schedule; the logged values are
        over the whole step (all processes). A non-finite loss or gradient norm never reaches the
        weights: the update is dropped and training stops or (train.on_nonfinite = "skip") goes on."""
        cfg, reduce_sum = self.cfg, self.passes.reduce_sum
        # the norm is needed for the finiteness check even without clipping (an infinite limit never clips)
        clip = cfg.optim.grad_clip_norm
        norm = float(clip_gradients(self.accelerator, self.model, clip if clip is not None else math.inf))
        ce = float(reduce_sum(torch.tensor(ce_local, device=self.accelerator.device))) / self.world
        out: dict[str, Any] = {"ce": ce, "learning_rate": self.scheduler.get_last_lr()[0]}
        if clip is not None:
            out["grad_norm"] = norm
        reduced = {i: (reduce_sum(s["counts"].to(torch.float64)), reduce_sum(s["prob_sum"].to(torch.float64)))
                   for i, s in stats.items()} if self.layers else {}
        routing = step_routing_metrics(reduced, stats, n_step, self.passes.top_k) if self.layers else {}
        out.update(routing)
        out["loss"] = step_total_loss(ce, routing, self._lb_coefs, cfg.loss.z_loss_coef)
        bad = [name for name, v in (("loss", out["loss"]), ("ce", ce), ("gradient norm", norm)) if not math.isfinite(v)]
        if self._local_nonfinite and "loss" not in bad:
            bad.insert(0, "loss")
        if self.world > 1:  # one decision for all processes, or they would leave the collectives out of step
            flag = reduce_sum(torch.tensor(float(bool(bad)), device=self.accelerator.device))
            if float(flag) > 0 and not bad:
                bad = ["loss on another process"]
        if bad:
            return self._drop_update(out, bad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for i, (counts, _) in reduced.items():
            layer = self.layers[i]
            if cfg.loss.bias_update_rate > 0 and layer.balance_bias:
                # same reduced counts on every process, so every replica's bias stays equal
                update_balance_bias(layer.selection_bias, counts, cfg.loss.bias_update_rate)
        self.step += 1
        self.guard.in_a_row = 0
        return out

    def _drop_update(self, out: dict[str, Any], bad: list[str]) -> dict[str, Any]:
        """No optimizer step, no balance-bias update; under "skip" the step and the learning-rate
        schedule still advance (the batch is consumed: it would fail again)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.skip_or_stop(self.step + 1, out, bad)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": deliberate here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        return {**out, "skipped_update": True}

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

    def _eval_and_record(self, tokens_per_s: float | None) -> dict[str, Any]:
        ev = self.evaluate()
        bad = sorted(d for d, v in ev.get("domains", {}).items() if not math.isfinite(v["loss"]))
        if bad or not all(math.isfinite(v) for v in ev.get("loss", {}).values()):
            # nothing non-finite is recorded as an evaluation, snapshotted or checkpointed
            self.guard.stop(self.step, f"evaluation loss is NaN/inf (domains: {', '.join(bad) or 'all'})")
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

    def _recorded_eval(self, step: int) -> dict[str, Any] | None:
        if not self.metrics.enabled:
            return None
        found = [r for r in read_metrics(self.metrics.path, "eval") if r.get("step") == step]
        return found[-1] if found else None

    # ------------------------------------------------------------------ the loop

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

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
                "nonfinite_skips": self.guard.total,
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



__all__ = ["Trainer", "train_run", "NonFiniteLoss", "TrainingInterrupted", "open_store", "make_accelerator",
           "process_state"]
