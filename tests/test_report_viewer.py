"""The token viewer of a released-model shape (24 layers, 64 experts, top-8) works in headless Chromium."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import planted_table

from moescope.report.content import ReportContent
from moescope.report.write import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
N_LAYERS = 24


def open_page(pw, path: Path):
    """(browser, page showing ``path``, list collecting the page's script errors) in headless Chromium."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    return browser, page, errors


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
        browser, page, errors = open_page(pw, path)
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


def expert_choice_table(seed: int, *, n_blocks: int = 6, block_len: int = 40, n_exp: int = 4,
                        k: int = 1, alpha: float = 3.0) -> "RoutingTable":
    """Expert choice as the layer records it: each expert takes its top-C tokens of the table by router
    probability; expert_index holds up to k taken experts, highest probability first, then the router's
    next choices with gate 0 (an unrouted token: only those)."""
    from moescope.analysis.table import RoutingTable

    rng = np.random.default_rng(seed)
    n = n_blocks * block_len
    probs = rng.dirichlet(np.ones(n_exp) * alpha, size=n)
    capacity = int(0.75 * k * n / n_exp)  # capacity factor 0.75: some tokens unrouted
    taken = np.zeros((n, n_exp), dtype=bool)
    for e in range(n_exp):
        taken[np.argsort(-probs[:, e])[:capacity], e] = True
    top = np.argsort(-(taken * 2.0 + probs), axis=1)[:, :k]
    gate = np.where(np.take_along_axis(taken, top, axis=1), np.take_along_axis(probs, top, axis=1), 0.0)
    block = np.repeat(np.arange(n_blocks), block_len)
    return RoutingTable(
        token_id=rng.integers(0, 100, n), block=block, position=np.tile(np.arange(block_len), n_blocks),
        domain=block % 3, expert_index=top, gate_weight=gate, router_probs=probs,
        experts_per_token=taken.sum(axis=1),
    )


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_viewer_marks_expert_choice_unrouted_tokens_in_headless_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from moescope.analysis.viewer import viewer_arm

    tables = {2: expert_choice_table(0), 3: expert_choice_table(1)}
    pieces = {row: [f"w{row}_{j} " for j in range(40)] for row in range(6)}
    domains = ["code", "math", "prose"]
    tables_top2 = {2: expert_choice_table(2, n_exp=8, k=2, alpha=10.0)}  # tokens taken by 0 .. 4 experts
    viewer = {"arms": {"moe-ec": viewer_arm(tables, list(range(6)), domains, pieces),
                       "moe-ec-top2": viewer_arm(tables_top2, list(range(6)), domains, pieces),
                       "moe": viewer_arm({2: planted_table(2, n_blocks=6, block_len=40, n_exp=4, k=1,
                                                           n_domains=3)}, list(range(6)), domains, pieces)}}
    path = write_report(ReportContent(title="ec", viewer=viewer), tmp_path)
    layer2 = tables[2]
    counts = np.asarray(layer2.experts_per_token)  # blocks 0..5 in order, positions in order
    assert (counts == 0).any() and (counts >= 2).any() and (counts == 1).any()
    with sync_playwright() as pw:
        browser, page, errors = open_page(pw, path)
        assert "moe-ec" in page.locator("#viewer-expert-choice").inner_text()
        assert page.input_value("#viewer-arm") == "moe-ec" and page.input_value("#viewer-layer") == "2"
        tokens = page.locator("#viewer-samples .tok")
        assert tokens.count() == counts.size
        # every token no expert selected, and only those, is marked and hatched
        marked = tokens.evaluate_all("els => els.map(e => e.classList.contains('unrouted'))")
        np.testing.assert_array_equal(marked, counts == 0)
        hatch = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundImage)")
        assert all(("repeating-linear-gradient" in h) == (c == 0) for h, c in zip(hatch, counts))
        taken = tokens.evaluate_all("els => els.map(e => Number(e.dataset.taken))")
        np.testing.assert_array_equal(taken, counts)
        multi = tokens.evaluate_all("els => els.map(e => e.classList.contains('multi'))")
        np.testing.assert_array_equal(multi, counts >= 2)
        # hover texts: unrouted, and taken by several experts
        j0 = int(np.flatnonzero(counts == 0)[0])
        tokens.nth(j0).hover()
        tip = page.locator("#tip").inner_text()
        assert "not routed (expert choice: no expert selected this token)" in tip
        assert f"its router preferred expert {layer2.expert_index[j0, 0]}" in tip
        j2 = int(np.flatnonzero(counts >= 2)[0])
        tokens.nth(j2).hover()
        assert f"taken by {counts[j2]} experts (expert choice)" in page.locator("#tip").inner_text()
        # the legend explains the marking and gives the layer's unrouted share
        legend = page.locator("#viewer-legend-choice").inner_text()
        share = viewer["arms"]["moe-ec"]["unrouted_fraction"]["2"]
        assert "not routed" in legend and f"{100 * share:.1f}% of held-out tokens in layer 2" in legend
        # colour by the number of experts that took each token: one colour per count
        page.select_option("#viewer-colour", "taken")
        bg = tokens.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
        by_count = {}
        for colour, c in zip(bg, counts):
            if c > 0:
                by_count.setdefault(int(c), set()).add(colour)
        assert all(len(v) == 1 for v in by_count.values()) and len({next(iter(v)) for v in by_count.values()}) == len(by_count)
        assert page.locator("#viewer-legend-choice span").count() == 1 + max(by_count)
        # a token-choice arm has no such option and no marking
        page.select_option("#viewer-arm", "moe")
        assert page.locator("#viewer-colour option[value='taken']").count() == 0
        assert page.locator("#viewer-samples .tok.unrouted").count() == 0
        assert page.locator("#viewer-legend-choice").count() == 0
        page.select_option("#viewer-arm", "moe-ec")
        assert page.locator("#viewer-colour option[value='taken']").count() == 1
        # expert choice with k = 2 stored experts: the hover lists only experts that took the token
        page.select_option("#viewer-arm", "moe-ec-top2")
        top2 = tables_top2[2]
        n2 = np.asarray(top2.experts_per_token)
        for count in (0, 1, int(n2.max())):
            j = int(np.flatnonzero(n2 == count)[0])
            tokens.nth(j).hover()
            tip = page.locator("#tip").inner_text()
            listed = [int(ln.split()[1]) for ln in tip.splitlines() if ln.strip().startswith("expert ")]
            assert listed == top2.expert_index[j, :min(count, 2)].tolist(), tip
            if count == 0:
                assert "not routed (expert choice: no expert selected this token)" in tip
            else:
                assert f"taken by {count} expert" in tip
        assert n2.max() > 2 and "the 2 with the highest router probability" in tip
        assert not errors, errors
        browser.close()
