"""`moescope demo` end to end on a tiny configuration: data -> base -> arms -> analysis -> report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moescope.cli import main
from moescope.demo import format_summary_table, load_demo_config, run_demo
from moescope.errors import MoescopeError
from moescope.io.config import parse_overrides

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

TINY = [
    "data.block_size_tokens=32",
    "data.tokenizer.vocab_size=512",
    "data.domains=[{name: code, target_texts: 80, target_mb: null}, {name: math, target_texts: 160, target_mb: null},"
    " {name: prose, target_texts: 60, target_mb: null}]",
    "experiment.base.steps=12",
    "experiment.model.n_layers=2", "experiment.model.d_model=32", "experiment.model.n_heads=2",
    "experiment.model.context_tokens=32",
    "experiment.moe.n_experts=4", "experiment.moe.layers=[1]",
    "experiment.train.steps=12", "experiment.train.batch_sequences=8", "experiment.train.eval_every_steps=6",
    "experiment.train.checkpoint_every_steps=6", "experiment.train.eval_max_blocks_per_domain=8",
    "experiment.tracking.progress_bar=false",
    "analysis.max_blocks_per_domain=24", "analysis.saturation_max_blocks_per_domain=4",
    "analysis.format_test_max_texts=6", "cluster.capture.n_batches=2", "cluster.capture.tokens_per_batch=256", "analysis.statistics.n_resamples=200", "analysis.statistics.n_permutations=200",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    cfg = load_demo_config("demo", parse_overrides(TINY))
    return out, run_demo(cfg, out, progress=False)


def test_demo_writes_every_stage_and_provenance(demo_run: tuple[Path, dict]) -> None:
    out, result = demo_run
    run = out / "run"
    for path in ["data/manifest.json", "run/experiment.json", "run/environment.json", "run/data_manifest.json",
                 "run/analysis/metrics.json", "run/analysis/viewer.json", "run/report/report.html",
                 "run/report/summary.md", "demo_config.json", "demo_summary.json"]:
        assert (out / path).is_file(), path
    for arm in ("dense", "moe", "moe-nolb"):
        assert (run / "arms" / arm / "final").is_dir()
    metrics = json.loads((run / "analysis" / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"dense", "moe", "moe-nolb"}
    assert metrics["arms"]["dense"]["kind"] == "dense" and metrics["arms"]["moe"]["kind"] == "moe"
    assert [r["arm"] for r in result["rows"]] == ["dense", "moe", "moe-nolb"]
    table = format_summary_table(result["rows"])
    assert "moe-nolb" in table and "NMI" in table and "loss - dense" in table
    # The paired difference is the difference of the two arms' domain-weighted losses, block for block.
    for arm in ("moe", "moe-nolb"):
        diff = metrics["arms"][arm]["eval_loss_vs_dense"]
        own, dense = (metrics["arms"][a]["eval_loss"]["domain_weighted"]["estimate"] for a in (arm, "dense"))
        assert diff["reference"] == "dense" and diff["domain_weighted"]["estimate"] == pytest.approx(own - dense)
        assert diff["domain_weighted"]["low"] <= diff["domain_weighted"]["estimate"] <= diff["domain_weighted"]["high"]
        assert set(diff["domains"]) == set(metrics["domains"]) and 0 < diff["pvalue"] <= 1
    assert "eval_loss_vs_dense" not in metrics["arms"]["dense"]
    row = {r["arm"]: r for r in result["rows"]}["moe"]
    assert f"{row['loss_vs_dense']['estimate']:+.4f}" in table
    # The resolved config is what ran: the data manifest and the experiment agree with it.
    resolved = json.loads((out / "demo_config.json").read_text())["config"]
    assert resolved["data"]["block_size_tokens"] == 32
    assert json.loads((run / "experiment.json").read_text())["experiment"]["train"]["steps"] == 12
    page = (run / "report" / "report.html").read_text()
    assert (run / "cluster" / "cluster_summary.json").is_file()
    assert "Expert pathways" in page and "distance_vs_k" not in page  # figure inlined, not linked
    assert "paired over the same" in page and "sign-flip" in page
    assert "What this run shows" in page and "viewer-data" in page and page.count("data:image/png;base64,") >= 4


def test_demo_refuses_a_different_config_in_the_same_directory(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    cfg = load_demo_config("demo", parse_overrides(TINY + ["experiment.train.steps=13"]))
    with pytest.raises(MoescopeError, match="different configuration"):
        run_demo(cfg, out, progress=False)


def test_unknown_preset_and_key_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--scale", "nonexistent"]) == 2
    assert "unknown demo preset 'nonexistent'" in capsys.readouterr().err
    with pytest.raises(MoescopeError, match="did you mean 'steps'"):
        load_demo_config("demo", parse_overrides(["experiment.train.stepz=3"]))
    # the GPU preset parses into the same dataclasses
    cfg = load_demo_config("gpt2")
    assert cfg.experiment.base.init == "gpt2" and cfg.experiment.moe.layers == [8, 9, 10, 11]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_demo_report_in_headless_chromium(demo_run: tuple[Path, dict], tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from playwright.sync_api import sync_playwright

    out, _ = demo_run
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((out / "run" / "report" / "report.html").as_uri())
        heatmap = page.locator("img[alt='P(expert | domain)']")
        assert heatmap.is_visible()
        assert page.evaluate("document.querySelector(\"img[alt='P(expert | domain)']\").naturalWidth") > 200
        heatmap.scroll_into_view_if_needed()
        shot = tmp_path / "heatmap.png"
        heatmap.screenshot(path=str(shot))
        assert plt.imread(shot).std() > 0.05, "heatmap renders blank"
        tokens = page.locator("#viewer-samples .tok")
        assert tokens.count() > 20
        # switch arms: moe-nolb collapsed or not, its colours differ from moe's somewhere
        before = tokens.evaluate_all("els => els.map(e => e.dataset.expert)")
        page.select_option("#viewer-arm", "moe-nolb")
        after = page.locator("#viewer-samples .tok").evaluate_all("els => els.map(e => e.dataset.expert)")
        assert len(before) == len(after) and before != after
        browser.close()


def test_failed_gpt2_demo_leaves_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Offline, the gpt2 preset's Hugging Face datasets cannot be reached: the study cannot start.
    out = tmp_path / "g2"
    assert main(["demo", "--scale", "gpt2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moescope: error:")
    assert not out.exists()
    # an existing, empty --out stays, but nothing is written into it
    out.mkdir()
    assert main(["demo", "--scale", "gpt2", "--out", str(out)]) == 2
    assert list(out.iterdir()) == []


def test_summary_table_adds_the_step_0_nmi_as_a_last_column_and_keeps_the_others() -> None:
    from moescope.demo import summary_rows

    def iv(e: float, lo: float, hi: float) -> dict:
        return {"estimate": e, "low": lo, "high": hi}

    layers = {"2": {"specialization": {"nmi": iv(0.476, 0.467, 0.488)}, "load": {"load_cv": iv(0.33, 0.31, 0.35)}}}
    head = {"best_layer": 2, "nmi": iv(0.476, 0.467, 0.488), "nmi_pvalue": 0.000999, "load_cv_max": 0.33,
            "max_fraction_max": 0.12}
    metrics = {"arms": {"dense": {"kind": "dense", "eval_loss": {"domain_weighted": iv(3.781, 3.745, 3.816)}},
                        "moe": {"kind": "moe", "eval_loss": {"domain_weighted": iv(3.812, 3.775, 3.847)},
                                "headline": head, "layers": layers}}}
    before = format_summary_table(summary_rows(metrics)).splitlines()
    assert "step 0" not in before[0]  # no snapshot, no column: the table as it was
    head["nmi_start"] = iv(0.432, 0.42, 0.444)
    after = format_summary_table(summary_rows(metrics)).splitlines()
    assert after[0] == before[0] + "  NMI at step 0 (same layer)"
    assert after[3] == f"{before[3]:<{len(after[0]) - len('  NMI at step 0 (same layer)')}}  0.432 [0.420, 0.444]"
    assert after[2].startswith(before[2]) and after[2].endswith("  -")
