"""Held-out texts for a released model, re-tokenized by the model's own tokenizer (layer 2).

Texts come from a moescope data directory (DIR/texts/eval/DOMAIN.jsonl, the texts
the BPE blocks were cut from, so the built-in corpus works with any model) or from
a JSONL file of {"text", "domain"} rows. Each domain's texts are tokenized without
special tokens, joined with the tokenizer's EOS (when it has one) and cut into
blocks of ``context`` tokens, the way `moescope data build` packs its own blocks;
the last partial block of a domain is dropped. Each block's resampling unit for the
statistics is what its first token comes from: the text's source document for a data
directory (moescope.data.units.record_document of its jsonl row), the row's "document"
field in a texts file (a row without one: the row).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moescope.data.blocks import MANIFEST_NAME, texts_path
from moescope.data.packing import block_sources
from moescope.data.units import UNIT_DOCUMENT, UNIT_NAMED_DOCUMENT, UNIT_TEXT, numbered, record_document
from moescope.errors import MoescopeError
from moescope.io.jsonl import iter_jsonl_objects

log = logging.getLogger(__name__)

TOKENIZE_BATCH_TEXTS = 256
# A texts file's optional field naming each row's source document (its resampling unit).
DOCUMENT_FIELD = "document"


@dataclass
class TextBlocks:
    """Token blocks of held-out texts with their domains and resampling units."""

    tokens: np.ndarray  # int64 [B, context]
    domain: np.ndarray  # int64 [B], index into domains
    domains: list[str]
    unit: np.ndarray | None = None  # int64 [B]: each block's unit id (unique across domains)
    unit_name: str = UNIT_TEXT  # what one unit is (moescope.data.units)


@dataclass
class HeldOutTexts:
    """{domain: texts} and each text's resampling unit key ({domain: [key per text]})."""

    texts: dict[str, list[str]]
    unit_keys: dict[str, list[str]]
    unit_name: str


def read_data_dir_texts(data_dir: str | Path, split: str = "eval") -> HeldOutTexts:
    """The texts of a data directory's held-out split, domains in manifest order, each text's unit its
    source document."""
    root = Path(data_dir)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise MoescopeError(f"not a moescope data directory (no {MANIFEST_NAME}): {root}")
    try:
        domains = list(json.loads(manifest_path.read_text(encoding="utf-8"))["domains"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MoescopeError(f"{manifest_path}: no domain list ({exc})") from exc
    out: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    for domain in domains:
        path = texts_path(root, split, domain)
        if path.is_file():
            rows = _read_jsonl(path, default_domain=domain).get(domain, [])
            out[domain] = [row["text"] for row in rows]
            keys[domain] = [record_document(row, line) for line, row in enumerate(rows, 1)]
    if not any(out.values()):
        raise MoescopeError(f"{root}: no held-out texts ({root / 'texts' / split}/DOMAIN.jsonl missing or empty)")
    kept = [d for d, t in out.items() if t]
    return HeldOutTexts({d: out[d] for d in kept}, {d: keys[d] for d in kept}, UNIT_DOCUMENT)


def read_texts_file(path: str | Path) -> HeldOutTexts:
    """The texts of a JSONL file with {"text": str, "domain": str[, "document": str]} rows, domains in
    order of appearance. A text's unit is its "document" (rows naming the same document in a domain
    move together: the sections of one article, the files of one repository); a row without one is
    its own unit."""
    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"{path}: {'not a regular file' if path.exists() else 'no such texts file'}")
    rows = _read_jsonl(path, default_domain=None)
    if not rows:
        raise MoescopeError(f"{path}: no texts")
    named = any(DOCUMENT_FIELD in row for r in rows.values() for row in r)
    keys = {d: [f"document {row[DOCUMENT_FIELD]}" if DOCUMENT_FIELD in row else f"row {j}" for j, row in enumerate(r)]
            for d, r in rows.items()}
    return HeldOutTexts({d: [row["text"] for row in r] for d, r in rows.items()}, keys,
                        UNIT_NAMED_DOCUMENT if named else UNIT_TEXT)


def _read_jsonl(path: Path, default_domain: str | None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for number, row in iter_jsonl_objects(path):
        if not isinstance(row.get("text"), str):
            raise MoescopeError(f"{path}:{number}: expected an object with a string \"text\"")
        domain = row.get("domain", default_domain) if default_domain is not None else row.get("domain")
        if not isinstance(domain, str) or not domain:
            raise MoescopeError(f"{path}:{number}: expected a non-empty string \"domain\"")
        if default_domain is None and DOCUMENT_FIELD in row and not (isinstance(row[DOCUMENT_FIELD], str)
                                                                     and row[DOCUMENT_FIELD]):
            raise MoescopeError(f"{path}:{number}: \"{DOCUMENT_FIELD}\" must be a non-empty string (or left out)")
        out.setdefault(domain, []).append(row)
    return out


def pack_texts(
    texts: dict[str, list[str]], tokenizer: Any, context: int, max_blocks_per_domain: int | None = None,
    *, unit_keys: dict[str, list[str]] | None = None, unit_name: str = UNIT_TEXT,
) -> TextBlocks:
    """Tokenize each domain's texts, join with EOS and cut into blocks of ``context`` tokens.

    Stops tokenizing a domain once it has ``max_blocks_per_domain`` blocks, so a
    large corpus costs only what is analysed. A block's unit is the unit key (``unit_keys``
    [domain][text]; None = each text its own) of the text holding its first token.
    """
    if context < 2:
        raise MoescopeError(f"--context {context}: need at least 2 tokens per block")
    eos = getattr(tokenizer, "eos_token_id", None)
    domains = list(texts)
    blocks, block_domain, unit_keys_of_blocks = [], [], []
    for d, domain in enumerate(domains):
        limit = max_blocks_per_domain if max_blocks_per_domain is not None else float("inf")
        stream: list[int] = []
        ends: list[int] = []  # each tokenized text's end in the domain's token stream
        n = 0
        for start in range(0, len(texts[domain]), TOKENIZE_BATCH_TEXTS):
            batch = texts[domain][start : start + TOKENIZE_BATCH_TEXTS]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                if eos is not None:
                    stream.append(int(eos))
                ends.append((ends[-1] if ends else 0) + len(ids) + (eos is not None))
            while len(stream) >= context and n < limit:
                blocks.append(np.asarray(stream[:context], dtype=np.int64))
                block_domain.append(d)
                del stream[:context]
                n += 1
            if n >= limit:
                break
        keys = unit_keys[domain] if unit_keys is not None else range(len(texts[domain]))
        unit_keys_of_blocks += [(d, keys[i]) for i in block_sources(ends, n, context)[:, 1]]
    if not blocks:
        raise MoescopeError(f"the held-out texts give no block of {context} tokens; pass a smaller --context")
    block_domain_ids = np.asarray(block_domain, dtype=np.int64)
    kept = sorted(set(block_domain))
    if len(kept) < len(domains):  # a domain without one full block has nothing to route: left out, said
        short = [domains[d] for d in range(len(domains)) if d not in kept]
        log.warning("held-out texts of %s give no block of %d tokens: left out of the analysis",
                    ", ".join(short), context)
        block_domain_ids = np.searchsorted(kept, block_domain_ids)
        domains = [domains[d] for d in kept]
    if len(domains) < 2:
        raise MoescopeError(f"the held-out texts give blocks of {context} tokens in one domain only ({domains[0]}); "
                            "routing by domain needs at least two (more texts, or a smaller --context)")
    return TextBlocks(np.stack(blocks), block_domain_ids, domains, numbered(unit_keys_of_blocks), unit_name)
