"""Sweep cells and their between-seed summaries (pure computation)."""

from __future__ import annotations

import math

import pytest

from moescope.sweep import grid


def test_parse_grid_item_keeps_commas_inside_lists() -> None:
    assert grid.parse_grid_item("experiment.moe.upcycle_noise_rel=0,0.1,1.0") == (
        "experiment.moe.upcycle_noise_rel", [0, 0.1, 1.0])
    assert grid.parse_grid_item("experiment.moe.layers=[2,3],[3]") == ("experiment.moe.layers", [[2, 3], [3]])
    for bad in ("novalue", "=1,2", "key="):
        with pytest.raises(ValueError):
            grid.parse_grid_item(bad)


def test_expand_cells_is_the_full_product_with_unique_ids() -> None:
    cells = grid.expand_cells({"experiment.moe.upcycle_noise_rel": [0.0, 0.5], "experiment.train.steps": [10, 20, 30]},
                              [0, 1])
    assert len(cells) == 12 and len({c.cell_id for c in cells}) == 12
    assert len({c.point_id for c in cells}) == 6
    first = cells[0]
    assert first.point_id == "moe.upcycle_noise_rel=0,train.steps=10" and first.seed == 0
    assert first.overrides() == {"experiment": {"moe": {"upcycle_noise_rel": 0.0},
                                                "train": {"steps": 10, "seed": 0}}}
    assert [c.cell_id for c in grid.expand_cells({}, [3, 4])] == ["base,seed=3", "base,seed=4"]
    with pytest.raises(ValueError, match="repeat"):
        grid.expand_cells({}, [1, 1])
    with pytest.raises(ValueError, match="repeats a value"):
        grid.expand_cells({"a": [1, 1]}, [0])


def test_seed_interval_is_the_student_t_interval() -> None:
    # values 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.302653 -> half width 4.302653 / sqrt(3)
    iv = grid.seed_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["sd"] == pytest.approx(1.0) and iv["n"] == 3
    assert iv["high"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv["low"] == pytest.approx(4.0 - iv["high"])
    one = grid.seed_interval([0.5])
    assert one["mean"] == 0.5 and one["low"] is None and one["n"] == 1
    assert grid.seed_interval([])["n"] == 0


def test_aggregate_cells_groups_seeds_of_one_point_and_arm() -> None:
    def result(point_id: str, seed: int, diff: float, nmi: float) -> dict:
        return {"point_id": point_id, "point": {"k": point_id}, "seed": seed, "rows": [
            {"arm": "dense", "eval_loss": {"estimate": 3.0, "low": 2.9, "high": 3.1}},
            {"arm": "moe", "eval_loss": {"estimate": 3.0 + diff, "low": 0, "high": 9},
             "loss_vs_dense": {"estimate": diff, "low": -1, "high": 1, "pvalue": 0.5},
             "nmi": {"estimate": nmi, "low": 0, "high": 1}, "load_cv_max": 0.2}]}

    rows = grid.aggregate_cells([result("a", 0, 0.01, 0.3), result("b", 0, -0.02, 0.1), result("a", 1, 0.03, 0.5)])
    assert [(r["point_id"], r["arm"]) for r in rows] == [("a", "dense"), ("a", "moe"), ("b", "dense"), ("b", "moe")]
    a_moe = rows[1]
    assert a_moe["seeds"] == [0, 1] and a_moe["loss_vs_dense"]["mean"] == pytest.approx(0.02)
    assert a_moe["nmi"]["n"] == 2 and a_moe["nmi"]["mean"] == pytest.approx(0.4)
    assert "loss_vs_dense" not in rows[0] and rows[3]["nmi"]["low"] is None


def test_load_sweep_reads_the_shipped_upcycling_sweep(tmp_path) -> None:
    from pathlib import Path

    from moescope.sweep.runner import load_sweep, plan_sweep

    root = Path(__file__).resolve().parents[1]
    study, scfg = load_sweep(str(root / "configs" / "sweep_upcycling.toml"))
    specs = plan_sweep(study, scfg, tmp_path)  # every cell's config validates; nothing is written
    assert len(specs) == 4 * 2 * 2 * 3 and not any(tmp_path.iterdir())
    assert study["experiment"]["arms"] == ["dense", "moe"] and study["experiment"]["base"]["steps"] == 400
    # cells of one seed share one base; the dense arm is shared by the 8 MoE settings of each (seed, length)
    assert len({s["base_dir"] for s in specs}) == 3
    dense = [s["shared_arms"]["dense"] for s in specs]
    assert len(set(dense)) == 6 and all("moe" not in s["shared_arms"] for s in specs)
    # --grid replaces an axis, --seeds the seeds; a study file without [sweep] is the study itself
    study, scfg = load_sweep(str(root / "configs" / "sweep_upcycling.toml"), ["experiment.train.steps=5"], [7])
    assert scfg.grid["experiment.train.steps"] == [5] and scfg.seeds == [7]
    plain = tmp_path / "study.toml"
    plain.write_text("[experiment.train]\nsteps = 9\n")
    study, scfg = load_sweep(str(plain))
    assert study == {"experiment": {"train": {"steps": 9}}} and scfg.grid == {}


def test_load_sweep_reads_the_shipped_designs_sweep(tmp_path) -> None:
    from pathlib import Path

    from moescope.sweep.runner import load_sweep, plan_sweep

    root = Path(__file__).resolve().parents[1]
    study, scfg = load_sweep(str(root / "configs" / "sweep_designs.toml"))
    specs = plan_sweep(study, scfg, tmp_path)  # every cell's config validates; nothing is written
    assert len(specs) == 3 and not any(tmp_path.iterdir())
    assert study["experiment"]["arms"] == ["dense", "moe", "moe-shared", "moe-fine", "moe-ec"]
    assert sorted(s["seed"] for s in specs) == [0, 1, 2] and len({s["base_dir"] for s in specs}) == 3


def test_axis_contrasts_pair_within_a_seed_and_average_over_the_other_axes() -> None:
    """Change of loss - dense along one axis: per seed the mean over the other axis of (value - first value),
    then a t-interval over seeds; a seed missing any needed cell is left out."""
    g = {"a": [0, 1], "b": ["x", "y"]}
    # loss - dense = 0.01 * a + (0.1 if b == "y") + seed * 0.001 * a * (1 if b == "x" else 3)
    def result(a, b, seed):
        d = 0.01 * a + (0.1 if b == "y" else 0.0) + seed * 0.001 * a * (1 if b == "x" else 3)
        return {"point": {"a": a, "b": b}, "point_id": f"a={a},b={b}", "seed": seed,
                "rows": [{"arm": "dense"}, {"arm": "moe", "loss_vs_dense": {"estimate": d}}]}

    results = [result(a, b, s) for a in (0, 1) for b in ("x", "y") for s in (0, 1)]
    out = {(c["axis"], c["value"]): c for c in grid.axis_contrasts(results, g)}
    assert set(out) == {("a", 1), ("b", "y")} and all(c["arm"] == "moe" for c in out.values())
    # a: seed 0 -> 0.01; seed 1 -> mean(0.01 + 0.001, 0.01 + 0.003) = 0.012
    assert out[("a", 1)]["per_seed"] == pytest.approx({0: 0.01, 1: 0.012})
    assert out[("a", 1)]["change"]["mean"] == pytest.approx(0.011) and out[("a", 1)]["change"]["n"] == 2
    # b: seed 0 -> 0.1; seed 1 -> mean(0.1, 0.1 + 0.002) = 0.101
    assert out[("b", "y")]["per_seed"] == pytest.approx({0: 0.1, 1: 0.101})
    # drop one cell of seed 1: that seed no longer counts for either axis
    partial = [r for r in results if not (r["point"] == {"a": 1, "b": "y"} and r["seed"] == 1)]
    assert {k: list(c["per_seed"]) for k, c in
            ((c["axis"], c) for c in grid.axis_contrasts(partial, g))} == {"a": [0], "b": [0]}


def test_aggregate_cells_gives_each_layer_its_own_nmi_and_load_cv() -> None:
    def result(seed: int, nmi3: float) -> dict:
        return {"point_id": "p", "point": {}, "seed": seed, "rows": [
            {"arm": "moe", "layers": {"2": {"nmi": 0.1, "load_cv": 0.5}, "3": {"nmi": nmi3, "load_cv": 0.2}}}]}

    (row,) = grid.aggregate_cells([result(0, 0.4), result(1, 0.6)])
    assert list(row["layers"]) == ["2", "3"]
    assert row["layers"]["3"]["nmi"]["mean"] == pytest.approx(0.5) and row["layers"]["2"]["load_cv"]["n"] == 2


@pytest.mark.parametrize("item, text", [("a.b=1,,2", "empty value"), ("a.b=1,", "empty value"),
                                        ("a.b=[1,2", "not YAML")])
def test_a_grid_item_with_an_empty_or_broken_value_is_refused(item: str, text: str) -> None:
    from moescope.sweep.grid import parse_grid_item

    with pytest.raises(ValueError, match=text):
        parse_grid_item(item)


@pytest.mark.parametrize("seeds", ["1,,2", ",", "-1", "a"])
def test_seeds_must_be_integers_without_gaps(seeds: str, tmp_path, capsys) -> None:
    from moescope.cli import main

    capsys.readouterr()
    assert main(["sweep", "nonexistent.toml", "--seeds", seeds, "--out", str(tmp_path / "o")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
