"""Branch data directories and the shared held-out set.

A branch trains on one partition only, tokenized with the corpus' own tokenizer, and is
evaluated on the corpus' eval split. So each branch data directory is a block store
(moescope.data.blocks contract) whose train split is the partition's texts packed per
source domain and whose eval split is a copy of the corpus' eval split.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.data.blocks import MANIFEST_NAME, BlockStore, block_path, texts_path, tokenizer_dir
from moescope.data.units import UNIT_BLOCK, eval_block_units
from moescope.data.packing import encoder_for, pack_to_file
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_json
from moescope.partition.io import read_partition_texts

OTHER_DOMAIN = "other"


def write_branch_data(data_dir: str | Path, partition_dir: str | Path, out_dir: str | Path) -> BlockStore:
    """Pack a partition's texts with the corpus tokenizer into a block store at `out_dir`."""
    from moescope.data.tokenizer import load_data_tokenizer

    store = BlockStore.open(data_dir)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).is_file():
        return BlockStore.open(out_dir)  # built before (same inputs by construction of the pipeline)
    records = read_partition_texts(partition_dir)
    by_domain: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        dom = rec.get("source_domain")
        by_domain[dom if dom in store.domains else OTHER_DOMAIN].append(rec["text"])
    domains = list(store.domains) + ([OTHER_DOMAIN] if OTHER_DOMAIN in by_domain else [])
    tok = load_data_tokenizer(store.root)
    encode = encoder_for(tok)
    manifest = dict(store.manifest)
    splits: dict[str, dict] = {"train": {}, "eval": {}}
    with atomic_directory(out_dir) as tmp:
        shutil.copytree(tokenizer_dir(store.root), tokenizer_dir(tmp))
        for domain in domains:
            texts = by_domain.get(domain, [])
            stats = pack_to_file(texts, encode, eos_id=store.eos_token_id, block_size=store.block_size,
                                 dtype=store.dtype, path=block_path(tmp, "train", domain))
            tp = texts_path(tmp, "train", domain)
            tp.parent.mkdir(parents=True, exist_ok=True)
            tp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
            splits["train"][domain] = {"n_blocks": stats.n_blocks, "n_texts": stats.n_texts,
                                       "n_tokens": stats.n_tokens, "tail_tokens_dropped": stats.tail_tokens_dropped}
            if domain in store.domains:
                for src, dst in ((block_path(store.root, "eval", domain), block_path(tmp, "eval", domain)),
                                 (texts_path(store.root, "eval", domain), texts_path(tmp, "eval", domain))):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if src.is_file():
                        shutil.copyfile(src, dst)
                splits["eval"][domain] = {"n_blocks": store.n_blocks("eval", domain)}
            else:
                splits["eval"][domain] = {"n_blocks": 0}
        if sum(v["n_blocks"] for v in splits["train"].values()) == 0:
            raise MoescopeError(f"{partition_dir}: partition too small for one block of {store.block_size} tokens")
        manifest.update(domains=domains, splits=splits,
                        partition={"source_data_dir": str(data_dir), "partition_dir": str(partition_dir),
                                   "n_texts": len(records)})
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return BlockStore.open(out_dir)


@dataclass
class EvalSet:
    """Held-out blocks of a corpus, the same for every model compared."""

    blocks: np.ndarray  # int64 [n, block_size]
    domain_ids: np.ndarray  # int64 [n]
    domains: list[str]
    unit: np.ndarray | None = None  # int64 [n]: each block's resampling unit (moescope.data.units); None = itself
    unit_name: str = UNIT_BLOCK  # what one unit is


def load_eval_set(data_dir: str | Path, max_blocks_per_domain: int | None = None) -> EvalSet:
    """Eval blocks of every domain, at most `max_blocks_per_domain` spread evenly over each."""
    store = BlockStore.open(data_dir)
    units = eval_block_units(store)
    rows, ids = [], []
    for d, domain in enumerate(store.domains):
        n = store.n_blocks("eval", domain)
        if n == 0:
            continue
        cap = n if max_blocks_per_domain is None else min(n, max_blocks_per_domain)
        pick = np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))
        rows.append(np.stack([np.full(len(pick), d), pick], axis=1))
        ids.append(np.full(len(pick), d))
    if not rows:
        raise MoescopeError(f"{data_dir}: the eval split has no blocks")
    index = np.concatenate(rows)
    # a block's position in store.index("eval"): the blocks of the domains before it, then its row
    offsets = np.cumsum([0] + [store.n_blocks("eval", d) for d in store.domains])
    return EvalSet(blocks=store.gather("eval", index), domain_ids=np.concatenate(ids), domains=store.domains,
                   unit=units.of_block[offsets[index[:, 0]] + index[:, 1]], unit_name=units.unit)
