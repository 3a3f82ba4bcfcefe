"""Reading the JSON files of run and data directories as a user may hand them over: damaged, hand-edited
or replaced by another file. Anything but an object with the keys the reader needs is one MoescopeError
naming the file, never a KeyError or AttributeError deep in the reader."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moescope.errors import MoescopeError

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false"}


def read_json_object(path: str | Path, required: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """The JSON object in `path`, with every key of `required` present and of its type(s)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise MoescopeError(f"{path}: not found") from None
    except OSError as exc:
        raise MoescopeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise MoescopeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise MoescopeError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise MoescopeError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise MoescopeError(f"{path}: expected a JSON object, got {_describe(data)}")
    for key, types in (required or {}).items():
        if key not in data:
            raise MoescopeError(f"{path}: no {key!r} entry")
        if not isinstance(data[key], types) or (isinstance(data[key], bool) and bool not in _as_tuple(types)):
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in _as_tuple(types))
            raise MoescopeError(f"{path}: {key!r} must be {wanted}, got {_describe(data[key])}")
    return data


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _describe(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def json_ready(obj: Any) -> Any:
    """NaN/inf -> None so the files are valid JSON for browsers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return json_ready(obj.tolist())
    return obj
