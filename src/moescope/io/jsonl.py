"""JSON Lines files a user hands moescope: one object per line, errors naming file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; bad UTF-8, bad JSON or a non-object
    raises MoescopeError naming ``path:line``."""
    path = Path(path)
    try:
        fh = open(path, "rb")  # binary lines split at b"\n" only: U+2028 may sit inside a text (ensure_ascii=False)
    except OSError as exc:
        raise MoescopeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    with fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MoescopeError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoescopeError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
            except RecursionError:
                raise MoescopeError(f"{path}:{number}: invalid JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise MoescopeError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            if "\\u" in line and not _encodable(record):
                # JSON's \ud800 escapes can spell a lone surrogate: valid JSON, but no text a tokenizer
                # (or UTF-8 output) takes
                raise MoescopeError(f"{path}:{number}: a string holds an unpaired surrogate (\\ud800-\\udfff)")
            yield number, record


def _encodable(record: dict[str, Any]) -> bool:
    """True when every string in the record is valid Unicode text (no unpaired surrogate)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
