"""Two CPU processes (torchrun -> accelerate MULTI_CPU, gloo DDP) train like one process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.train.metrics_log import read_metrics
from train_fixtures import make_block_store


def _free_port() -> int:
    """A port no other process listens on now (a fixed one collides with a concurrent test run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

CONFIG = """
data_dir = "{data}"
arms = ["dense", "moe"]
[base]
steps = 2
[model]
n_layers = 2
d_model = 32
n_heads = 2
context_tokens = 32
[moe]
n_experts = 4
layers = [1]
[loss]
load_balance_coef = 0.1
[train]
steps = 3
batch_sequences = 8
grad_accum_steps = 2
eval_every_steps = 3
eval_max_blocks_per_domain = 4
log_every_steps = 1
cpu_threads = 1
[tracking]
progress_bar = false
"""


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not found")
    data = make_block_store(tmp_path / "data")
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG.format(data=data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "moescope.cli", "train", str(cfg), "--experiment",
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "moescope.cli",
                          "train", str(cfg), "--experiment", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for stage in ("base", "arms/dense", "arms/moe"):
        a = read_metrics(tmp_path / "one" / stage / "metrics.jsonl", "train")
        b = read_metrics(tmp_path / "two" / stage / "metrics.jsonl", "train")
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):  # same batches, gradients averaged over processes, LB counts all-reduced
            assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
            for layer, v in ra.get("load_balance_loss", {}).items():
                assert rb["load_balance_loss"][layer] == pytest.approx(v, abs=1e-4)
    assert '"world_size": 2' in (tmp_path / "two" / "arms" / "moe" / "config.json").read_text()
