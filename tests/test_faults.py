"""Fault injection on tiny runs: kills, corrupted checkpoints, torn logs, NaN, crafted pickles, two processes.

Every case ends in one of two ways: a resume that is bit for bit the uninterrupted run (train
records, evaluations, final weights), or one clear MoescopeError naming the file. The default
suite runs at least one case of each kind; `-m slow` runs every kill point.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moescope
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.io.config import to_dict
from moescope.io.lock import run_directory_lock
from moescope.moe.hf_model import load_moe_model
from moescope.train.checkpoint import checkpoint_steps, load_checkpoint, verify_checkpoint
from moescope.train.config import resolve_arms
from moescope.train.experiment import run_experiment
from moescope.train.metrics_log import read_metrics
from moescope.train.trainer import NonFiniteLoss, Trainer
from train_fixtures import make_block_store, one_thread, tiny_experiment  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout and router noise make every step depend on the RNG streams a checkpoint must restore.
OVER = dict(arms=["moe"], train__steps=6, train__checkpoint_every_steps=2, train__eval_every_steps=3,
            train__cpu_threads=1, model__dropout=0.1, moe__router_noise_std=0.5)
ARM = Path("arms") / "moe"
VOLATILE = {"tokens_per_s", "peak_rss_mb", "peak_rss_scope", "cuda_peak_mb"}  # timings and memory differ per process


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A data directory, a tiny pretrained base (no base stage to train) and the uninterrupted reference run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("faults")
    data = make_block_store(root / "data")
    base = root / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(base)
    threads = torch.get_num_threads()
    reference = root / "reference"
    run_experiment(_cfg(data, base), reference)
    torch.set_num_threads(threads)
    cfg_file = root / "config.json"
    cfg_file.write_text(json.dumps(to_dict(_cfg(data, base))))
    return {"data": data, "base": base, "reference": reference, "config": cfg_file, "root": root}


def _cfg(data: Path, base: Path, **extra):
    return tiny_experiment(data, base__init=str(base), **{**OVER, **extra})


def _records(run: Path, kind: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run / ARM / "metrics.jsonl", kind)]


def assert_same_as_reference(run: Path, reference: Path) -> None:
    for kind in ("train", "eval"):
        got, want = _records(run, kind), _records(reference, kind)
        assert [r["step"] for r in got] == [r["step"] for r in want], f"{kind} steps (duplicates or gaps)"
        assert got == want, f"{kind} records differ"
    a, b = load_moe_model(run / ARM / "final"), load_moe_model(reference / ARM / "final")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ckpts = checkpoint_steps(run / ARM / "checkpoints")
    for ckpt in ckpts:
        load_checkpoint(ckpt)  # every checkpoint left behind verifies and is finite
    assert (run / ARM / "checkpoints" / "latest").read_text().strip() == ckpts[0].name
    summary = json.loads((run / ARM / "summary.json").read_text())
    assert summary["final_eval"]["loss"] == json.loads((reference / ARM / "summary.json").read_text())["final_eval"]["loss"]


def _unfinished_copy(world: dict, tmp_path: Path) -> Path:
    """The reference run as if killed right after its final checkpoint (before final/ and summary.json)."""
    run = tmp_path / "run"
    shutil.copytree(world["reference"], run)
    shutil.rmtree(run / ARM / "final")
    (run / ARM / "summary.json").unlink()
    (run / "summary.json").unlink()
    return run


def _resume(world: dict, run: Path):
    return run_experiment(_cfg(world["data"], world["base"]), run, resume=True)


# ------------------------------------------------------------------------------------------- SIGKILL

# A fresh process trains the reference config and SIGKILLs itself just before the N-th call (in the
# moe arm) of the function named by the kill point: mid-run after a step, mid-checkpoint (files
# written, manifest not yet), after the commit but before `latest`, mid-line in metrics.jsonl,
# after the final checkpoint (before final/), and before summary.json.
WORKER = r"""
import json, os, signal, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch
import moescope.train.checkpoint as ckpt
import moescope.train.rundir as rundir
from moescope.train.metrics_log import MetricsLog
from moescope.train.experiment import run_experiment
from train_fixtures import tiny_experiment

point, nth = spec["point"], spec["nth"]
calls = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hit(path):
    if "arms/moe" in str(path):
        calls.append(1)
        return len(calls) == nth
    return False

def wrap(module, name, path_of):
    orig = getattr(module, name)
    def wrapped(*a, **k):
        if hit(path_of(a)):
            die()
        return orig(*a, **k)
    setattr(module, name, wrapped)

if point == "manifest":
    wrap(ckpt, "write_manifest", lambda a: a[0])
elif point == "latest":
    wrap(ckpt, "atomic_write_text", lambda a: a[0])
elif point == "final_model":
    wrap(rundir, "save_moe_model", lambda a: a[1] if Path(a[1]).name == "final" else "")
elif point == "summary":
    wrap(rundir, "atomic_write_json", lambda a: a[0] if Path(a[0]).name == "summary.json" else "")
elif point == "metrics_torn":
    orig_write = MetricsLog.write
    def write(self, record):
        if hit(self.path):
            line = json.dumps(record)
            with open(self.path, "a") as fh:
                fh.write(line[: len(line) // 2])
            die()
        return orig_write(self, record)
    MetricsLog.write = write

def on_step(step, t):
    if point == "step" and t.name == "moe" and step == nth:
        die()

cfg = tiny_experiment(Path(spec["data"]), base__init=spec["base"], **spec["over"])
run_experiment(cfg, Path(spec["run"]), on_step=on_step)
print("finished without being killed")
"""

KILL_POINTS = ([("step", n) for n in range(1, 6)] + [("manifest", n) for n in (1, 2, 3)]
               + [("latest", n) for n in (1, 2, 3)] + [("metrics_torn", n) for n in (2, 5, 9)]
               + [("final_model", 1), ("summary", 1)])
_pick = random.Random(16)
# default suite: one random mid-run point and the kill right after the final checkpoint
DEFAULT_KILLS = [_pick.choice([p for p in KILL_POINTS if p[0] != "final_model"]), ("final_model", 1)]


def _env() -> dict:
    src = str(Path(moescope.__file__).resolve().parents[1])
    tests = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, tests]), "OMP_NUM_THREADS": "1"}


def _kill_then_resume(world: dict, tmp_path: Path, point: str, nth: int) -> None:
    run = tmp_path / "run"
    spec = {"point": point, "nth": nth, "data": str(world["data"]), "base": str(world["base"]), "run": str(run),
            "over": OVER}
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    _resume(world, run)
    assert_same_as_reference(run, world["reference"])
    assert not [p for p in (run / ARM / "checkpoints").iterdir() if p.name.startswith(".")]  # orphans removed


@pytest.mark.parametrize("point,nth", DEFAULT_KILLS)
def test_sigkill_then_resume_is_bit_identical(world: dict, tmp_path: Path, point: str, nth: int) -> None:
    _kill_then_resume(world, tmp_path, point, nth)


@pytest.mark.slow
@pytest.mark.parametrize("point,nth", [p for p in KILL_POINTS if p not in DEFAULT_KILLS])
def test_sigkill_at_every_point_then_resume_is_bit_identical(world: dict, tmp_path: Path, point: str,
                                                             nth: int) -> None:
    _kill_then_resume(world, tmp_path, point, nth)


# ------------------------------------------------------------------------------- corrupted checkpoints


def _corrupt_zeros(path: Path) -> Path:
    f = path / "model" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    return f


def _corrupt_state_garbage(path: Path) -> Path:
    f = path / "trainer_state.json"
    f.write_bytes(os.urandom(300))
    return f


def _truncate_tensors(path: Path) -> Path:
    f = path / "trainer_tensors.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return f


@pytest.mark.parametrize("corrupt", [_corrupt_zeros, _corrupt_state_garbage, _truncate_tensors])
def test_a_corrupted_newest_checkpoint_is_skipped_naming_the_file(world: dict, tmp_path: Path, corrupt, caplog) -> None:
    run = _unfinished_copy(world, tmp_path)
    newest, previous = checkpoint_steps(run / ARM / "checkpoints")[:2]
    bad_file = corrupt(newest)
    with pytest.raises(MoescopeError, match=str(bad_file)):
        verify_checkpoint(newest)
    _resume(world, run)
    assert f"skipping checkpoint {newest}" in caplog.text and str(bad_file) in caplog.text
    resume_events = [e for e in read_metrics(run / ARM / "metrics.jsonl", "event") if e["event"] == "resume"]
    assert resume_events[-1]["checkpoint"] == str(previous)  # fell back to the previous, intact one
    assert_same_as_reference(run, world["reference"])


def test_a_checkpoint_of_another_run_is_skipped_like_a_damaged_one(world: dict, tmp_path: Path, caplog) -> None:
    """A checkpoint copied in from another config, with a manifest that vouches for it, is not this stage's:
    resume skips it with a warning and continues from the newest checkpoint that is, bit for bit."""
    from moescope.train.checkpoint import write_manifest

    run = _unfinished_copy(world, tmp_path)
    newest, previous = checkpoint_steps(run / ARM / "checkpoints")[:2]
    state_path = newest / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["config"]["train"]["seed"] += 1
    state_path.write_text(json.dumps(state))
    write_manifest(newest, int(newest.name.split("_")[1]))
    _resume(world, run)
    assert f"skipping checkpoint {newest}" in caplog.text and "written by another config" in caplog.text
    resume_events = [e for e in read_metrics(run / ARM / "metrics.jsonl", "event") if e["event"] == "resume"]
    assert resume_events[-1]["checkpoint"] == str(previous)
    assert_same_as_reference(run, world["reference"])


def test_a_snapshot_is_whole_or_absent_and_a_failed_write_is_one_line(world: dict, tmp_path: Path, capsys,
                                                                      monkeypatch) -> None:
    """Snapshots carry a manifest their readers verify; a full disk mid-snapshot leaves no partial snapshot
    directory and says where --resume continues; the resume then equals the uninterrupted run."""
    import errno

    import moescope.train.rundir as rundir
    from moescope.io.saved_model import verify_saved_model

    for snap in (world["reference"] / ARM / "snapshots").iterdir():
        verify_saved_model(snap)
        assert (snap / "manifest.json").is_file()
    save = rundir.save_moe_model

    def full_disk(model, path, **kw):
        out = save(model, path, **kw)
        if "snapshots" in str(path) and "arms/moe" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return out

    monkeypatch.setattr(rundir, "save_moe_model", full_disk)
    run = tmp_path / "run"
    cfg_file = world["config"]
    assert main(["train", str(cfg_file), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the snapshot at step 0 could not be written in" in err and "--resume continues from the start" in err
    assert not [p for p in (run / ARM / "snapshots").iterdir() if not p.name.startswith(".")]
    monkeypatch.setattr(rundir, "save_moe_model", save)
    assert main(["train", str(cfg_file), "--resume", "--out", str(run)]) == 0
    assert_same_as_reference(run, world["reference"])
    assert sorted(p.name for p in (run / ARM / "snapshots").iterdir()) == sorted(
        p.name for p in (world["reference"] / ARM / "snapshots").iterdir())


def test_no_intact_checkpoint_is_one_line_and_exit_2(world: dict, tmp_path: Path, capsys) -> None:
    run = _unfinished_copy(world, tmp_path)
    for ckpt in checkpoint_steps(run / ARM / "checkpoints"):
        _truncate_tensors(ckpt)
    metrics_before = (run / ARM / "metrics.jsonl").read_bytes()
    assert main(["train", str(world["config"]), "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no intact checkpoint" in err and "trainer_tensors.safetensors" in err
    assert (run / ARM / "metrics.jsonl").read_bytes() == metrics_before


def _limited_file_size(limit: int):
    """A child's preexec: files of at most `limit` bytes, as on a disk that fills mid-write (Python ignores
    SIGXFSZ, so the write fails with EFBIG like ENOSPC)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("where", ["first file", "first checkpoint"])
def test_a_full_disk_is_one_line_naming_the_file_and_resume_is_bit_identical(world: dict, tmp_path: Path,
                                                                             where: str) -> None:
    ckpt = checkpoint_steps(world["reference"] / ARM / "checkpoints")[0]
    model_bytes = (ckpt / "model" / "model.safetensors").stat().st_size
    limit = 64 if where == "first file" else model_bytes + 1024  # weights fit, optimizer state does not
    assert (ckpt / "trainer_tensors.safetensors").stat().st_size > limit
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "moescope", "train", str(world["config"]), "--experiment",
                           "--out", str(run)], env=_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=_limited_file_size(limit))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("moescope: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "File too large" in lines[0] and str(run) in lines[0], lines[0]  # names what could not be written
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]  # nothing half-written left
    _resume(world, run)
    assert_same_as_reference(run, world["reference"])


def test_a_crafted_pickle_never_runs(world: dict, tmp_path: Path) -> None:
    """A foreign run directory whose checkpoint is an old-style pickle that would create a file."""
    run = _unfinished_copy(world, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for ckpt in checkpoint_steps(run / ARM / "checkpoints"):
        for f in ("trainer_state.json", "trainer_tensors.safetensors", "manifest.json"):
            (ckpt / f).unlink()
        payload = pickle.dumps({"format_version": 1, "step": 6, "x": Exploit()})
        (ckpt / "trainer_state.pt").write_bytes(payload)
    with pytest.raises(MoescopeError, match=r"no intact checkpoint.*manifest.json is missing"):
        _resume(world, run)
    # the same bytes under every name the loader reads, with a manifest that vouches for them
    from moescope.train.checkpoint import write_manifest

    newest = checkpoint_steps(run / ARM / "checkpoints")[0]
    for f in ("trainer_state.json", "trainer_tensors.safetensors"):
        (newest / f).write_bytes(payload)
    (newest / "trainer_state.pt").unlink()
    write_manifest(newest, 6)
    with pytest.raises(MoescopeError, match=r"no intact checkpoint"):
        _resume(world, run)
    assert not marker.exists()


def test_a_manifest_vouching_for_foreign_bytes_is_still_one_clear_error(world: dict, tmp_path: Path) -> None:
    """sha256 is no signature: whoever writes the files can write a matching manifest. The loaders
    behind it still refuse bad bytes with one MoescopeError (no traceback, nothing run)."""
    from moescope.train.checkpoint import write_manifest

    run = _unfinished_copy(world, tmp_path)
    for ckpt in checkpoint_steps(run / ARM / "checkpoints"):
        (ckpt / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        write_manifest(ckpt, int(ckpt.name.split("_")[1]))
    with pytest.raises(MoescopeError, match=r"no intact checkpoint.*model.safetensors: unreadable safetensors file"):
        _resume(world, run)


def _nested(depth: int) -> list:
    tree: list = []
    for _ in range(depth):
        tree = [tree]
    return tree


@pytest.mark.parametrize("field, value", [
    ("nonfinite_skips_in_a_row", "abc"), ("train_seconds", "x"), ("timed_steps", -1),
    ("collapse_streak", [1, 2]), ("collapse_events", 5), ("collapse_events", [_nested(700)]),
    ("data_position_sequences", 1.5),
])
def test_a_forged_trainer_field_skips_the_checkpoint_like_a_damaged_one(world: dict, tmp_path: Path, caplog,
                                                                       field: str, value) -> None:
    """A trainer_state.json field of the wrong type, with a manifest re-forged to vouch for it: the checkpoint
    is skipped naming the file and the field, and the resume from the one before is the uninterrupted run."""
    from moescope.train.checkpoint import write_manifest

    run = _unfinished_copy(world, tmp_path)
    newest, previous = checkpoint_steps(run / ARM / "checkpoints")[:2]
    state_file = newest / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert field in state  # the trainer writes it: the check covers a real field
    state[field] = value
    state_file.write_text(json.dumps(state))
    write_manifest(newest, int(newest.name.split("_")[1]))
    with pytest.raises(MoescopeError, match=rf"trainer_state.json: '{field}' must be"):
        load_checkpoint(newest)
    _resume(world, run)
    assert f"skipping checkpoint {newest}" in caplog.text
    resume_events = [e for e in read_metrics(run / ARM / "metrics.jsonl", "event") if e["event"] == "resume"]
    assert resume_events[-1]["checkpoint"] == str(previous)
    assert_same_as_reference(run, world["reference"])


def test_a_metrics_record_with_a_step_that_is_not_a_number_is_one_line_on_resume(world: dict, tmp_path: Path,
                                                                                  capsys) -> None:
    run = _unfinished_copy(world, tmp_path)
    log_file = run / ARM / "metrics.jsonl"
    lines = log_file.read_text().splitlines()
    record = json.loads(lines[2])
    record["step"] = str(record["step"])
    log_file.write_text("\n".join([*lines[:2], json.dumps(record), *lines[3:]]) + "\n")
    assert main(["train", str(world["config"]), "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{log_file}:3: 'step' must be an integer" in err, err


def test_a_full_disk_while_appending_a_metrics_record_is_one_line_and_leaves_no_torn_line(
        tmp_path: Path, monkeypatch) -> None:
    from moescope.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"kind": "train", "step": 1, "ce": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):  # part of the line reaches the disk, then it is full
            self.fh.write(text[:7])
            self.fh.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    with pytest.raises(MoescopeError, match=r"metrics.jsonl: a record could not be appended \(No space left"):
        log.write({"kind": "train", "step": 2, "ce": 1.0})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


# ------------------------------------------------------------------------------- idempotent resume


def test_resuming_a_run_killed_after_its_final_checkpoint_finishes_it_exit_0(world: dict, tmp_path: Path,
                                                                              capsys) -> None:
    run = _unfinished_copy(world, tmp_path)
    assert main(["train", str(world["config"]), "--resume", "--out", str(run)]) == 0
    assert "moe" in capsys.readouterr().out
    assert_same_as_reference(run, world["reference"])  # no duplicate eval record, same summary losses
    # and resuming the finished run again changes nothing at all
    before = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert main(["train", str(world["config"]), "--resume", "--out", str(run)]) == 0
    assert {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()} == before


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw), 97):
        raw[i] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["final_weights", "final_manifest_deleted", "stage_summary", "run_summary"])
def test_a_damaged_finished_stage_is_trained_again_from_its_last_checkpoint(world: dict, tmp_path: Path, caplog,
                                                                            damage: str) -> None:
    """final/ carries a sha256 manifest: rotten weights in a finished stage are never handed on (to the
    arms, to analysis); the stage is re-finished from its last verified checkpoint, bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(world["reference"], run)
    if damage == "final_weights":
        _flip_bytes(run / ARM / "final" / "model.safetensors")
    elif damage == "final_manifest_deleted":  # its digest is in the stage's summary.json: still refused
        (run / ARM / "final" / "manifest.json").unlink()
        _flip_bytes(run / ARM / "final" / "model.safetensors")
    else:
        target = run / ARM / "summary.json" if damage == "stage_summary" else run / "summary.json"
        target.write_text(target.read_text()[:20])
    _resume(world, run)
    if damage != "run_summary":
        assert "training it again from its last verified checkpoint" in caplog.text
    assert_same_as_reference(run, world["reference"])
    merged, want = (json.loads((r / "summary.json").read_text()) for r in (run, world["reference"]))
    assert merged["moe"]["final_eval"] == want["moe"]["final_eval"]


@pytest.mark.parametrize("damage", ["not_utf8", "a_directory", "a_dangling_link"])
def test_a_broken_latest_pointer_is_rewritten_not_fatal(world: dict, tmp_path: Path, damage: str) -> None:
    run = _unfinished_copy(world, tmp_path)
    latest = run / ARM / "checkpoints" / "latest"
    latest.unlink()
    if damage == "not_utf8":
        latest.write_bytes(b"\xff\xfe\x00step")
    elif damage == "a_directory":
        latest.mkdir()
    else:
        latest.symlink_to(tmp_path / "nowhere")
    _resume(world, run)
    assert_same_as_reference(run, world["reference"])


def test_a_short_copy_of_the_data_manifest_is_written_again(world: dict, tmp_path: Path) -> None:
    """A kill mid-copy left RUN/data_manifest.json short; the resume restores it (provenance, and report
    reads it)."""
    run = _unfinished_copy(world, tmp_path)
    copy = run / "data_manifest.json"
    copy.write_bytes(copy.read_bytes()[:40])
    _resume(world, run)
    assert copy.read_bytes() == (world["data"] / "manifest.json").read_bytes()


def test_a_flipped_bit_in_the_training_data_is_refused_before_training(world: dict, tmp_path: Path) -> None:
    """Block files carry their sha256 in the manifest; a size-preserving flip is caught, not trained on."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    target = data / "blocks" / "train" / "code.bin"
    raw = bytearray(target.read_bytes())
    raw[10] ^= 1
    target.write_bytes(bytes(raw))
    with pytest.raises(MoescopeError, match=r"code.bin does not match its blocks_sha256"):
        run_experiment(_cfg(data, world["base"]), tmp_path / "run")


def test_resume_does_not_depend_on_how_the_data_path_is_spelled(world: dict, tmp_path: Path) -> None:
    """The data is matched by its manifest hash; `data/../data` (or an absolute path for a relative
    one) is the same data, and the resume is the uninterrupted run."""
    run = _unfinished_copy(world, tmp_path)
    data = world["data"]
    run_experiment(_cfg(data.parent / ".." / data.parent.name / data.name, world["base"]), run, resume=True)
    assert_same_as_reference(run, world["reference"])


def test_a_torn_last_metrics_line_is_cut_back_with_a_warning(world: dict, tmp_path: Path, caplog) -> None:
    run = _unfinished_copy(world, tmp_path)
    with open(run / ARM / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 6, "ce": 1.2')
    _resume(world, run)
    assert "torn" in caplog.text and "metrics.jsonl" in caplog.text
    assert_same_as_reference(run, world["reference"])
    # a bad line that is NOT the last one is corruption, named with its line number
    lines = (run / ARM / "metrics.jsonl").read_text().splitlines()
    (run / ARM / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(MoescopeError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(run / ARM / "metrics.jsonl")


# ------------------------------------------------------------------------------- non-finite values


def test_huge_learning_rate_stops_before_any_non_finite_checkpoint(world: dict, tmp_path: Path) -> None:
    """The issue's repro: a huge learning rate with train.checkpoint_every_steps=3."""
    run = tmp_path / "run"
    cfg = _cfg(world["data"], world["base"], optim__learning_rate=1e30, train__checkpoint_every_steps=3)
    with pytest.raises(NonFiniteLoss, match=r"NaN/inf at step \d+; training stopped.*last good checkpoint: ") as exc:
        run_experiment(cfg, run)
    ckpts = checkpoint_steps(run / ARM / "checkpoints")
    for ckpt in ckpts:
        load_checkpoint(ckpt)  # verified and finite, or it raises
    named = str(exc.value).split("last good checkpoint: ")[1]
    assert named == (str(ckpts[0]) if ckpts else "none (no checkpoint written yet)")
    assert not (run / ARM / "final").exists()


def _nan_at(trainer: Trainer, steps: set[int]) -> None:
    """Make the loss NaN during the given (0-based) optimizer steps."""
    forward = trainer._forward

    def poisoned(x):
        loss = forward(x)
        return loss * float("nan") if trainer.step in steps else loss

    trainer._forward = poisoned


def test_skip_drops_the_non_finite_update_and_goes_on(world: dict, tmp_path: Path) -> None:
    run = resolve_arms(_cfg(world["data"], world["base"], train__on_nonfinite="skip"), ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "arm", init=world["base"], name="moe")
    _nan_at(trainer, {2})
    trainer.train_step()
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    lr_before = trainer.scheduler.get_last_lr()[0]
    out = trainer.train_step()
    assert out["skipped_update"] and trainer.step == 3 and trainer.guard.total == 1
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights untouched
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, trainer.optimizer.state.values()))
    assert trainer.scheduler.get_last_lr()[0] != lr_before  # the schedule follows the step count
    assert "skipped_update" not in trainer.train_step() and trainer.guard.in_a_row == 0
    trainer.save_checkpoint()
    _, state = load_checkpoint(tmp_path / "arm" / "checkpoints" / "step_000004")
    assert state["nonfinite_skips_total"] == 1
    events = read_metrics(tmp_path / "arm" / "metrics.jsonl", "event")
    assert events[-1]["event"] == "nonfinite_skip" and events[-1]["step"] == 3 and events[-1]["ce"] == "nan"
    trainer.metrics.close()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_stops_naming_the_last_verified_checkpoint(world: dict, tmp_path: Path, mode: str) -> None:
    run = resolve_arms(_cfg(world["data"], world["base"], train__on_nonfinite=mode,
                            train__max_nonfinite_skips_in_a_row=2), ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "arm", init=world["base"], name="moe")
    trainer.train_step()
    good = trainer.save_checkpoint()
    _nan_at(trainer, {1, 2, 3, 4, 5})
    if mode == "skip":
        assert trainer.train_step()["skipped_update"]  # the first NaN is skipped, the second in a row stops
    with pytest.raises(NonFiniteLoss, match=rf"NaN/inf at step {3 if mode == 'skip' else 2}.*"
                                            rf"last good checkpoint: {good}$"):
        trainer.train_step()
    assert checkpoint_steps(tmp_path / "arm" / "checkpoints") == [good]
    trainer.metrics.close()


def test_a_non_finite_evaluation_stops_before_any_record_or_checkpoint(world: dict, tmp_path: Path,
                                                                       monkeypatch) -> None:
    run = resolve_arms(_cfg(world["data"], world["base"]), ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "arm", init=world["base"], name="moe")
    ev = trainer.evaluate()
    ev["domains"]["math"]["loss"] = float("inf")
    monkeypatch.setattr(trainer, "evaluate", lambda: ev)
    with pytest.raises(NonFiniteLoss, match=r"evaluation loss is NaN/inf \(domains: math\) at step 0"):
        trainer.fit()
    assert read_metrics(tmp_path / "arm" / "metrics.jsonl", "eval") == []
    assert not (tmp_path / "arm" / "checkpoints").exists()


def test_a_non_finite_weight_is_never_checkpointed(world: dict, tmp_path: Path) -> None:
    run = resolve_arms(_cfg(world["data"], world["base"]), ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "arm", init=world["base"], name="moe")
    trainer.train_step()
    with torch.no_grad():
        trainer.raw_model.transformer.wte.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"state to checkpoint is NaN/inf.*transformer.wte.weight"):
        trainer.save_checkpoint()
    assert checkpoint_steps(tmp_path / "arm" / "checkpoints") == []
    trainer.metrics.close()


# ------------------------------------------------------------------------------- two processes


HOLDER = r"""
import sys, time
from moescope.io.lock import run_directory_lock
with run_directory_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_on_a_run_directory_exits_2_naming_the_holder(world: dict, tmp_path: Path, capsys) -> None:
    run = _unfinished_copy(world, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        assert main(["train", str(world["config"]), "--resume", "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and err.strip().count("\n") == 0
        assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the stage directory is locked too (train_run used directly, e.g. by the BTX pipeline)
    with run_directory_lock(run / ARM):
        with pytest.raises(MoescopeError, match=rf"{run / ARM} is in use by process {os.getpid()}"):
            _resume(world, run)
    _resume(world, run)  # once released, the resume goes through
    assert_same_as_reference(run, world["reference"])


@pytest.mark.slow
def test_two_live_training_processes_never_interleave(world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moescope.cli", "train", str(world["config"]), "--out", str(run)]
    procs = [subprocess.Popen(cmd + extra, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["--resume"])]
    time.sleep(0.1)
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the loser either ran after (a no-op resume) or was refused
    if codes == [0, 2]:
        assert any("in use by process" in err for code, err in results if code == 2)
    assert_same_as_reference(run, world["reference"])
