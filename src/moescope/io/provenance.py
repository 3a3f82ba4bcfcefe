"""What a run needs to be reproduced: library versions, platform, hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

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

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        # CPU kernels split their sums by thread, so the float results (and through the routing
        # decisions, the study's numbers) reproduce bit for bit only at the same thread count.
        "torch_threads": torch.get_num_threads(),
        "libraries": library_versions(),
    }


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
