"""The on-disk block store: the contract between `moescope data build` and every later stage.

Layout of a data directory::

    DIR/manifest.json                       provenance + the keys read below
    DIR/tokenizer/                          a transformers tokenizer (save_pretrained)
    DIR/texts/{split}/{domain}.jsonl        the split texts, one {"text": ..., ...} per line
    DIR/blocks/{split}/{domain}.bin         raw token memmap, shape [n_blocks, block_size]

The manifest keys this module relies on: ``format_version``, ``block_size``,
``vocab_size``, ``eos_token_id``, ``dtype`` ("uint16" or "uint32"), ``domains``
(ordered list; a block's domain id is its index here) and
``splits[split][domain]["n_blocks"]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 where every token id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def block_path(root: str | Path, split: str, domain: str) -> Path:
    return Path(root) / "blocks" / split / f"{domain}.bin"


def texts_path(root: str | Path, split: str, domain: str) -> Path:
    return Path(root) / "texts" / split / f"{domain}.jsonl"


def tokenizer_dir(root: str | Path) -> Path:
    return Path(root) / "tokenizer"


@dataclass(frozen=True)
class BlockStore:
    """Read-only view of a built data directory (memmaps, no copies)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> "BlockStore":
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise MoescopeError(f"not a moescope data directory (no {MANIFEST_NAME}): {root}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MoescopeError(f"{path}: unreadable manifest: {exc}") from exc
        for key in ("block_size", "vocab_size", "dtype", "domains", "splits"):
            if key not in manifest:
                raise MoescopeError(f"{path}: manifest lacks {key!r}")
        return cls(root=root, manifest=manifest)

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.manifest["eos_token_id"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    def n_blocks(self, split: str, domain: str) -> int:
        return int(self.manifest["splits"][split][domain]["n_blocks"])

    def blocks(self, split: str, domain: str) -> np.ndarray:
        """Memmap of shape [n_blocks, block_size] (read-only)."""
        n = self.n_blocks(split, domain)
        path = block_path(self.root, split, domain)
        if n == 0:
            return np.zeros((0, self.block_size), dtype=self.dtype)
        if not path.is_file():
            raise MoescopeError(f"missing block file {path}")
        expected = n * self.block_size * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise MoescopeError(f"{path}: size {path.stat().st_size} bytes, manifest says {expected}")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n, self.block_size))

    def index(self, split: str) -> np.ndarray:
        """All blocks of a split as rows (domain_id, row), domains in manifest order."""
        parts = [
            np.stack([np.full(self.n_blocks(split, d), i), np.arange(self.n_blocks(split, d))], axis=1)
            for i, d in enumerate(self.domains)
        ]
        return np.concatenate(parts, axis=0).astype(np.int64) if parts else np.zeros((0, 2), np.int64)

    def gather(self, split: str, index_rows: np.ndarray) -> np.ndarray:
        """Token blocks for (domain_id, row) pairs, as int64 [len(rows), block_size]."""
        maps = [self.blocks(split, d) for d in self.domains]
        out = np.empty((len(index_rows), self.block_size), dtype=np.int64)
        for j, (dom, row) in enumerate(index_rows):
            out[j] = maps[int(dom)][int(row)]
        return out

    def texts(self, split: str, domain: str) -> Iterator[dict]:
        path = texts_path(self.root, split, domain)
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)
