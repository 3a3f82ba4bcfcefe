"""sha256 manifests of written directories (checkpoints, a stage's final/ model): size and digest of
every file, written last, so that a reader can tell a complete, untouched directory from a partial,
truncated or altered one and refuse the latter naming the file."""

from __future__ import annotations

import json
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.io.provenance import sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # the checkpoint format that introduced manifests; every manifest since has this form


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_NAME)


def write_manifest(directory: Path, step: int) -> Path:
    """Record size and sha256 of every file of the checkpoint (or trained model) in `directory`;
    must be written last."""
    files = {rel: {"bytes": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
             for rel in _files(directory)}
    path = directory / MANIFEST_NAME
    payload = json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1) + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(payload)
    return path


def verify_manifest(path: Path, required: tuple[str, ...]) -> None:
    """Raise MoescopeError naming the offending file unless every file of `path` is listed in its
    manifest with the recorded size and sha256, nothing else is there, and `required` are listed."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise MoescopeError(f"{manifest_path} is missing (an unfinished write, or one by an older moescope)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format_version") != FORMAT_VERSION or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        expected = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MoescopeError(f"{manifest_path}: not a valid manifest ({exc})") from None
    for rel in required:
        if rel not in expected:
            raise MoescopeError(f"{manifest_path} does not list {rel}")
    present = _files(path)
    for rel in present:
        if rel not in expected:
            raise MoescopeError(f"{path / rel} is not listed in {manifest_path}")
    for rel, (size, digest) in expected.items():
        file = path / rel
        if rel not in present:
            raise MoescopeError(f"{file} is listed in {manifest_path} but missing")
        if file.stat().st_size != size:
            raise MoescopeError(f"{file} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)")
        if sha256_file(file) != digest:
            raise MoescopeError(f"{file} does not match its sha256 in {manifest_path} (corrupted or altered)")
