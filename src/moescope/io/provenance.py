"""What a run needs to be reproduced: library versions, platform, hashes."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]

TRACKED_LIBRARIES = (
    "moescope", "torch", "numpy", "transformers", "tokenizers", "datasets", "accelerate",
    "safetensors", "sentence-transformers", "scikit-learn", "scipy", "gensim", "matplotlib",
)


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment_info() -> dict[str, object]:
    import torch

    from moescope.moe.native import native_status

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        # CPU kernels split their sums by thread, so the float results (and through the routing
        # decisions, the study's numbers) reproduce bit for bit only at the same thread count.
        "torch_threads": torch.get_num_threads(),
        "libraries": library_versions(),
        "source": source_revision(),
        "native_grouped_kernel": native_status(),
    }


@functools.cache
def source_revision(package_dir: Path = PACKAGE_DIR) -> dict[str, object]:
    """Which moescope code ran: sha256 over the package's .py sources (always; cheap), and the git commit
    with a dirty flag (changes under the package, untracked files included) when the package is tracked
    in a git checkout. No subprocess outside a checkout; a failing git call only leaves the git keys out."""
    out: dict[str, object] = {"sources_sha256": sources_sha256(package_dir)}
    if not any((parent / ".git").exists() for parent in (package_dir, *package_dir.parents)):
        return out
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        if not git("ls-files", "--", "__init__.py"):  # e.g. an installed copy inside a checkout's .venv
            return out
        out["git_commit"] = git("rev-parse", "HEAD")
        out["git_dirty"] = bool(git("status", "--porcelain", "--", "."))
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("no git revision for %s: %s", package_dir, exc)
    return out


def sources_sha256(package_dir: Path) -> str:
    """sha256 over the package's .py files (relative path and content, in path order)."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        h.update(path.relative_to(package_dir).as_posix().encode("utf-8") + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
