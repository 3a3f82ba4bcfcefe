"""The HTML report renders offline, embeds its plots and has a working token viewer."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from moescope.report.content import Figure, ReportContent, Section, Table
from moescope.report.write import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _heatmap(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(np.random.default_rng(0).random((3, 8)), cmap="viridis")
    ax.set_title("P(expert | domain)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _content(tmp_path: Path) -> ReportContent:
    viewer = {"arms": {"moe": {"layers": [2, 3], "n_experts": 8, "samples": [
        {"domain": "code", "text_id": "c1", "tokens": ["def", " f", "(x", "):", "</script>"],
         "experts": {"2": [0, 0, 1, 1, 2], "3": [5, 6, 7, 5, 6]},
         "probs": {"2": [0.9, 0.8, 0.5, 0.4, 1.0], "3": [0.3, 0.3, 0.3, 0.3, 0.3]}},
        {"domain": "prose", "text_id": "p1", "tokens": ["The", " cat"],
         "experts": {"2": [3, 3], "3": [4, 4]}, "probs": {"2": [0.7, 0.7], "3": [0.6, 0.6]}},
    ]}}}
    return ReportContent(
        title="moescope test report", subtitle="synthetic",
        headline=["moe: NMI 0.31 [0.28, 0.35], p < 0.001"],
        sections=[Section("Specialization", ["text & <b>escaped</b>"],
                          figures=[Figure("heatmap", _heatmap(tmp_path / "heat.png"), "caption")],
                          tables=[Table("Loss", ["arm", "loss"], [["dense", 2.5], ["moe", 2.4]])])],
        viewer=viewer, provenance={"seed": 0},
    )


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    path = write_report(_content(tmp_path), tmp_path / "report")
    page = path.read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r'src="(?!data:)', page), "every resource must be inlined"
    assert "text &amp; &lt;b&gt;escaped&lt;/b&gt;" in page
    # The viewer's JSON may hold "</script>" as a token; it must not end the script tag.
    assert page.count("</script>") == 3
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| dense | 2.5 |" in md and "figures/heat.png" in md
    assert (tmp_path / "report" / "figures" / "heat.png").is_file()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    path = write_report(_content(tmp_path), tmp_path / "report")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(path.as_uri())
        img = page.locator("figure img").first
        assert img.is_visible()
        assert page.evaluate("document.querySelector('figure img').naturalWidth") > 100
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot), full_page=True)
        pixels = plt.imread(shot)
        assert pixels.std() > 0.05, "screenshot is blank"

        tokens = page.locator("#viewer-samples .tok")
        assert tokens.count() == 7
        before = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        page.select_option("#viewer-layer", "3")
        after = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert before != after and len(set(after)) > 1
        # Hover shows the expert and the router probability.
        tokens.first.hover()
        assert "expert 5" in page.locator("#tip").inner_text()
        assert "p = 0.300" in page.locator("#tip").inner_text()
        # The domain filter hides the other domain's sample.
        page.select_option("#viewer-domain", "prose")
        assert page.locator("#viewer-samples .sample").count() == 1
        browser.close()


HOSTILE = ["m<!--<script>", "</script><b>x</b>", "a&amp;b", "line\u2028sep\u2029para", "<!-- x -->"]


def test_embedded_json_survives_hostile_text(tmp_path: Path) -> None:
    """Domain names and token texts that would open a comment or close the script tag
    come back unchanged from the page's JSON, and the page keeps its provenance."""
    from moescope.report.html import json_for_script, render_html

    viewer = {"arms": {"moe": {"layers": [0], "n_experts": 2, "samples": [
        {"domain": name, "text_id": name, "tokens": [name, "ok"], "experts": {"0": [0, 1]}, "probs": {"0": [0.5, 0.5]}}
        for name in HOSTILE]}}}
    page = render_html(ReportContent(title="t", viewer=viewer, provenance={"domains": HOSTILE}))
    blob = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob) == viewer
    assert not re.search("[<>&\u2028\u2029]", blob)
    assert json.loads(json_for_script(HOSTILE)) == HOSTILE
    # everything after the viewer is still there: the provenance block and the closing tags
    assert page.count("</script>") == 3 and "Provenance" in page and page.rstrip().endswith("</html>")


def test_markdown_table_cells_stay_one_cell() -> None:
    """Token text in a cell ('|', a newline) must not split the summary.md table row."""
    from moescope.report.content import ReportContent, Section, Table
    from moescope.report.html import render_markdown

    content = ReportContent(title="t", subtitle="s", headline=[], sections=[Section(
        "S", tables=[Table("T", ["expert", "tokens"], [[1, "'|' 90% (9/10)\nnext"]])])])
    row = next(line for line in render_markdown(content).splitlines() if line.startswith("| 1"))
    assert row == "| 1 | '\\|' 90% (9/10) next |"
