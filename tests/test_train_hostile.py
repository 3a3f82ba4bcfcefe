"""Hostile input to `train`, `demo` and `sweep` through the real CLI: a setting outside its bounds, a run
directory or checkpoint of another experiment, damaged checkpoint files. Every refusal is exit code 2 and
one line naming the key or file, before anything is written (and before any model is built)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_fixtures import make_block_store, one_thread  # noqa: F401

from moescope.cli import main
from moescope.io.manifest import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = ('arms = ["moe"]\n[base]\nsteps = 2\n'
          '[model]\nn_layers = 2\nd_model = 32\nn_heads = 2\ncontext_tokens = 32\n'
          '[moe]\nn_experts = 4\nlayers = [1]\n'
          '[train]\nsteps = 2\nbatch_sequences = 4\neval_every_steps = 2\neval_max_blocks_per_domain = 2\n'
          '[tracking]\nprogress_bar = false\n')


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A tiny data directory and a config file training on it (base + moe, 2 steps each)."""
    root = tmp_path_factory.mktemp("config")
    config = root / "exp.toml"
    config.write_text(f'data_dir = "{make_block_store(root / "data")}"\n' + CONFIG)
    return config


def error_line(capsys) -> str:
    """The one error line the CLI printed (warnings may precede it; no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("moescope: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (lock files excepted: they come and go with each command)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith((".lock", ".moescope", "lock"))}


def copy_run(trained: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    return run


# ------------------------------------------------------------------------------ settings out of bounds


@pytest.mark.parametrize("setting, says", [
    ("train.steps=1e20", "config train.steps: expected an integer, got 1e+20"),
    ("train.steps=100000000000", "config train.steps must be in [1, 100000000], got 100000000000"),
    ("train.steps=3.5", "config train.steps: expected an integer, got 3.5"),
    ("train.steps=true", "config train.steps: expected an integer, got True"),
    ("train.steps=.nan", "config train.steps: expected an integer, got nan"),
    ("optim.learning_rate=.nan", "config optim.learning_rate: expected a finite number, got nan"),
    ("optim.beta1=2", "config optim.beta1 must be in [0, 1), got 2.0"),
    ("train.batch_sequences=1e12", "config train.batch_sequences must be in [1, 1048576], got 1000000000000"),
    ("model.n_layers=100000", "config model.n_layers must be in [1, 1024], got 100000"),
    ("moe.router_noise_std=-1", "config moe.router_noise_std must be >= 0, got -1.0"),
    ("moe.upcycle_reinit_ratio=1.5", "config moe.upcycle_reinit_ratio must be in [0, 1], got 1.5"),
    ("train.cpu_threads=0", "config train.cpu_threads must be >= 1, got 0"),
])
def test_train_refuses_a_setting_outside_its_bounds_before_writing(config: Path, tmp_path: Path, capsys,
                                                                   setting: str, says: str) -> None:
    out = tmp_path / "run"
    assert main(["train", str(config), "--set", setting, "--out", str(out)]) == 2
    assert error_line(capsys).startswith(f"moescope: error: {says}")
    assert not out.exists()


@pytest.mark.parametrize("command, setting, says", [
    (["demo"], "experiment.train.steps=1e20", "config experiment.train.steps: expected an integer, got 1e+20"),
    (["sweep", "demo"], "experiment.train.steps=1e20", "config experiment.train.steps: expected an integer, got 1e+20"),
    # settings used only after training must not cost a training run to be found wrong
    (["demo"], "analysis.batch_blocks=0", "config analysis.batch_blocks must be in [1, 1048576], got 0"),
    (["demo"], "analysis.statistics.n_resamples=1e20", "config analysis.statistics.n_resamples: expected an integer"),
    (["demo"], "analysis.statistics.confidence_level=1.5",
     "config analysis.statistics.confidence_level must be in (0, 1)"),
    (["demo"], "analysis.max_blocks_per_domain=0", "config analysis.max_blocks_per_domain must be >= 1, got 0"),
    (["demo"], "cluster.merge.alpha=-1", "config cluster.merge.alpha must be >= 0, got -1.0"),
    (["demo"], "cluster.capture.n_batches=0", "config cluster.capture.n_batches must be >= 1, got 0"),
])
def test_demo_and_sweep_refuse_a_setting_outside_its_bounds_before_writing(
        tmp_path: Path, capsys, command: list[str], setting: str, says: str) -> None:
    out = tmp_path / "out"
    assert main([*command, "--set", setting, "--out", str(out)]) == 2
    assert error_line(capsys).startswith(f"moescope: error: {says}")
    assert not out.exists()


@pytest.mark.parametrize("content, says", [
    ("", "data_dir is not set"),
    ('data_dir = "x"\n[model]\nn_layers = ', "cannot parse"),
    ('[train]\nsteps = "two"\n', "config train.steps: expected an integer, got 'two'"),
    ("model = 3\n", "config model: expected a table, got int"),
    ("bogus = 1\n", "unknown config key 'bogus'"),
])
def test_train_refuses_an_empty_truncated_or_mistyped_config_file_naming_it(tmp_path: Path, capsys, content: str,
                                                                             says: str) -> None:
    config, out = tmp_path / "exp.toml", tmp_path / "run"
    config.write_text(content)
    assert main(["train", str(config), "--out", str(out)]) == 2
    assert says in error_line(capsys)
    assert not out.exists()


def test_train_refuses_a_run_directory_that_is_a_file(config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.write_text("not a directory")
    for resume in ([], ["--resume"]):
        assert main(["train", str(config), *resume, "--out", str(out)]) == 2
        assert f"run directory {out} is a file" in error_line(capsys)
    assert out.read_text() == "not a directory"


# ------------------------------------------------------------------------------ foreign runs and checkpoints


@pytest.fixture(scope="module")
def trained(config: Path, tmp_path_factory) -> dict[str, Path]:
    """The config's finished run, trained once for the module."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    return {"config": config, "run": run}


def _no_model_may_be_built(monkeypatch) -> list[str]:
    """Record (and refuse) every model the run would build: the checks must come first."""
    from moescope.train import checkpoint, experiment, stage

    built: list[str] = []

    def refuse(*args, **kwargs):
        built.append(str(args[0]) if args else "?")
        raise AssertionError("a model was built before the run's identity was checked")

    monkeypatch.setattr(checkpoint, "load_moe_model", refuse)
    monkeypatch.setattr(experiment, "load_init_model", refuse)
    monkeypatch.setattr(stage, "initial_model", refuse)
    return built


def test_a_checkpoint_of_another_config_is_refused_before_its_model_is_built(trained: dict, tmp_path: Path, capsys,
                                                                             monkeypatch) -> None:
    run = copy_run(trained, tmp_path)
    (run / "arms" / "moe" / "summary.json").unlink()  # unfinished: resume goes to the checkpoint
    ckpt = run / "arms" / "moe" / "checkpoints" / "step_000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"]["moe"]["top_k"] = 2  # intact (the manifest vouches for it), but another run's
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(ckpt, 2)
    before = tree(run)
    built = _no_model_may_be_built(monkeypatch)
    assert main(["train", str(trained["config"]), "--resume", "--out", str(run)]) == 2
    line = error_line(capsys)
    assert f"checkpoint {ckpt} was written by another config" in line and "moe.top_k (2 -> 1)" in line
    assert built == [] and tree(run) == before


def test_resuming_another_experiment_is_refused_before_pretrained_weights_load(trained: dict, tmp_path: Path, capsys,
                                                                                monkeypatch) -> None:
    run = copy_run(trained, tmp_path)
    before = tree(run)
    built = _no_model_may_be_built(monkeypatch)
    base = tmp_path / "pretrained"  # never read: experiment.json already says the run started from scratch
    assert main(["train", str(trained["config"]), "--resume", "--base", str(base), "--set", "train.steps=3",
                 "--out", str(run)]) == 2
    line = error_line(capsys)
    assert f"{run / 'experiment.json'} belongs to another experiment" in line
    assert "train.steps (2 -> 3)" in line and "base.init" in line
    # and without --resume, a non-empty run directory is refused as early
    assert main(["train", str(trained["config"]), "--base", str(base), "--out", str(run)]) == 2
    assert f"run directory {run} already exists" in error_line(capsys)
    assert built == [] and tree(run) == before


@pytest.mark.parametrize("damage", ["zero_state", "garbage_tensors", "zero_manifest"])
def test_a_damaged_only_checkpoint_is_one_line_naming_the_file_and_changes_nothing(trained: dict, tmp_path: Path,
                                                                                     capsys, damage: str) -> None:
    run = copy_run(trained, tmp_path)
    (run / "arms" / "moe" / "summary.json").unlink()
    ckpt = run / "arms" / "moe" / "checkpoints" / "step_000002"
    name = {"zero_state": "trainer_state.json", "garbage_tensors": "trainer_tensors.safetensors",
            "zero_manifest": "manifest.json"}[damage]
    (ckpt / name).write_bytes(b"" if damage.startswith("zero") else b"\x00garbage" * 9)
    before = tree(run)
    assert main(["train", str(trained["config"]), "--resume", "--out", str(run)]) == 2
    line = error_line(capsys)
    assert "no intact checkpoint to resume from" in line and str(ckpt / name) in line
    assert tree(run) == before


@pytest.mark.parametrize("command, says", [
    (["btx", "run", "--set", "branch_steps=1e20"], "config branch_steps: expected an integer, got 1e+20"),
    (["btx", "run", "--set", "train.steps=0"], "config train.steps must be in [1, 100000000], got 0"),
    (["embed", "train", "--set", "train.learning_rate=.inf"], "config train.learning_rate: expected a finite number"),
    (["embed", "compare", "--set", "eval.confidence=1.5"], "config eval.confidence must be in (0, 1), got 1.5"),
    (["embed", "train", "--set", "pairs.validation_fraction=1"], "config pairs.validation_fraction must be in [0, 1)"),
])
def test_btx_and_embed_settings_share_the_declared_bounds(tmp_path: Path, capsys, command: list[str],
                                                          says: str) -> None:
    out = tmp_path / "out"
    assert main([*command, "--out", str(out)]) == 2
    assert says in error_line(capsys)
    assert not out.exists()
