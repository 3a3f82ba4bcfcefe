"""Held-out texts for a released model, re-tokenized by the model's own tokenizer (layer 2).

Texts come from a moescope data directory (DIR/texts/eval/DOMAIN.jsonl, the texts
the BPE blocks were cut from, so the built-in corpus works with any model) or from
a JSONL file of {"text", "domain"} rows. Each domain's texts are tokenized without
special tokens, joined with the tokenizer's EOS (when it has one) and cut into
blocks of ``context`` tokens, the way `moescope data build` packs its own blocks;
the last partial block of a domain is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moescope.data.blocks import MANIFEST_NAME, texts_path
from moescope.errors import MoescopeError
from moescope.io.jsonl import iter_jsonl_objects

TOKENIZE_BATCH_TEXTS = 256


@dataclass
class TextBlocks:
    """Token blocks of held-out texts with their domains."""

    tokens: np.ndarray  # int64 [B, context]
    domain: np.ndarray  # int64 [B], index into domains
    domains: list[str]


def read_data_dir_texts(data_dir: str | Path, split: str = "eval") -> dict[str, list[str]]:
    """{domain: texts} of a data directory's held-out split, domains in manifest order."""
    root = Path(data_dir)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise MoescopeError(f"not a moescope data directory (no {MANIFEST_NAME}): {root}")
    try:
        domains = list(json.loads(manifest_path.read_text(encoding="utf-8"))["domains"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MoescopeError(f"{manifest_path}: no domain list ({exc})") from exc
    out: dict[str, list[str]] = {}
    for domain in domains:
        path = texts_path(root, split, domain)
        if path.is_file():
            out[domain] = _read_jsonl(path, default_domain=domain)[domain]
    if not any(out.values()):
        raise MoescopeError(f"{root}: no held-out texts ({root / 'texts' / split}/DOMAIN.jsonl missing or empty)")
    return {d: t for d, t in out.items() if t}


def read_texts_file(path: str | Path) -> dict[str, list[str]]:
    """{domain: texts} of a JSONL file with {"text": str, "domain": str} rows, domains in order of appearance."""
    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"{path}: no such texts file")
    out = _read_jsonl(path, default_domain=None)
    if not out:
        raise MoescopeError(f"{path}: no texts")
    return out


def _read_jsonl(path: Path, default_domain: str | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for number, row in iter_jsonl_objects(path):
        if not isinstance(row.get("text"), str):
            raise MoescopeError(f"{path}:{number}: expected an object with a string \"text\"")
        domain = row.get("domain", default_domain) if default_domain is not None else row.get("domain")
        if not isinstance(domain, str) or not domain:
            raise MoescopeError(f"{path}:{number}: expected a non-empty string \"domain\"")
        out.setdefault(domain, []).append(row["text"])
    return out


def pack_texts(
    texts: dict[str, list[str]], tokenizer: Any, context: int, max_blocks_per_domain: int | None = None
) -> TextBlocks:
    """Tokenize each domain's texts, join with EOS and cut into blocks of ``context`` tokens.

    Stops tokenizing a domain once it has ``max_blocks_per_domain`` blocks, so a
    large corpus costs only what is analysed.
    """
    if context < 2:
        raise MoescopeError(f"--context {context}: need at least 2 tokens per block")
    eos = getattr(tokenizer, "eos_token_id", None)
    domains = list(texts)
    blocks, block_domain = [], []
    for d, domain in enumerate(domains):
        limit = max_blocks_per_domain if max_blocks_per_domain is not None else float("inf")
        stream: list[int] = []
        n = 0
        for start in range(0, len(texts[domain]), TOKENIZE_BATCH_TEXTS):
            batch = texts[domain][start : start + TOKENIZE_BATCH_TEXTS]
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                stream.extend(ids)
                if eos is not None:
                    stream.append(int(eos))
            while len(stream) >= context and n < limit:
                blocks.append(np.asarray(stream[:context], dtype=np.int64))
                block_domain.append(d)
                del stream[:context]
                n += 1
            if n >= limit:
                break
    if not blocks:
        raise MoescopeError(f"the held-out texts give no block of {context} tokens; pass a smaller --context")
    return TextBlocks(np.stack(blocks), np.asarray(block_domain, dtype=np.int64), domains)
