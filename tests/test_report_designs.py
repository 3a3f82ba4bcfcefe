"""The report renders for every MoE design of issue 20 (dense / moe / moe-shared / moe-fine / moe-ec):
a tiny experiment trained, analysed and reported end to end, then its token viewer opened in Chromium."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_analysis_pipeline import FAST, write_data
from test_report_viewer import CHROMIUM, open_page
from train_fixtures import tiny_experiment

DESIGNS = ["dense", "moe", "moe-shared", "moe-fine", "moe-ec"]


@pytest.fixture(scope="module")
def designs_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moescope.analysis.pipeline import analyze_run
    from moescope.report.build import build_report
    from moescope.train.experiment import run_experiment

    root = tmp_path_factory.mktemp("designs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster on a shared machine
    try:
        write_data(root / "data")
        run_experiment(tiny_experiment(root / "data", arms=DESIGNS), root / "run")
        analyze_run(root / "run", FAST, progress=False)
        build_report(root / "run")
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_report_renders_for_every_design(designs_run: Path) -> None:
    metrics = json.loads((designs_run / "analysis" / "metrics.json").read_text())
    assert list(metrics["arms"]) == DESIGNS
    layers = {arm: metrics["arms"][arm].get("layers", {}) for arm in DESIGNS}
    assert layers["dense"] == {}
    # tiny_experiment: 4 experts, top-1, MoE in block 1; fine = 4 slices each, shared = 1 of those slices
    assert (layers["moe"]["1"]["n_experts"], layers["moe"]["1"]["top_k"]) == (4, 1)
    assert (layers["moe-fine"]["1"]["n_experts"], layers["moe-fine"]["1"]["top_k"]) == (16, 4)
    assert layers["moe-fine"]["1"]["expert_parent"] == np.repeat(np.arange(4), 4).tolist()
    shared = layers["moe-shared"]["1"]
    assert (shared["n_experts"], shared["top_k"], shared["n_shared_experts"]) == (15, 3, 1)
    # only the expert-choice arm has unrouted tokens, and its count histogram covers every token
    assert [arm for arm in DESIGNS if "unrouted_fraction" in layers[arm].get("1", {}).get("load", {})] == ["moe-ec"]
    # expert choice routes a token by its batch: its held-out blocks (analysis and the trainer's evaluations) go
    # in domain-mixed batches, every other arm's domain by domain as before
    assert {arm: metrics["arms"][arm]["batch_order"] for arm in DESIGNS} == {
        arm: "mixed" if arm == "moe-ec" else "by_domain" for arm in DESIGNS}
    for arm in DESIGNS:
        evals = [json.loads(line) for line in (designs_run / "arms" / arm / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "eval"' in line]
        assert evals and {r["batch_order"] for r in evals} == {"mixed" if arm == "moe-ec" else "by_domain"}, arm
    # the last snapshot is the final model: routed through the same batches, its choices agree with themselves
    for arm in DESIGNS[1:]:
        sat = metrics["arms"][arm]["saturation"]
        assert sat["steps"][-1] == 6 and sat["layers"]["1"][-1] == pytest.approx(1.0), arm
        # expert choice: saturation over the experts' own (token, expert) assignments
        assert sat.get("counts") == ("assignments" if arm == "moe-ec" else None), arm
    ec_load = layers["moe-ec"]["1"]["load"]
    assert sum(ec_load["experts_per_token_counts"]) == layers["moe-ec"]["1"]["n_tokens"]
    assert ec_load["unrouted_fraction"]["estimate"] == pytest.approx(
        ec_load["experts_per_token_counts"][0] / layers["moe-ec"]["1"]["n_tokens"])

    page = (designs_run / "report" / "report.html").read_text()
    summary = (designs_run / "report" / "summary.md").read_text()
    for arm in DESIGNS[1:]:
        assert f"<li>{arm} (" in page or f"<li>{arm}:" in page, arm  # its own headline sentences
    assert f"no expert took, layer 1 {100 * ec_load['unrouted_fraction']['estimate']:.1f}%" in summary
    assert 'id="viewer-expert-choice"' in page
    assert html.escape("moe-ec (expert choice): the share of the final model's (token, expert) assignments") in page
    # consecutive tokens under expert choice: counted over the experts' own selection, against its chance
    rep = layers["moe-ec"]["1"]["repetition"]
    assert 0.0 <= rep["shared_assignment"]["estimate"] <= 1.0 and 0.0 < rep["shared_assignment_baseline"] < 1.0
    assert f"vs {rep['shared_assignment_baseline']:.3f} (shared)" in summary
    assert not any("shared_assignment" in layers[arm]["1"]["repetition"] for arm in DESIGNS[1:4])
    # the set-up names each arm's routed experts as trained, not the config's coarse count
    assert ("MoE arms: moe 4 experts, top-1; moe-shared 15 experts of 1/4 width, top-3 + 1 shared; "
            "moe-fine 16 experts of 1/4 width, top-4; moe-ec 4 experts, expert choice in layers [1]") in summary
    viewer = json.loads((designs_run / "analysis" / "viewer.json").read_text())
    assert list(viewer["arms"]) == DESIGNS[1:]
    assert [arm for arm, v in viewer["arms"].items() if v.get("routing") == "expert_choice"] == ["moe-ec"]
    assert viewer["arms"]["moe-shared"]["n_shared_experts"] == 1
    assert all("experts_per_token" in s for s in viewer["arms"]["moe-ec"]["samples"])
    assert not any("experts_per_token" in s for arm in DESIGNS[1:4] for s in viewer["arms"][arm]["samples"])


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_viewer_of_every_design_in_headless_chromium(designs_run: Path) -> None:
    from playwright.sync_api import sync_playwright

    viewer = json.loads((designs_run / "analysis" / "viewer.json").read_text())
    with sync_playwright() as pw:
        browser, page, errors = open_page(pw, designs_run / "report" / "report.html")
        for arm, data in viewer["arms"].items():
            page.select_option("#viewer-arm", arm)
            modes = page.locator("#viewer-colour option").evaluate_all("os => os.map(o => o.value)")
            assert ("taken" in modes) == (arm == "moe-ec"), (arm, modes)
            for mode in modes:
                page.select_option("#viewer-colour", mode)
                tokens = page.locator("#viewer-samples .tok")
                assert tokens.count() == sum(len(s["tokens"]) for s in data["samples"])
                unrouted = sum(n == 0 for s in data["samples"] for n in s.get("experts_per_token", {}).get("1", []))
                assert page.locator("#viewer-samples .tok.unrouted").count() == unrouted
                assert (unrouted > 0) == (arm == "moe-ec")  # capacity factor 1 leaves some tokens to no expert
                tokens.nth(3).hover()
                assert page.locator("#tip").inner_text().startswith("layer 1")
        assert not errors, errors
        browser.close()
