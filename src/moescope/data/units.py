"""The resampling unit of every eval block: the source document its first token comes from.

Blocks cut from one document (an article's sections, one code file) share its topic,
style and vocabulary, so they are not independent draws: a bootstrap or permutation
that moves single blocks treats ~180 blocks of ~12 files as 180 independent
observations and gives intervals that are too narrow. The analysis therefore moves
whole units. A data directory records, per block, the first text line its tokens come
from (blocks/eval/DOMAIN.sources.npy, rows aligned with the block file after
balancing) and the texts with their metadata (texts/eval/DOMAIN.jsonl, one line per
text in packing order); the text's document is :func:`moescope.data.split.document_key`.
A build without those files falls back to the block as the unit, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moescope.data.blocks import BlockStore, block_sources_path, texts_path
from moescope.data.split import GROUP_FIELD, document_key
from moescope.data.text import SourceText
from moescope.errors import MoescopeError

UNIT_DOCUMENT = "source document (near-duplicate documents joined) of each eval block's first token"
UNIT_TEXT = "held-out text (input record) of each eval block's first token"
UNIT_NAMED_DOCUMENT = ("source document named by the texts file (its \"document\" field; a row without one "
                       "is its own) of each eval block's first token")
UNIT_BLOCK = "eval block"


@dataclass(frozen=True)
class BlockUnits:
    """The resampling unit of every block: ``of_block[b]`` is block b's unit id (unique across domains;
    units never span domains). ``unit`` says what a unit is; ``note`` why the block was used instead."""

    of_block: np.ndarray  # int64 [B]
    unit: str
    note: str | None = None

    @classmethod
    def blocks(cls, n_blocks: int, note: str | None = None) -> "BlockUnits":
        """Every block its own unit (unit id = block number)."""
        return cls(np.arange(n_blocks, dtype=np.int64), UNIT_BLOCK, note)

    def describe(self, blocks: np.ndarray, block_domain: np.ndarray, domains: list[str]) -> dict:
        """What the statistics header states: the unit and how many units the analysed ``blocks`` form per
        domain (``block_domain`` [len(blocks)] their domain ids)."""
        units = self.of_block[np.asarray(blocks, dtype=np.int64)]
        domain = np.asarray(block_domain, dtype=np.int64)
        out: dict = {"unit": self.unit,
                     "n_units": {name: int(np.unique(units[domain == d]).size)
                                 for d, name in enumerate(domains) if (domain == d).any()}}
        if self.note:
            out["unit_note"] = self.note
        return out


def record_document(record: dict, line: int) -> str:
    """The document group of a texts/*.jsonl record: the one the build recorded (documents joined by
    near-duplicates, split.GROUP_FIELD), else its document (:func:`document_key` of its SourceText). A
    record written without an id (a hand-made file) and without document metadata is its own document,
    named by its line."""
    group = record.get(GROUP_FIELD)
    if isinstance(group, str) and group:
        return group
    text = SourceText.from_record(record)
    text.id = text.id or f"line {line}"
    return document_key(text)


def numbered(keys: list) -> np.ndarray:
    """Integer ids of hashable keys, numbered in order of first appearance (so ids rise with the blocks)."""
    ids: dict = {}
    return np.asarray([ids.setdefault(key, len(ids)) for key in keys], dtype=np.int64)


def eval_block_units(store: BlockStore, split: str = "eval") -> BlockUnits:
    """The unit of every row of ``store.index(split)``: the source document holding the block's first token.

    Falls back to the block for every domain when any domain's sources.npy or texts file is missing
    (a build from before block sources were recorded). A sources file that is unreadable, of the wrong
    shape, not the one the manifest's digest names, or pointing past its texts is one error naming it.
    """
    keys: list[tuple[int, str]] = []
    for d, domain in enumerate(store.domains):
        n = store.n_blocks(split, domain)
        if n == 0:
            continue
        sources, tpath = block_sources_path(store.root, split, domain), texts_path(store.root, split, domain)
        for path in (sources, tpath):
            if not path.is_file():
                return BlockUnits.blocks(store.index(split).shape[0],
                                         note=f"{path} missing (a build from before block sources were recorded)")
        first = _first_texts(store, split, domain, n)
        documents = [record_document(r, line) for line, r in enumerate(store.texts(split, domain), 1)]
        if first.size and first.max() >= len(documents):
            raise MoescopeError(f"{sources}: a block starts in text {int(first.max())}, but {tpath} holds "
                                f"{len(documents)} texts; rebuild the data")
        keys.extend((d, documents[i]) for i in first)
    return BlockUnits(numbered(keys), UNIT_DOCUMENT)


def _first_texts(store: BlockStore, split: str, domain: str, n_blocks: int) -> np.ndarray:
    """Column 1 of blocks/SPLIT/DOMAIN.sources.npy (each block's first text line), checked."""
    from moescope.io.provenance import sha256_file

    path = block_sources_path(store.root, split, domain)
    entry = store.manifest["splits"][split][domain]
    expected = entry.get("block_sources_sha256") if isinstance(entry, dict) else None
    if expected is not None and sha256_file(path) != expected:
        raise MoescopeError(f"{path} does not match its block_sources_sha256 in the manifest (changed after the "
                            "build; rebuild the data)")
    try:
        sources = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MoescopeError(f"{path}: unreadable block sources ({exc})") from exc
    if sources.shape != (n_blocks, 3) or not np.issubdtype(sources.dtype, np.integer) or (sources[:, 1] < 0).any():
        raise MoescopeError(f"{path}: expected non-negative integers [{n_blocks}, 3] (one row per block), "
                            f"got {sources.dtype} {list(sources.shape)}")
    return sources[:, 1].astype(np.int64)
