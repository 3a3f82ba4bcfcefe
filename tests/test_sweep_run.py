"""`moescope sweep` end to end on a tiny study: cells, a shared base, resume, the pool and submitit paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_demo_pipeline import TINY

from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.io.config import parse_overrides
from moescope.sweep.runner import load_sweep, run_sweep

# The demo test's tiny study, smaller still: two arms, fewer steps, a lighter analysis.
SETTINGS = TINY + ["experiment.arms=[dense, moe]", "cluster_arm=null", "experiment.base.steps=6",
                   "experiment.train.steps=6", "experiment.train.eval_every_steps=3",
                   "experiment.train.checkpoint_every_steps=3", "analysis.max_blocks_per_domain=8",
                   "analysis.saturation_max_blocks_per_domain=2", "analysis.format_test_max_texts=2",
                   "analysis.statistics.n_resamples=50", "analysis.statistics.n_permutations=50"]
GRID = ["experiment.moe.upcycle_noise_rel=0,1.0"]


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/result.json"))}


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    args = ["sweep", "demo", "--out", str(out), "--seeds", "0"]
    for g in GRID:
        args += ["--grid", g]
    for s in SETTINGS:
        args += ["--set", s]
    assert main(args) == 0
    return out


def test_sweep_runs_every_cell_on_one_shared_base(sweep_run: Path) -> None:
    out = sweep_run
    results = _results(out)
    assert sorted(results) == ["moe.upcycle_noise_rel=0,seed=0", "moe.upcycle_noise_rel=1,seed=0"]
    bases = list((out / "bases").iterdir())
    assert len(bases) == 1  # both cells differ only in an arm setting: one base stage trained
    shared = (bases[0] / "final" / "model.safetensors").read_bytes()
    for cell in results:
        run = out / "cells" / cell / "run"
        assert (run / "base" / "final" / "model.safetensors").read_bytes() == shared
        assert not (run / "base" / "checkpoints").exists()
        exp = json.loads((run / "experiment.json").read_text())
        assert exp["experiment"]["moe"]["upcycle_noise_rel"] == float(cell.split("=")[1].split(",")[0])
    # the upcycling noise changed the moe arm, so the two cells' paired differences differ
    diffs = [next(r for r in res["rows"] if r["arm"] == "moe")["loss_vs_dense"]["estimate"] for res in results.values()]
    assert diffs[0] != diffs[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cells_finished"] == 2 and "t interval" in summary["interval"].replace("-", " ")
    moe_rows = [r for r in summary["rows"] if r["arm"] == "moe"]
    assert len(moe_rows) == 2 and all(r["loss_vs_dense"]["n"] == 1 for r in moe_rows)
    md = (out / "summary.md").read_text()
    assert "loss - dense (paired)" in md and f"{moe_rows[0]['loss_vs_dense']['mean']:+.4f}" in md
    assert (out / "figures" / "nmi_vs_loss_difference.png").stat().st_size > 1000


def test_finished_cells_are_never_rerun(sweep_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moescope.demo

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(moescope.demo, "train_and_analyze", boom)
    before = _results(sweep_run)
    study, scfg = load_sweep("demo", GRID, [0], parse_overrides(SETTINGS))
    run_sweep(study, scfg, sweep_run)
    assert _results(sweep_run) == before


def test_a_cell_written_before_a_setting_existed_still_counts_as_finished(
        sweep_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import moescope.demo

    def boom(*a, **k):
        raise AssertionError("a finished cell was run again")

    out = tmp_path / "old"
    shutil.copytree(sweep_run, out)
    for cell_json in out.glob("cells/*/cell.json"):  # as an earlier moescope wrote it
        stored = json.loads(cell_json.read_text())
        del stored["config"]["experiment"]["train"]["eval_batch_order"]
        del stored["config"]["analysis"]["batch_order"]
        cell_json.write_text(json.dumps(stored))
    monkeypatch.setattr(moescope.demo, "train_and_analyze", boom)
    before = _results(out)
    study, scfg = load_sweep("demo", GRID, [0], parse_overrides(SETTINGS))
    run_sweep(study, scfg, out)
    assert _results(out) == before


def test_a_cell_directory_keeps_its_config(sweep_run: Path) -> None:
    study, scfg = load_sweep("demo", GRID, [0], parse_overrides(SETTINGS + ["experiment.train.steps=13"]))
    with pytest.raises(MoescopeError, match="another configuration"):
        run_sweep(study, scfg, sweep_run)
    # a misspelt grid key is refused before anything is written
    study, scfg = load_sweep("demo", ["experiment.moe.upcycle_noise_rell=0,1"], [0], parse_overrides(SETTINGS))
    with pytest.raises(MoescopeError, match="did you mean"):
        run_sweep(study, scfg, sweep_run / "never")
    assert not (sweep_run / "never").exists()


def test_submitit_local_executor_and_process_pool_continue_unfinished_cells(sweep_run: Path) -> None:
    # A cell whose result is missing (killed after training) is finished in a worker: the trainer finds
    # its stages complete and the analysis reruns, giving the same numbers.
    before = _results(sweep_run)
    cell = "moe.upcycle_noise_rel=1,seed=0"
    (sweep_run / "cells" / cell / "result.json").unlink()
    study, scfg = load_sweep("demo", GRID, [0], parse_overrides(SETTINGS))
    run_sweep(study, scfg, sweep_run, executor="submitit-local", executor_params={"timeout_min": 20})
    assert list((sweep_run / "submitit").iterdir())  # the job really went through submitit
    after = _results(sweep_run)
    assert after[cell]["rows"] == before[cell]["rows"]
    for name in before:
        (sweep_run / "cells" / name / "result.json").unlink()
    run_sweep(study, scfg, sweep_run, workers=2)
    assert {k: v["rows"] for k, v in _results(sweep_run).items()} == {k: v["rows"] for k, v in before.items()}


@pytest.mark.slow
def test_a_killed_sweep_continues(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "moescope.cli", "sweep", "demo", "--out", str(out), "--seeds", "0",
           "--grid", "experiment.moe.upcycle_noise_rel=0,0.5"]
    for s in SETTINGS + ["experiment.train.steps=30", "experiment.train.checkpoint_every_steps=5"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    # kill while the second cell trains: the first is finished, the second has checkpoints
    while time.monotonic() < deadline and not list((out / "cells").glob("*0.5*/run/arms/*/checkpoints/*")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _results(out)
    assert len(first) == 1
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert _results(out)[next(iter(first))] == next(iter(first.values()))
    assert len(_results(out)) == 2


@pytest.mark.slow
def test_shared_stages_give_the_same_cell_as_training_it_alone(sweep_run: Path, tmp_path: Path) -> None:
    # The base and the dense arm were trained once and copied; one cell trained on its own must match.
    study, scfg = load_sweep("demo", ["experiment.moe.upcycle_noise_rel=1.0"], [0], parse_overrides(SETTINGS))
    scfg.share_base = False
    run_sweep(study, scfg, tmp_path / "alone")
    cell = "moe.upcycle_noise_rel=1,seed=0"
    alone, shared = tmp_path / "alone" / "cells" / cell / "run", sweep_run / "cells" / cell / "run"
    for stage in ("base", "arms/dense", "arms/moe"):
        assert (alone / stage / "final" / "model.safetensors").read_bytes() == \
            (shared / stage / "final" / "model.safetensors").read_bytes(), stage
    assert _results(tmp_path / "alone")[cell]["rows"] == _results(sweep_run)[cell]["rows"]
    assert not (tmp_path / "alone" / "bases").exists()


def test_summary_rows_are_read_again_from_the_analysis_and_a_corrupt_one_is_named(
    sweep_run: Path, tmp_path: Path
) -> None:
    """A cell finished before the per-layer columns existed gets them from its metrics.json; a corrupt
    metrics.json stops the summary with one error naming the file."""
    from moescope.errors import MoescopeError
    from moescope.sweep.runner import _current_rows

    result = next(iter(_results(sweep_run).values()))
    old = {**result, "rows": [{k: v for k, v in r.items() if k != "layers"} for r in result["rows"]]}
    moe = next(r for r in _current_rows(old)["rows"] if r["arm"] == "moe")
    assert moe["layers"] and all(set(v) == {"nmi", "load_cv"} for v in moe["layers"].values())
    bad = tmp_path / "run" / "analysis" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"arms": {"moe": {"kind": "moe"}}}')
    with pytest.raises(MoescopeError, match="metrics.json: not a moescope analysis"):
        _current_rows({**result, "run_dir": str(tmp_path / "run")})
