"""Hostile input to `train`, `demo` and `sweep` through the real CLI: a setting outside its bounds, an empty,
truncated or mistyped config file. Every refusal is exit code 2 and one line naming the key or file, before
anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_fixtures import make_block_store, one_thread  # noqa: F401

from moescope.cli import main

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


@pytest.mark.parametrize("command", [["demo"], ["sweep", "demo"]])
def test_demo_and_sweep_refuse_steps_that_could_never_finish_before_writing(tmp_path: Path, capsys,
                                                                           command: list[str]) -> None:
    out = tmp_path / "out"
    assert main([*command, "--set", "experiment.train.steps=1e20", "--out", str(out)]) == 2
    assert "config experiment.train.steps: expected an integer, got 1e+20" in error_line(capsys)
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
