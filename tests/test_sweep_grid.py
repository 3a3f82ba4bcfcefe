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
    assert study["experiment"]["arms"] == ["dense", "moe-fine", "moe-shared"]
    assert sorted(s["seed"] for s in specs) == [0, 1, 2] and len({s["base_dir"] for s in specs}) == 3
