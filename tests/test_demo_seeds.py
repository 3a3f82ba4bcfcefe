"""`moescope demo --seeds N`: the study over several seeds with the between-seed spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_demo_pipeline import TINY

from moescope.cli import main


@pytest.mark.slow
def test_demo_over_two_seeds_reports_the_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--seeds", "2", "--out", str(out)]
    for s in TINY + ["experiment.arms=[dense, moe]"]:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "over 2 seeds (0, 1)" in printed and "loss - dense (paired)" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    moe = next(r for r in summary["rows"] if r["arm"] == "moe")
    assert moe["seeds"] == [0, 1] and moe["loss_vs_dense"]["n"] == 2
    assert moe["loss_vs_dense"]["low"] <= moe["loss_vs_dense"]["mean"] <= moe["loss_vs_dense"]["high"]
    for report in summary["reports"]:
        page = Path(report).read_text()
        assert "Over seeds" in page and "t-interval" in page
    assert len(summary["reports"]) == 2
    # rerun: every seed is finished, nothing trains again, same numbers
    assert main(args) == 0
    assert json.loads((out / "demo_summary.json").read_text())["rows"] == summary["rows"]


def test_a_study_is_the_same_whatever_the_spelling_of_its_data_path() -> None:
    """demo / sweep resume: OUT/data spelled relative, absolute or after a move is the same study;
    any other setting is not."""
    from moescope.demo import load_demo_config, same_study
    from moescope.io.config import to_dict

    cfg = to_dict(load_demo_config("demo"))
    here = {**cfg, "experiment": {**cfg["experiment"], "data_dir": "runs/demo/data"}}
    there = {**cfg, "experiment": {**cfg["experiment"], "data_dir": "/elsewhere/runs/demo/data"}}
    assert same_study(here, there)
    other = {**there, "experiment": {**there["experiment"], "arms": ["dense"]}}
    assert not same_study(here, other) and not same_study(None, here)


def test_a_bad_setting_is_refused_before_the_data_build_writes_anything(tmp_path) -> None:
    from moescope.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", "experiment.train.steps=-1"]) == 2
    assert not out.exists()
