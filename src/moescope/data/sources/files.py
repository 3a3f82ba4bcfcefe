"""The user's own files: .txt, .jsonl and .py files, directories or globs."""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moescope.data.config import SourceConfig
from moescope.data.sources.pycode import split_definitions
from moescope.data.text import SourceText
from moescope.errors import MoescopeError

SUFFIXES = (".txt", ".jsonl", ".py")


def expand_paths(paths: list[str]) -> list[Path]:
    """Files named by `paths` (files, directories searched recursively, globs), sorted, unique."""
    if not paths:
        raise MoescopeError("files source: no paths given (set source.paths)")
    out: set[Path] = set()
    for item in paths:
        p = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            matched = [Path(m) for m in glob.glob(str(p), recursive=True)]
            out.update(m for m in matched if m.is_file() and m.suffix in SUFFIXES)
        elif p.is_dir():
            out.update(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise MoescopeError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIXES)})")
            out.add(p)
        else:
            raise MoescopeError(f"files source: path not found: {item}")
    return sorted(out)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoescopeError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise MoescopeError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _iter_file(path: Path, src: SourceConfig, domain: str) -> Iterator[SourceText]:
    text = _read(path)
    name = str(path)
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec: Any = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoescopeError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get(src.text_field), str):
                raise MoescopeError(f"{path}:{lineno}: no string field {src.text_field!r}")
            meta = {k: v for k, v in rec.items() if k != src.text_field}
            meta.update(file=name, line=lineno)
            yield SourceText(text=rec[src.text_field], domain=domain, id=f"{name}:{lineno}", meta=meta)
    elif path.suffix == ".py" and src.python_unit == "definition":
        try:
            yield from split_definitions(text, module=path.stem, domain=domain, path=name)
        except SyntaxError as exc:
            raise MoescopeError(f"{path}:{exc.lineno}: Python syntax error ({exc.msg}); "
                                "set source.python_unit = 'file' to keep whole files") from exc
    elif path.suffix == ".txt" and src.txt_unit == "paragraph":
        for i, para in enumerate(p.strip() for p in text.split("\n\n")):
            if para:
                yield SourceText(text=para, domain=domain, id=f"{name}:{i}", meta={"file": name, "paragraph": i,
                                                                                 "document": f"file:{name}"})
    else:
        yield SourceText(text=text, domain=domain, id=name, meta={"file": name})


def source_info(src: SourceConfig) -> dict[str, Any]:
    return {"backend": "files", "paths": list(src.paths), "files": [str(p) for p in expand_paths(src.paths)],
            "python_unit": src.python_unit, "txt_unit": src.txt_unit, "text_field": src.text_field}


def iter_files(src: SourceConfig, domain: str, seed: int) -> Iterator[SourceText]:
    """Texts of the listed files; file order is a seeded shuffle so a size target samples them all."""
    files = expand_paths(src.paths)
    if not files:
        raise MoescopeError(f"files source for domain {domain!r}: no .txt/.jsonl/.py files in {src.paths}")
    random.Random(seed).shuffle(files)
    for path in files:
        yield from _iter_file(path, src, domain)
