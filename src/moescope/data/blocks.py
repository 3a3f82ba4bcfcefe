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

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.io.jsonl import iter_jsonl_objects
from moescope.io.names import PATH_NAME_RULE, is_path_name

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 where every token id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def block_path(root: str | Path, split: str, domain: str) -> Path:
    return Path(root) / "blocks" / split / f"{domain}.bin"


def block_sources_path(root: str | Path, split: str, domain: str) -> Path:
    """int64 [n_blocks, 3] beside the block file: each block's row in the block file as packed (before
    balancing chose rows) and the first and last line of texts/{split}/{domain}.jsonl its tokens come from."""
    return Path(root) / "blocks" / split / f"{domain}.sources.npy"


def texts_path(root: str | Path, split: str, domain: str) -> Path:
    return Path(root) / "texts" / split / f"{domain}.jsonl"


def tokenizer_dir(root: str | Path) -> Path:
    return Path(root) / "tokenizer"


def read_manifest(path: Path) -> dict:
    """A manifest.json as a dict, or one error naming the file (binary, not JSON, not an object)."""
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MoescopeError(f"{path}: unreadable manifest: not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise MoescopeError(f"{path}: unreadable manifest: line {exc.lineno}: {exc.msg}") from exc
    except OSError as exc:
        raise MoescopeError(f"{path}: cannot read manifest ({exc.strerror or exc})") from exc
    if not isinstance(manifest, dict):
        raise MoescopeError(f"{path}: manifest must be a JSON object, got {type(manifest).__name__}")
    return manifest


def check_manifest(path: Path, m: dict) -> None:
    """Types and ranges of the keys every stage reads, so a hand-edited manifest fails here, once."""

    def positive_int(key: str) -> int:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MoescopeError(f"{path}: {key} must be a positive integer, got {v!r}")
        return v

    positive_int("block_size")
    vocab = positive_int("vocab_size")
    eos = m.get("eos_token_id")
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab):
        raise MoescopeError(f"{path}: eos_token_id {eos!r} is outside the vocabulary (0..{vocab - 1})")
    if m["dtype"] not in ("uint16", "uint32"):
        raise MoescopeError(f"{path}: dtype must be 'uint16' or 'uint32', got {m['dtype']!r}")
    if m["dtype"] == "uint16" and dtype_for_vocab(vocab) != np.dtype(np.uint16):
        raise MoescopeError(f"{path}: vocab_size {vocab} does not fit dtype uint16")
    domains = m["domains"]
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise MoescopeError(f"{path}: domains must be a list of names")
    repeated = sorted({d for d in domains if domains.count(d) > 1})
    if repeated:
        raise MoescopeError(f"{path}: domain {repeated[0]!r} is listed more than once")
    splits = m["splits"]
    if not isinstance(splits, dict):
        raise MoescopeError(f"{path}: splits must be an object")
    for name in [*domains, *(d for per in splits.values() if isinstance(per, dict) for d in per)]:
        check_domain_file_name(path, name)
    for split, per_domain in splits.items():  # a split (a stage may read only one) lists every domain
        missing = [d for d in domains if not isinstance(per_domain, dict) or d not in per_domain]
        if missing:
            raise MoescopeError(f"{path}: splits.{split} lacks domain {missing[0]!r}")
    for split, per_domain in splits.items():
        for d, entry in (per_domain.items() if isinstance(per_domain, dict) else []):
            n = entry.get("n_blocks") if isinstance(entry, dict) else None
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise MoescopeError(f"{path}: splits.{split}.{d}.n_blocks must be an integer >= 0, got {n!r}")


def check_domain_file_name(path: Path, name: str) -> None:
    """A domain name becomes a file name under blocks/ and texts/: one with a path separator, or a
    leading '.' ('..'), would read a file outside the data directory."""
    if not is_path_name(name):
        raise MoescopeError(f"{path}: domain name {name!r} is not a plain file name ({PATH_NAME_RULE})")


def tokenizer_ids(tokenizer_json: Path) -> set[int]:
    """Every token id of a saved HF tokenizer (model vocabulary plus added tokens), read as JSON."""
    try:
        data = json.loads(tokenizer_json.read_bytes().decode("utf-8"))
        vocab = data["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids.update(int(t["id"]) for t in data.get("added_tokens") or [])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MoescopeError(f"{tokenizer_json}: unreadable tokenizer ({type(exc).__name__}: {exc})") from exc
    return {int(i) for i in ids}


# Block files this process has checked (path, size, mtime, digest or None, vocab_size): every stage of an
# experiment opens the same store, and reading it once is enough unless the file changes.
_VERIFIED_BLOCKS: set[tuple[str, int, int, str | None, int]] = set()

_SCAN_CHUNK_BYTES = 1 << 24  # a multiple of every block dtype's item size


def scan_block_file(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(sha256, largest token id) of a block file, read once in chunks (-1 for an empty file)."""
    digest, largest = hashlib.sha256(), -1
    with open(path, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK_BYTES):
            digest.update(chunk)
            if len(chunk) >= dtype.itemsize:
                largest = max(largest, int(np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize).max()))
    return digest.hexdigest(), largest


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
        manifest = read_manifest(path)
        for key in ("block_size", "vocab_size", "dtype", "domains", "splits"):
            if key not in manifest:
                raise MoescopeError(f"{path}: manifest lacks {key!r}")
        check_manifest(path, manifest)
        store = cls(root=root, manifest=manifest)
        store.check_tokenizer()
        return store

    def check_tokenizer(self) -> None:
        """The manifest's vocabulary and EOS id must be the tokenizer's (when DIR/tokenizer exists).

        A model is sized from `vocab_size`, so a manifest that disagrees with its tokenizer
        builds a wrong-sized model or indexes past the embedding during training.
        """
        tj = tokenizer_dir(self.root) / "tokenizer.json"
        if not tj.is_file():
            return
        expected = (self.manifest.get("tokenizer") or {}).get("sha256") if isinstance(
            self.manifest.get("tokenizer"), dict) else None
        if expected:
            from moescope.io.provenance import sha256_file

            if sha256_file(tj) != expected:
                raise MoescopeError(f"{tj}: sha256 differs from the manifest's tokenizer.sha256 "
                                    f"({self.root / MANIFEST_NAME}); the tokenizer was changed after the build")
        ids = tokenizer_ids(tj)
        size = max(ids) + 1 if ids else 0
        if self.vocab_size != size:
            raise MoescopeError(f"{self.root / MANIFEST_NAME}: vocab_size {self.vocab_size} disagrees with the "
                                f"tokenizer ({tj}: {size} token ids)")
        eos = self.manifest.get("eos_token_id")
        if eos is not None and eos not in ids:
            raise MoescopeError(f"{self.root / MANIFEST_NAME}: eos_token_id {eos} is not a token of {tj}")

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
        if split not in self.manifest["splits"]:
            raise MoescopeError(f"{self.root / MANIFEST_NAME}: no {split!r} split (splits lists "
                                f"{', '.join(self.manifest['splits']) or 'none'})")
        return int(self.manifest["splits"][split][domain]["n_blocks"])

    def blocks(self, split: str, domain: str) -> np.ndarray:
        """Memmap of shape [n_blocks, block_size] (read-only)."""
        n = self.n_blocks(split, domain)
        path = block_path(self.root, split, domain)
        if n == 0:
            return np.zeros((0, self.block_size), dtype=self.dtype)
        size = regular_file_size(path, "block file")
        expected = n * self.block_size * self.dtype.itemsize
        if size != expected:
            raise MoescopeError(f"{path}: size {size} bytes, manifest says {expected}")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n, self.block_size))

    def verify_blocks(self, splits: tuple[str, ...] | None = None) -> None:
        """Every block file of `splits` (default: all) against its sha256 in the manifest (data built
        before the manifest kept them is checked without it), and every token id below vocab_size: a
        flipped bit would otherwise train on other tokens, or index past the embedding (an IndexError
        deep in torch), without a word."""
        for split, domains in self.manifest["splits"].items():
            if splits is not None and split not in splits:
                continue
            for domain, entry in domains.items():
                if not self.n_blocks(split, domain):
                    continue
                expected = entry.get("blocks_sha256") if isinstance(entry, dict) else None
                path = block_path(self.root, split, domain)
                self.blocks(split, domain)  # present, and the size the manifest says
                st = path.stat()
                key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected, self.vocab_size)
                if key in _VERIFIED_BLOCKS:
                    continue
                digest, largest = scan_block_file(path, self.dtype)
                if expected is not None and digest != expected:
                    raise MoescopeError(f"{path} does not match its blocks_sha256 in {self.root / MANIFEST_NAME} "
                                        "(corrupted; rebuild the data)")
                if largest >= self.vocab_size:
                    raise MoescopeError(f"{path}: token id {largest} is outside the vocabulary (vocab_size "
                                        f"{self.vocab_size} in {self.root / MANIFEST_NAME}); rebuild the data")
                _VERIFIED_BLOCKS.add(key)

    def index(self, split: str) -> np.ndarray:
        """All blocks of a split as rows (domain_id, row), domains in manifest order."""
        for d in self.domains:  # each file the size its n_blocks says, before n_blocks sizes an array
            self.blocks(split, d)
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
        """The split's texts as {"text": str, ...} records; any other line is one error naming file:line."""
        path = texts_path(self.root, split, domain)
        for number, record in iter_jsonl_objects(path):
            if not isinstance(record.get("text"), str):
                raise MoescopeError(f"{path}:{number}: expected a \"text\" string, got "
                                    f"{type(record.get('text')).__name__ if 'text' in record else 'no text key'}")
            yield record


def regular_file_size(path: Path, what: str) -> int:
    """The size of `path`, or one error saying why it is not a readable regular file (missing,
    a FIFO or directory, a symlink loop) rather than calling every such case missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MoescopeError(f"missing {what} {path}") from None
    except OSError as exc:
        raise MoescopeError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MoescopeError(f"{path}: {what} is not a regular file")
    return st.st_size
