"""An experiment: the base stage (or pretrained weights), then every arm from the same start.

Run directory::

    RUN/experiment.json      resolved experiment config, each arm's diff and resolved RunConfig
    RUN/environment.json     python/platform/library versions, seeds, start time, command
    RUN/data_manifest.json   copy of DATA/manifest.json (+ its sha256 in experiment.json)
    RUN/base/                the dense base stage (only with base.init = "scratch"), stage layout
    RUN/arms/NAME/           one stage per arm (config.json, metrics.jsonl, checkpoints/,
                             snapshots/, final/, summary.json)
    RUN/summary.json         per-arm summary (final losses, routing, tokens/s), written at the end
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_bytes, atomic_write_json
from moescope.io.jsonfile import read_json_object
from moescope.io.config import to_dict
from moescope.io.lock import is_empty_ignoring_lock, run_directory_lock
from moescope.io.provenance import environment_info, sha256_file
from moescope.runtime import catch_stop_signals
from moescope.train.config import (
    ExperimentConfig, arm_diff, base_run_config, comparable_config, resolve_arms,
)
from moescope.train.accelerator import process_state
from moescope.train.model import check_model_matches_data, load_init_model, open_store
from moescope.train.rundir import dict_diff
from moescope.train.trainer import stop_if_signalled, train_run

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "experiment.json"


def run_experiment(
    cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, arms: list[str] | None = None,
    on_step=None,
) -> dict[str, dict[str, Any]]:
    """Train the base stage (if any) and the arms into `run_dir`; returns {arm: summary}.

    Everything is validated before anything is written: a bad config, a missing or
    mismatched data directory, or an existing run directory without `resume` raise
    MoescopeError and leave the disk untouched.
    """
    run_dir = Path(run_dir)
    names = list(arms) if arms is not None else list(cfg.arms)
    runs = resolve_arms(cfg, names)
    store = open_store(cfg.data_dir)
    base_cfg = base_run_config(cfg) if cfg.base.init == "scratch" else None
    record = {
        "experiment": to_dict(cfg),
        "arms": {n: {"diff": arm_diff(cfg, n), "config": to_dict(r)} for n, r in runs.items()},
        "base": to_dict(base_cfg) if base_cfg is not None else {"init": cfg.base.init},
        "data_manifest_sha256": sha256_file(store.root / "manifest.json"),
    }
    # whether RUN may be written (and, resumed, is this experiment) is known from its JSON: asked before
    # pretrained weights are loaded, and again under the lock below
    _check_run_directory(run_dir, resume, record)
    if base_cfg is not None:
        if store.block_size > cfg.model.context_tokens:
            raise MoescopeError(
                f"{store.root}: block size {store.block_size} tokens is longer than model.context_tokens="
                f"{cfg.model.context_tokens}"
            )
        init: str | Path = run_dir / "base" / "final"
    else:
        init = cfg.base.init
        model = load_init_model(init)  # fail early: missing weights, vocabulary or context mismatch
        check_model_matches_data(model, store, where=f"base model {init}")
        del model

    state = process_state()
    # the main process holds RUN's lock from here to the end: every check below sees a directory no
    # other moescope process is writing, and a second `train`/`--resume` on RUN is refused
    lock = run_directory_lock(run_dir) if state.is_main_process else contextlib.nullcontext()
    # one stop-signal scope for every stage: each stage's loop shares it, so a signal that arrives while a
    # stage finishes or between stages is still seen, and no later stage starts
    with lock, catch_stop_signals() as stop:
        summaries = _run_locked(cfg, run_dir, resume, runs, base_cfg, init, record, state, store.root, on_step, stop)
        stop_if_signalled(stop, "what follows training (every stage is finished)")  # e.g. during summary.json
        return summaries


def _run_locked(cfg, run_dir, resume, runs, base_cfg, init, record, state, data_root, on_step,
                stop) -> dict[str, dict[str, Any]]:
    exp_path = run_dir / EXPERIMENT_NAME
    stored = _check_run_directory(run_dir, resume, record)
    # Under `accelerate launch` / torchrun every process runs this function; all of them have
    # checked the directory above before the main process writes anything.
    state.wait_for_everyone()
    if state.is_main_process and not (run_dir / "environment.json").is_file():  # written before experiment.json
        atomic_write_json(run_dir / "environment.json", {
            **environment_info(), "seeds": {"train.seed": cfg.train.seed, "moe.install_seed": cfg.train.seed},
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    if state.is_main_process:  # the data manifest copy, written again if a kill left it short or it is missing
        manifest = (data_root / "manifest.json").read_bytes()
        copy = run_dir / "data_manifest.json"
        if not copy.is_file() or copy.read_bytes() != manifest:
            atomic_write_bytes(copy, manifest)
    if state.is_main_process and not exp_path.is_file():
        atomic_write_json(exp_path, record)
    elif state.is_main_process and stored is not None and set(record["arms"]) - set(stored["arms"]):
        # arms added to an existing experiment (same shared config, checked above) are recorded too
        atomic_write_json(exp_path, {**stored, "arms": {**stored["arms"], **record["arms"]}})

    summaries: dict[str, dict[str, Any]] = {}
    if base_cfg is not None:
        stop_if_signalled(stop, "stage base")
        summaries["base"] = train_run(base_cfg, run_dir / "base", init=None, name="base", resume=resume,
                                      on_step=on_step)
    for name, run in runs.items():
        stop_if_signalled(stop, f"stage {name}")
        summaries[name] = train_run(run, run_dir / "arms" / name, init=init, name=name, resume=resume,
                                    on_step=on_step)
    if state.is_main_process:
        previous = {}
        if (run_dir / "summary.json").is_file():
            try:
                previous = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:  # rebuilt from the stages' own summaries
                log.warning("%s: unreadable (%s); written again", run_dir / "summary.json", exc)
            if not isinstance(previous, dict):
                previous = {}
        merged = {**previous, **summaries}
        if merged != previous:  # resuming a finished experiment rewrites nothing
            atomic_write_json(run_dir / "summary.json", merged)
    state.wait_for_everyone()
    return summaries


def _check_run_directory(run_dir: Path, resume: bool, record: dict) -> dict | None:
    """The stored experiment.json when resuming RUN (refused unless it records this experiment, `record`);
    None for a fresh start, which a non-empty RUN refuses unless resumed."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MoescopeError(f"run directory {run_dir} is a file, not a directory; choose another --out")
    exp_path = run_dir / EXPERIMENT_NAME
    if resume and exp_path.is_file():
        stored = read_json_object(exp_path, {"arms": dict})
        _check_same_experiment(stored, record, exp_path)
        return stored
    if not resume and not is_empty_ignoring_lock(run_dir):
        raise MoescopeError(f"run directory {run_dir} already exists and is not empty; "
                            f"pass --resume to continue it, or choose another --out")
    return None


def _check_same_experiment(stored: dict, current: dict, where: Path) -> None:
    """Resuming must continue the same experiment: same shared config, same data, same arm diffs."""
    problems = []
    if stored.get("data_manifest_sha256") != current["data_manifest_sha256"]:
        problems.append("data manifest (data directory changed)")
    for name, arm in current["arms"].items():
        if name in stored.get("arms", {}):
            a = comparable_config(stored["arms"][name]["config"])
            b = comparable_config(arm["config"])
            problems.extend(f"arm {name}: {d}" for d in dict_diff(a, b))
    if stored.get("base", {}).get("init", "scratch") != current["base"].get("init", "scratch"):
        problems.append("base.init")
    if problems:
        raise MoescopeError(f"{where} belongs to another experiment: {'; '.join(problems[:6])} "
                            f"(use the original config or a new --out)")
