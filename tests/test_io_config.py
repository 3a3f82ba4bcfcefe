"""Config layering shared by every command: file, then --set, then dedicated flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moescope.errors import MoescopeError
from moescope.io.config import bounded, check_fields, from_dict, layered_config


@dataclass
class Inner:
    seed: int = 0
    alpha: float = 1.0


@dataclass
class Outer:
    name: str = "a"
    steps: int = 1
    inner: Inner = field(default_factory=Inner)


def test_file_then_set_then_flags_later_wins(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('name = "file"\nsteps = 5\n[inner]\nseed = 7\nalpha = 2.0\n')
    cfg = layered_config(Outer, path, ["steps=6", "inner.seed=8"], {"inner.seed": 9, "name": None})
    assert cfg == Outer(name="file", steps=6, inner=Inner(seed=9, alpha=2.0))  # a None flag is "not given"
    assert layered_config(Outer, None) == Outer()


def test_a_flag_cannot_smuggle_an_unknown_key() -> None:
    with pytest.raises(MoescopeError, match="inner.sed"):
        layered_config(Outer, None, [], {"inner.sed": 1})


def test_an_old_key_names_its_new_name_and_stored_configs_upgrade() -> None:
    from moescope.io.config import upgrade_keys
    from moescope.train.config import RunConfig, comparable_config, experiment_config_from_dict

    for old, new in (("loss", {"lb_coef": 0.1}), ("loss", {"z_coef": 0.1}), ("optim", {"lr": 0.1})):
        key = next(iter(new))
        with pytest.raises(MoescopeError, match=rf"'{old}.{key}' was renamed to"):
            experiment_config_from_dict({old: new})
    stored = {"loss": {"lb_coef": 0.01, "z_coef": 1e-3, "lb_coef_by_layer": {}, "lb_scope": "step",
                       "lb_accumulation": "prepass"}, "optim": {"lr": 2e-3}}
    up = upgrade_keys(stored)
    assert up["loss"]["load_balance_coef"] == 0.01 and up["optim"] == {"learning_rate": 2e-3}
    mine = comparable_config(RunConfig())
    old_run = {k: v for k, v in mine.items()}
    old_run["loss"] = {("lb_coef" if k == "load_balance_coef" else k): v for k, v in mine["loss"].items()}
    old_run["train"] = dict(mine["train"])
    assert comparable_config(old_run) == mine  # a run written before the renames still resumes


def test_a_stored_run_without_a_setting_added_since_compares_as_its_default() -> None:
    from moescope.train.config import RunConfig, comparable_config

    mine = comparable_config(RunConfig())
    old_run = {k: (dict(v) if isinstance(v, dict) else v) for k, v in mine.items()}
    del old_run["train"]["eval_batch_order"]  # saved before the option existed
    del old_run["moe"]["routing"]
    assert comparable_config(old_run) == mine
    changed = {k: (dict(v) if isinstance(v, dict) else v) for k, v in mine.items()}
    changed["train"]["eval_batch_order"] = "mixed"
    assert comparable_config(changed) != mine  # a real difference still refuses the resume


def test_a_stored_study_config_without_a_setting_added_since_reads_as_today() -> None:
    from moescope.demo import load_demo_config, stored_study_config
    from moescope.io.config import to_dict

    today = to_dict(load_demo_config("demo"))
    old = json.loads(json.dumps(today))  # as written to demo_config.json / cell.json
    del old["experiment"]["train"]["eval_batch_order"], old["analysis"]["batch_order"]
    assert old != today and stored_study_config(old) == today
    assert stored_study_config({"experiment": {"no_such_key": 1}}) is None
    assert stored_study_config("not a config") is None


@pytest.mark.parametrize("raw", ["[1", "{a", "1: 2: 3", "!!python/object:os.system"])
def test_a_malformed_set_value_is_one_error_naming_it(raw: str) -> None:
    from moescope.io.config import parse_overrides

    with pytest.raises(MoescopeError, match="is not a YAML scalar"):
        parse_overrides([f"train.steps={raw}"])


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf"])
def test_a_non_finite_number_is_refused_where_a_float_is_expected(raw: str) -> None:
    with pytest.raises(MoescopeError, match=r"inner.alpha: expected a finite number"):
        layered_config(Outer, None, [f"inner.alpha={raw}"])


def test_a_config_file_that_is_not_utf8_is_one_error(tmp_path: Path) -> None:
    from moescope.io.config import load_config_file

    path = tmp_path / "c.toml"
    path.write_bytes(b"steps = 1\n\xff\xfe")
    with pytest.raises(MoescopeError, match=r"c.toml: cannot read it as UTF-8"):
        load_config_file(path)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/x/out"),
                                   NotADirectoryError(20, "Not a directory", "/x/afile/sub"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")])
def test_the_cli_turns_an_unusable_file_into_one_line_and_exit_2(monkeypatch, capsys, error: Exception) -> None:
    """Where no check named the problem first, the file system's own words come out as one line with
    exit 2, not a traceback."""
    import argparse

    from moescope import cli

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("-v", "--verbose", action="store_true")

        def fail(args):
            raise error

        p.set_defaults(func=fail)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moescope: error: {type(error).__name__}: "), err


@dataclass
class Bounded:
    steps: int = bounded(10, low=1, high=100)
    share: float = bounded(0.5, low=0.0, high=1.0)
    layers: list[int] = bounded(default_factory=list, low=0)


@dataclass
class NewDefault(Bounded):
    steps: int = 20  # only the default changes: the parent's bounds still hold


@pytest.mark.parametrize("data, says", [
    ({"steps": 1e20}, "config steps: expected an integer, got 1e+20 (a float that large names no exact whole number)"),
    ({"steps": 3.5}, "config steps: expected an integer, got 3.5"),
    ({"steps": True}, "config steps: expected an integer, got True"),
    ({"steps": float("nan")}, "config steps: expected an integer, got nan"),
    ({"steps": 2**70}, f"config steps: {2**70} does not fit a 64-bit integer"),
    ({"steps": 101}, "config steps must be in [1, 100], got 101"),
    ({"share": float("inf")}, "config share: expected a finite number, got inf"),
    ({"share": 1.5}, "config share must be in [0, 1], got 1.5"),
    ({"layers": [1, -2]}, "config layers must be >= 0, got -2"),
])
def test_a_setting_outside_its_declared_bounds_names_the_key_and_value(data: dict, says: str) -> None:
    with pytest.raises(MoescopeError) as err:
        from_dict(Bounded, data)
    assert str(err.value) == says


def test_a_subclass_that_changes_a_default_keeps_the_bounds_and_550_0_is_550() -> None:
    assert from_dict(NewDefault, {}).steps == 20
    assert from_dict(Bounded, {"steps": 55.0}).steps == 55  # 1e4-style whole numbers stay accepted
    with pytest.raises(MoescopeError, match=r"config steps must be in \[1, 100\], got 0"):
        from_dict(NewDefault, {"steps": 0})
    with pytest.raises(MoescopeError, match=r"^x.steps must be in \[1, 100\], got 0$"):
        check_fields(NewDefault(steps=0), "x")  # a config built in code, not read from a file
