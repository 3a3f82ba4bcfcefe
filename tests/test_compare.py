"""`moescope compare`: two analyses side by side, router saturation from saved routing tables."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moescope.analysis.capture import save_table
from moescope.analysis.summary import SummaryConfig, summarize_layer
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.report.compare import build_comparison
from report_fixtures import DOMAINS, planted_table

CFG = SummaryConfig(n_resamples=50, n_permutations=99, vocab_min_count=3)
LAYERS = (0, 1, 2)


def write_analysis(out: Path, tables: dict, arm: str = "model") -> Path:
    layers = {str(i): summarize_layer(t, DOMAINS, CFG) for i, t in tables.items()}
    (out / "analysis").mkdir(parents=True)
    (out / "analysis" / "metrics.json").write_text(json.dumps(
        {"domains": DOMAINS, "arms": {arm: {"kind": "moe", "layers": layers}}}))
    for i, t in tables.items():
        save_table(t, out / "analysis" / "routing" / arm / f"{i}.npz")
    return out


def not_chosen(expert_index: np.ndarray, n_experts: int) -> np.ndarray:
    """For every token, the smallest expert id outside its top-k."""
    chosen = np.zeros((expert_index.shape[0], n_experts), dtype=bool)
    chosen[np.arange(expert_index.shape[0])[:, None], expert_index] = True
    return (~chosen).argmax(axis=1)


@pytest.fixture(scope="module")
def analyses(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    final = {i: planted_table(i, strength=1.0 + i) for i in LAYERS}
    ckpt = {}
    for i, t in final.items():
        idx = t.expert_index.copy()
        if i == 1:
            # every token of even position swaps its last (8th) expert for one it did not choose:
            # overlap 7/8 there, 1 elsewhere -> (7/8 + 1) / 2 = 0.9375
            even = t.position % 2 == 0
            idx[even, -1] = not_chosen(idx, 64)[even]
        ckpt_table = replace(t, expert_index=idx)
        order = np.random.default_rng(i).permutation(t.n_tokens)  # saved in another row order
        ckpt[i] = ckpt_table.select(order)
    return write_analysis(root / "ckpt-100", ckpt), write_analysis(root / "final", final)


def test_two_analyses_side_by_side_with_saturation(analyses: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, final = analyses
    page = build_comparison([ckpt, final], tmp_path / "cmp", saturation=True).read_text()
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    sat = result["saturation"]
    assert sat["reference"] == "final" and sat["baseline"] == pytest.approx(8 / 64)
    assert sat["layers"]["ckpt-100"]["0"] == 1.0 and sat["layers"]["ckpt-100"]["2"] == 1.0
    assert sat["layers"]["ckpt-100"]["1"] == pytest.approx(0.9375)
    assert "ckpt-100" in page and "final" in page and "Analyses side by side" in page
    assert "router saturation against final = 0.979" in page  # (1 + 0.9375 + 1) / 3
    assert page.count("data:image/png;base64,") == 2  # per-layer curves + saturation
    assert (tmp_path / "cmp" / "figures" / "layer_curves.png").is_file()


def test_saturation_refuses_different_tokens(analyses: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, final = analyses
    other = {i: replace(t, token_id=t.token_id + 1) for i, t in ((i, planted_table(i)) for i in LAYERS)}
    foreign = write_analysis(tmp_path / "foreign", other)
    with pytest.raises(MoescopeError, match="different tokens.*token_id differs"):
        build_comparison([foreign, final], tmp_path / "cmp", saturation=True)
    assert not (tmp_path / "cmp").exists(), "nothing is written before the inputs are checked"
    # without --saturation different models compare fine
    assert build_comparison([foreign, final], tmp_path / "cmp2").is_file()


def test_compare_cli(analyses: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, final = analyses
    assert main(["compare", str(ckpt), str(final), "--out", str(tmp_path / "c"), "--label", "early",
                 "--label", "late", "--saturation"]) == 0
    assert "early" in (tmp_path / "c" / "comparison.html").read_text()
    assert main(["compare", str(ckpt), "--out", str(tmp_path / "d")]) == 2
    assert "at least two analyses" in capsys.readouterr().err
    assert main(["compare", str(ckpt), str(tmp_path / "missing"), "--out", str(tmp_path / "d")]) == 2
    assert "metrics.json not found" in capsys.readouterr().err


def _damaged_copy(src: Path, dst: Path, **columns) -> Path:
    """A copy of an analysis whose layer-1 routing table has `columns` replaced (raw=bytes: the whole file)."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "analysis" / "routing" / "model" / "1.npz"
    if "raw" in columns:
        path.write_bytes(columns["raw"])
        return path
    with np.load(path) as data:
        table = {k: data[k] for k in data.files}
    table.update({k: v(table[k]) for k, v in columns.items()})
    with open(path, "wb") as fh:
        np.savez(fh, **table)
    return path


@pytest.mark.parametrize("columns, says", [
    ({"raw": b""}, "not a routing table"),
    ({"raw": b"PK\x03\x04 truncated"}, "not a routing table"),
    ({"expert_index": lambda e: e[:5]}, "block has shape"),
    ({"expert_index": lambda e: e + 0.5}, "expert_index must hold integers, got float64"),
    ({"expert_index": lambda e: e - 100}, "is negative"),
    ({"expert_index": lambda e: e + 64}, "outside the layer's 64 experts"),
])
def test_saturation_refuses_a_damaged_routing_table_in_one_line(analyses: tuple[Path, Path], tmp_path: Path,
                                                                capsys, columns: dict, says: str) -> None:
    ckpt, final = analyses
    bad = _damaged_copy(ckpt, tmp_path / "bad", **columns)
    assert main(["compare", str(tmp_path / "bad"), str(final), "--saturation", "--out", str(tmp_path / "c")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"{bad}: " in err[0] and says in err[0], err
    assert not (tmp_path / "c").exists()


def test_saturation_refuses_analyses_with_different_expert_counts(analyses: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    ckpt, final = analyses
    other = shutil.copytree(ckpt, tmp_path / "other")
    metrics = json.loads((other / "analysis" / "metrics.json").read_text())
    metrics["arms"]["model"]["layers"]["0"]["n_experts"] = 32
    (other / "analysis" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(MoescopeError, match="layer 0 of other has 32 experts, of final 64"):
        build_comparison([other, final], tmp_path / "cmp", saturation=True)
    assert not (tmp_path / "cmp").exists()


def test_saturation_refuses_a_routing_table_of_another_analysis(analyses: tuple[Path, Path], tmp_path: Path,
                                                               capsys) -> None:
    """A routing table whose token count is not the one metrics.json gives for its layer (what an older
    moescope killed mid-analysis left: new tables beside the old metrics) is one line telling to re-analyse."""
    import shutil

    ckpt, final = analyses
    mixed = shutil.copytree(ckpt, tmp_path / "mixed")
    table = mixed / "analysis" / "routing" / "model" / "1.npz"
    save_table(planted_table(1).select(np.arange(100)), table)
    assert main(["compare", str(mixed), str(final), "--saturation", "--out", str(tmp_path / "c")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"{table}: 100 tokens" in err[0] and "run `moescope analyze` again" in err[0], err
    assert not (tmp_path / "c").exists()
