"""Building one training stage's parts before its loop runs: data, run directory, model, optimizer,
the data order and the step's passes.

A fresh stage seeds the RNGs and builds its starting model (train/model.py); a resumed one takes
the newest intact checkpoint (train/rundir.py) with its optimizer and scheduler state. Either way
the model is checked against the data, and model and optimizer go through accelerate. The RNG
streams of a checkpoint are restored last, once nothing else here draws from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moescope.data.blocks import BlockStore
from moescope.errors import MoescopeError
from moescope.io.provenance import sha256_file
from moescope.moe.model import moe_layers, router_parameters
from moescope.train.accelerator import make_accelerator
from moescope.train.checkpoint import restore_rng_state
from moescope.train.config import RunConfig
from moescope.train.model import check_model_matches_data, initial_model, open_store
from moescope.train.optim import build_optimizer, build_scheduler
from moescope.train.order import TrainOrder
from moescope.train.rundir import StageDirectory
from moescope.train.step import StepRunner


@dataclass
class StageParts:
    store: BlockStore
    manifest_sha: str
    rundir: StageDirectory
    accelerator: Any
    model: torch.nn.Module  # as prepared by accelerate (a DDP wrapper when distributed)
    raw_model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    layers: dict
    order: TrainOrder  # each step's sequences
    passes: StepRunner  # the forward and backward passes of one step
    init: str  # where the weights came from: a path, or "scratch"
    checkpoint: Path | None  # the checkpoint resumed from
    state: dict[str, Any] | None  # its trainer state (step, counters, RNG)


def build_stage(cfg: RunConfig, out_dir: Path, name: str, *, init: str | Path | None, resume: bool,
                accelerator=None, write: bool = True) -> StageParts:
    store = open_store(cfg.data_dir)
    manifest_sha = sha256_file(store.root / "manifest.json")
    rundir = StageDirectory(out_dir, name, cfg, manifest_sha, store.root / "manifest.json", write=write)
    found = rundir.find_resume(resume)
    ckpt, state = (found[0], found[2]) if found is not None else (None, None)
    if found is None:
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)
    model = found[1] if found is not None else initial_model(cfg, store, init)
    check_model_matches_data(model, store, where=f"{name}")
    model.config.use_cache = False
    layers = moe_layers(model)
    if cfg.arch == "dense" and layers:
        raise MoescopeError(f"{name}: arch is dense but the starting model {init} has MoE layers")
    loss, t = cfg.loss, cfg.train
    lb_coefs = {i: float(loss.load_balance_coef_by_layer.get(str(i), loss.load_balance_coef)) for i in layers}
    if t.cpu_threads is not None:
        torch.set_num_threads(t.cpu_threads)
    acc = accelerator or make_accelerator(cfg)
    if t.batch_sequences % (t.grad_accum_steps * acc.num_processes):
        raise MoescopeError(f"train.batch_sequences={t.batch_sequences} must be divisible by grad_accum_steps x "
                            f"processes = {t.grad_accum_steps} x {acc.num_processes}")
    model.to(acc.device)
    optimizer = build_optimizer(model, cfg.optim, router_parameters(model))
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MoescopeError(f"checkpoint {ckpt}: optimizer/scheduler state does not fit this model "
                                f"({type(exc).__name__}: {exc})") from None
    prepared, optimizer = acc.prepare(model, optimizer)
    order = TrainOrder(store.index("train"), t.seed, t.batch_sequences)
    passes = StepRunner(prepared, acc, layers, loss, lb_coefs)
    if state is not None:
        restore_rng_state(state["rng"])
    return StageParts(store, manifest_sha, rundir, acc, prepared, acc.unwrap_model(prepared), optimizer, scheduler,
                      layers, order, passes, str(init) if init is not None else "scratch", ckpt, state)
