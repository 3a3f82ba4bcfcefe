"""Typed dataclass configs <-> TOML / YAML / JSON files and `key.sub=value` overrides.

Unknown keys are an error that names the closest valid key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moescope.errors import MoescopeError, first_line

T = TypeVar("T")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a .toml, .yaml/.yml or .json file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoescopeError(f"config file {path}: cannot read it as UTF-8 text ({exc})") from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_Loader) or {}  # noqa: S506 (a SafeLoader subclass)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise MoescopeError(f"config file {path}: unknown format {path.suffix!r} (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())  # YAML's messages span lines
        raise MoescopeError(f"config file {path}: cannot parse: {detail}") from exc
    except RecursionError:
        raise MoescopeError(f"config file {path}: nested too deeply to be a config") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise MoescopeError(f"config file {path}: cannot parse: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise MoescopeError(f"config file {path}: top level must be a table/mapping")
    return data


class _Loader(yaml.SafeLoader):
    """YAML safe loading where `1e4` and `3e-4` are numbers: PyYAML follows YAML 1.1, which wants a
    dot before the exponent and reads them as strings; users (and YAML 1.2, JSON) mean numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_scalar(raw: str) -> Any:
    """A `--set` value read as a YAML scalar (or flow list/mapping); `1e4` is a number."""
    if raw == "":
        return ""
    try:
        return yaml.load(raw, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise MoescopeError(f"value {raw!r:.80} is not a YAML scalar, list or mapping ({problem})") from None
    except (ValueError, RecursionError) as exc:  # more digits than Python converts; nested too deeply
        raise MoescopeError(f"value {raw!r:.80} cannot be read ({first_line(exc) or type(exc).__name__})") from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turn ["train.steps=100", "moe.top_k=2"] into a nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise MoescopeError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = parse_scalar(raw)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MoescopeError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins. Neither input is modified."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def layered_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
                   flags: dict[str, Any] | None = None, *, ranges: dict[str, Range] | None = None,
                   flag_names: dict[str, str] | None = None) -> T:
    """Config `cls` from a file (if given), then `key.sub=value` overrides, then a command's dedicated
    flags ({"dotted.key": value}, None = flag not given); later wins. Every command that takes
    --config, --set and its own flags builds its config here, so all of them layer alike. The values
    given for `ranges`' keys, and the flags' values against their fields' declared bounds, are checked
    first (check_ranges), naming the flag (`flag_names`: {"dotted.key": "--flag"}) when one set the value."""
    raw = load_config_file(path) if path else {}
    raw = deep_merge(raw, parse_overrides(list(overrides or [])))
    given: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        node = given
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    merged = deep_merge(raw, given)
    from_flags = {key: name for key, name in (flag_names or {}).items() if (flags or {}).get(key) is not None}
    declared = {key: r for key in from_flags if (r := dotted_field_range(cls, key)) is not None}
    check_ranges(merged, {**declared, **(ranges or {})}, from_flags)
    return from_dict(cls, merged)


def dotted_field_range(cls: type, key: str) -> Range | None:
    """The Range declared (`bounded`) for a dotted setting of dataclass `cls`, through nested dataclass fields."""
    *path, name = key.split(".")
    for part in path:
        declared = getattr(cls, "__dataclass_fields__", {}).get(part)
        if declared is None:
            return None
        cls = declared.default_factory if callable(declared.default_factory) else type(declared.default)
    return field_range(cls, name)


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a setting allows (bounds None = unbounded); NaN and inf are never allowed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def contains(self, value: float) -> bool:
        return (isinstance(value, int) or math.isfinite(value)) and (
            self.low is None or (value > self.low if self.low_open else value >= self.low)) and (
            self.high is None or (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "finite"


def _number(x: float | None) -> str:
    """A bound as written: whole numbers in full (2**32 - 1 is 4294967295, not 4.29497e+09)."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


RANGE_KEY = "moescope_range"


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose numbers (the value, or every item of its list or table; None passes) must
    lie in a Range. from_dict refuses a value outside it, naming the dotted key, before the config is
    built; check_fields does the same for a config built in code. The one place a setting's bounds live."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RANGE_KEY: Range(low, high, low_open, high_open)})


def field_range(cls: type, name: str) -> Range | None:
    """The Range declared for field `name` of dataclass `cls` (or of the nearest base class declaring one:
    a subclass that only changes a default keeps its parent's bounds)."""
    for klass in getattr(cls, "__mro__", ()):
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and RANGE_KEY in declared.metadata:
            return declared.metadata[RANGE_KEY]
    return None


def check_field(cls: type, name: str, value: Any, where: str) -> None:
    """Raise MoescopeError naming `where` unless every number in `value` lies in the field's Range."""
    allowed = field_range(cls, name)
    if allowed is None:
        return
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and not allowed.contains(item):
            raise MoescopeError(_out_of_range(where, allowed, item))


def check_fields(obj: Any, where: str = "") -> None:
    """check_field on every field of dataclass `obj` and of the dataclasses nested in it, for configs
    built in code (dataclasses.replace, constructors) rather than read by from_dict."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, _join(where, f.name))
        else:
            check_field(type(obj), f.name, value, _join(where, f.name))


def _out_of_range(name: str, allowed: Range, value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number {allowed}, got {value!r}"
    return f"{name} must be {allowed}, got {value!r}"


def check_ranges(values: Any, ranges: dict[str, Range], flag_names: dict[str, str] | None = None) -> None:
    """Refuse, before anything runs, a number outside its Range (NaN and inf included). `values` is a
    nested dict, a dataclass or an argparse namespace; `ranges` keys are dotted paths into it. The
    error names the flag that set the value (`flag_names`) and the setting. Values that are not numbers
    are left to the type checks of from_dict."""
    for key, allowed in ranges.items():
        value = _dotted(values, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or allowed.contains(value):
            continue
        flag = (flag_names or {}).get(key)
        raise MoescopeError(_out_of_range(key if flag is None else f"{flag} ({key})", allowed, value))


def _dotted(values: Any, key: str) -> Any:
    node = values
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) -> plain JSON-able dict."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# Keys that were renamed so that one concept has one name everywhere (old -> new). An old key in a
# user's config is an error naming the new one; stored configs of older runs are read through
# `upgrade_keys`.
RENAMED_KEYS = {
    "lb_coef": "load_balance_coef",
    "lb_coef_by_layer": "load_balance_coef_by_layer",
    "z_coef": "z_loss_coef",
    "lb_scope": "load_balance_scope",
    "lb_accumulation": "load_balance_accumulation",
    "lr": "learning_rate",
    "min_lr_ratio": "min_learning_rate_ratio",
    "router_lr_mult": "router_learning_rate_mult",
    "finetune_lr": "finetune_learning_rate",
}


def upgrade_keys(data: Any) -> Any:
    """A stored config dict with every renamed key (RENAMED_KEYS) under its new name, at any depth."""
    if isinstance(data, dict):
        return {RENAMED_KEYS.get(k, k) if isinstance(k, str) else k: upgrade_keys(v) for k, v in data.items()}
    if isinstance(data, list):
        return [upgrade_keys(v) for v in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, strictly: unknown keys raise with a suggestion."""
    data = data or {}
    if not isinstance(data, dict):
        raise MoescopeError(f"config {where or cls.__name__}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields and RENAMED_KEYS.get(key) in fields:
            raise MoescopeError(f"config key {_join(where, key)!r} was renamed to {RENAMED_KEYS[key]!r}")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise MoescopeError(f"unknown config key {_join(where, key)!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, _join(where, key))
        check_field(cls, key, kwargs[key], f"config {_join(where, key)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise MoescopeError(f"config {where or cls.__name__}: {exc}") from exc


# A float names a whole number exactly only up to 2**53 (1e20 as a float is 100000000000000000000 only by
# luck of rounding): larger ones must be written as integers.
_EXACT_FLOAT_INT = 2**53
_INT64 = Range(-(2**63), 2**63 - 1)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except MoescopeError as exc:
                errors.append(str(exc))
        raise MoescopeError(f"config {where}: value {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise MoescopeError(f"config {where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MoescopeError(f"config {where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise MoescopeError(f"config {where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MoescopeError(f"config {where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            if abs(value) > _EXACT_FLOAT_INT:
                raise MoescopeError(f"config {where}: expected an integer, got {value!r} (a float that large "
                                    "names no exact whole number)")
            return int(value)  # 1e4 reads as a float but names a whole number
        if isinstance(value, bool) or not isinstance(value, int):
            raise MoescopeError(f"config {where}: expected an integer, got {value!r}")
        if not _INT64.contains(value):  # every integer setting ends up in numpy or torch
            raise MoescopeError(f"config {where}: {value} does not fit a 64-bit integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MoescopeError(f"config {where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN / inf: no setting means them, and JSON cannot store them
            raise MoescopeError(f"config {where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise MoescopeError(f"config {where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value
