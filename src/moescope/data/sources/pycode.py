"""Python source files -> top-level functions and classes (via ast), with their docstrings.

Used by the built-in code corpus (the standard library) and by the `files` backend for .py files.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from moescope.data.text import SourceText

# Directory names (anywhere in the relative path) that hold test packages or vendored code.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "__phello__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_test_path(rel: Path) -> bool:
    """True for test packages and test modules (test_*.py, *_test.py, conftest.py)."""
    if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
        return True
    name = rel.name
    return name.startswith("test_") or name.endswith("_test.py") or name in ("conftest.py", "testing.py")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All non-test .py files of the standard library, sorted (the seed shuffles them later)."""
    root = root or stdlib_root()
    return sorted(p for p in root.rglob("*.py") if not is_test_path(p.relative_to(root)))


def split_definitions(source: str, *, module: str, domain: str, path: str) -> Iterator[SourceText]:
    """Top-level `def` / `async def` / `class` nodes, decorators included, in file order.

    Raises SyntaxError for unparsable files (callers decide whether that is fatal).
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    seen: dict[str, int] = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        end = node.end_lineno or node.lineno
        text = "".join(lines[start - 1 : end]).rstrip() + "\n"
        doc = ast.get_docstring(node, clean=True)
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        seen[node.name] = seen.get(node.name, 0) + 1  # a module may redefine a name; ids stay unique
        suffix = f"#{seen[node.name]}" if seen[node.name] > 1 else ""
        yield SourceText(
            text=text,
            domain=domain,
            id=f"{module}:{node.name}{suffix}",
            meta={"module": module, "qualname": node.name, "kind": kind, "path": path,
                  "lineno": start, "docstring": doc, "document": f"file:{path}"},
        )


def docstring_and_body(code: str) -> tuple[str, str] | None:
    """(docstring, code without the docstring) of a single top-level definition, or None.

    Gives the (docstring, body) pairs the embedding stage trains on.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return None
    node = tree.body[0]
    doc = ast.get_docstring(node, clean=True)
    if not doc or not node.body:
        return None
    first = node.body[0]
    lines = code.splitlines(keepends=True)
    body = "".join(lines[: first.lineno - 1] + lines[(first.end_lineno or first.lineno):])
    return doc, body


def iter_stdlib_definitions(domain: str, seed: int, root: Path | None = None) -> Iterator[SourceText]:
    """Definitions of the standard library, files in seeded random order (so a size target
    samples the whole library instead of the modules whose names sort first)."""
    root = root or stdlib_root()
    files = stdlib_files(root)
    random.Random(seed).shuffle(files)
    for path in files:
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        try:
            source = path.read_text(encoding="utf-8")
            yield from split_definitions(source, module=module, domain=domain, path=str(rel))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            # The stdlib ships a few deliberately broken/legacy-encoded files (lib2to3 fixtures).
            continue
