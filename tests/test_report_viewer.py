"""The token viewer of a released-model shape (24 layers, 64 experts, top-8) works in headless Chromium."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from moescope.report.content import ReportContent
from moescope.report.write import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
N_LAYERS = 24


@pytest.fixture(scope="module")
def viewer_page(tmp_path_factory: pytest.TempPathFactory):
    from report_fixtures import DOMAINS, planted_table

    from moescope.analysis.viewer import viewer_arm

    tables = {i: planted_table(i, strength=3.0) for i in range(N_LAYERS)}
    pieces = {row: [f"w{row}_{j} " for j in range(48)] for row in range(10)}
    viewer = {"arms": {"olmoe": viewer_arm(tables, list(range(5)), DOMAINS, pieces)}}
    out = tmp_path_factory.mktemp("viewer")
    path = write_report(ReportContent(title="viewer", viewer=viewer, provenance={"domains": DOMAINS}), out)
    return path, tables, viewer


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_viewer_64_experts_top8_in_headless_chromium(viewer_page) -> None:
    from playwright.sync_api import sync_playwright

    from report_fixtures import DOMAINS

    path, tables, viewer = viewer_page
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        # the hostile domain name neither breaks the JSON nor swallows the provenance
        assert page.locator("details.prov").count() == 1
        assert DOMAINS[2] in page.locator("#viewer-domain").inner_text()
        # a selector over all 24 layers; the arrows step through them
        assert page.locator("#viewer-layer option").count() == N_LAYERS
        page.click("#viewer-next")
        page.click("#viewer-next")
        assert page.input_value("#viewer-layer") == "2"
        # > 20 experts: coloured by dominant domain; the legend lists each domain's top experts
        assert page.input_value("#viewer-colour") == "domain"
        rows = page.locator("#viewer-legend .legend-row")
        assert rows.count() == 5
        for d in range(5):  # planted: domain d owns experts 8d .. 8d+7, listed strongest first
            text = rows.nth(d).inner_text()
            assert text.startswith(f"{DOMAINS[d]} (")
            listed = [int(e) for e in re.findall(r"e(\d+) \d\.\d\d", text)]
            assert len(listed) == 6 and all(8 * d <= e < 8 * d + 8 for e in listed), text
        tokens = page.locator("#viewer-samples .tok")
        assert tokens.count() == 5 * 48
        colours = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert len(set(colours)) > 20
        # hover: all 8 experts with their gate weights, as stored
        sample = 1  # block 1: domain "math"
        tok = page.locator("#viewer-samples .sample").nth(sample).locator(".tok").nth(5)
        tok.hover()
        tip = page.locator("#tip").inner_text()
        lines = [ln.split() for ln in tip.splitlines() if ln.strip().startswith("expert ")]
        t = tables[2]
        row = np.flatnonzero(t.block == sample)[5]
        assert [int(ln[1]) for ln in lines] == t.expert_index[row].tolist()
        np.testing.assert_allclose([float(ln[2]) for ln in lines], t.gate_weight[row], atol=0.006)
        assert "top-8 experts" in tip
        # switching to colour by expert id gives one colour per first-choice expert
        page.select_option("#viewer-colour", "expert")
        by_id = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert by_id != colours and len(set(by_id)) > 20
        assert not errors, errors
        browser.close()
