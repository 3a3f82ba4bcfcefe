"""Streaming packing: texts -> token ids + EOS -> fixed blocks appended to a raw memmap file.

Texts are encoded in batches and only one batch plus one partial block is ever in
memory, so peak memory does not grow with the corpus. No padding: the remainder
that does not fill a last block is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class PackStats:
    n_texts: int = 0
    n_chars: int = 0
    n_tokens: int = 0  # including one EOS per text
    n_blocks: int = 0
    tail_tokens_dropped: int = 0
    text_ends: list[int] = field(default_factory=list)  # each text's end (EOS included) in the token stream


def block_sources(text_ends: Sequence[int], n_blocks: int, block_size: int) -> np.ndarray:
    """int64 [n_blocks, 3]: block number and the first and last text (0-based, inclusive) whose tokens it
    holds, from each text's cumulative end offset in the packed stream (pure computation)."""
    ends = np.asarray(text_ends, dtype=np.int64)
    starts = np.arange(n_blocks, dtype=np.int64) * block_size
    first = np.searchsorted(ends, starts, side="right")  # the text whose span holds the block's first token
    last = np.searchsorted(ends, starts + block_size - 1, side="right")
    return np.stack([np.arange(n_blocks, dtype=np.int64), first, last], axis=1)


def batched_texts(texts: Iterable[str], max_texts: int, max_chars: int) -> Iterator[list[str]]:
    """Batches of at most `max_texts` texts and about `max_chars` characters.

    The character budget is what bounds memory: a tokenizer Encoding costs tens of bytes
    per token, so a batch of 512 long texts would cost far more than 512 short ones.
    """
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) >= max_texts or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def join_with_eos(id_lists: Sequence[Sequence[int]], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate token id lists, each followed by `eos_id` (pure computation)."""
    total = sum(len(x) for x in id_lists) + len(id_lists)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for ids in id_lists:
        n = len(ids)
        out[pos : pos + n] = ids
        out[pos + n] = eos_id
        pos += n + 1
    return out


def cut_blocks(carry: np.ndarray, new: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(full blocks [k, block_size], leftover) of carry + new (pure computation)."""
    stream = np.concatenate([carry, new]) if len(carry) else new
    k = len(stream) // block_size
    return stream[: k * block_size].reshape(k, block_size), stream[k * block_size :].copy()


def encoder_for(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoder through the Rust backend, no special tokens added (EOS is appended by packing)."""
    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
    fast = getattr(backend, "encode_batch_fast", None)  # skips offset computation
    encode = fast if fast is not None else backend.encode_batch

    def run(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    return run


def pack_to_file(
    texts: Iterable[str],
    encode: Callable[[list[str]], list[list[int]]],
    *,
    eos_id: int,
    block_size: int,
    dtype: np.dtype,
    path: Path,
    batch_texts: int = 512,
    batch_chars: int = 250_000,
    on_batch: Callable[[int], None] | None = None,
) -> PackStats:
    """Encode `texts` in batches, append EOS after each, write full blocks to `path`."""
    stats = PackStats()
    carry = np.empty(0, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for batch in batched_texts(texts, batch_texts, batch_chars):
            ids = encode(batch)
            flat = join_with_eos(ids, eos_id, dtype)
            stats.text_ends.extend((stats.n_tokens + np.cumsum([len(x) + 1 for x in ids])).tolist())
            stats.n_texts += len(batch)
            stats.n_chars += sum(len(t) for t in batch)
            stats.n_tokens += len(flat)
            blocks, carry = cut_blocks(carry, flat, block_size)
            if len(blocks):
                fh.write(np.ascontiguousarray(blocks).tobytes())
                stats.n_blocks += len(blocks)
            if on_batch is not None:
                on_batch(len(batch))
    stats.tail_tokens_dropped = len(carry)
    return stats


def choose_rows(n_rows: int, keep: int, seed: list[int] | int) -> np.ndarray:
    """`keep` of `n_rows` row indices, chosen at random under `seed`, in ascending order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=keep, replace=False))


def truncate_block_file(path: Path, rows: np.ndarray, block_size: int, dtype: np.dtype) -> None:
    """Rewrite a block file keeping only `rows` (in their order); streams row chunks."""
    src = np.memmap(path, dtype=dtype, mode="r").reshape(-1, block_size)
    tmp = path.with_suffix(".bin.tmp")
    with open(tmp, "wb") as fh:
        for chunk in np.array_split(rows, max(1, len(rows) // 4096)):
            fh.write(np.ascontiguousarray(src[chunk]).tobytes())
    del src
    tmp.replace(path)
