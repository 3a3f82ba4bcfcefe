"""`build_dataset`: sources -> filters/dedup -> split by source document -> cross-split near-duplicate
removal -> leakage check -> tokenizer -> streaming packing -> balance -> manifest, all inside a
temporary directory renamed at the end.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moescope.data.blocks import (
    FORMAT_VERSION, MANIFEST_NAME, SPLITS, BlockStore, block_path, block_sources_path, dtype_for_vocab, read_manifest,
    texts_path, tokenizer_dir,
)
from moescope.data.config import DataBuildConfig
from moescope.data.packing import PackStats, block_sources, choose_rows, encoder_for, pack_to_file, truncate_block_file
from moescope.data.sources import DomainTexts, collect_domain
from moescope.data.split import (
    GROUP_FIELD, NEAR_DUP_MIN_SHINGLES, NEAR_DUP_NUM_PERM, NEAR_DUP_SHINGLE_WORDS, NEAR_DUP_THRESHOLD, SPLIT_RULES,
    check_leakage, document_key, eval_count,
    domain_seed, document_groups, split_groups,
)
from moescope.data.text import SourceText, digest_hashes, hash_text
from moescope.data.tokenizer import make_tokenizer, save_tokenizer, tokenizer_size
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_json, remove_stale_temporaries
from moescope.io.config import to_dict
from moescope.io.provenance import environment_info, sha256_file

log = logging.getLogger(__name__)

TEXT_HASHES_NAME = "text_hashes.json"


def config_fingerprint(cfg: DataBuildConfig) -> str:
    """Identifies a build: same fingerprint, same inputs (for built-in sources, same bytes) and the same
    split rules. The built-in code and prose come from this Python's standard library and gensim's wheel,
    so their versions are part of it; a build under older split rules is another build, never reused."""
    builtin = any(src.backend == "builtin" for dom in cfg.domains for src in dom.all_sources)
    payload = json.dumps({"format_version": FORMAT_VERSION, "split_rules": SPLIT_RULES, "config": to_dict(cfg),
                          "builtin_inputs": builtin_input_versions() if builtin else None}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def builtin_input_versions() -> dict[str, str | None]:
    """Versions of what the built-in sources read: the standard library's Python and gensim's data."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        gensim = version("gensim")
    except PackageNotFoundError:
        gensim = None
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "gensim": gensim}


def _existing_build(out_dir: Path, fingerprint: str, overwrite: bool) -> BlockStore | None:
    """The reusable existing build, None to build, or an error for a directory we must not clobber."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise MoescopeError(f"output path exists and is not a directory: {out_dir}")
    if overwrite or not any(out_dir.iterdir()):
        return None
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise MoescopeError(f"output directory {out_dir} is not empty and holds no moescope build; "
                            "choose another --out or pass --overwrite")
    try:
        old = read_manifest(manifest).get("config_fingerprint")
    except MoescopeError:
        old = None
    if old != fingerprint:
        raise MoescopeError(f"output directory {out_dir} already holds a different build "
                            f"(config fingerprint {str(old)[:12]} != {fingerprint[:12]}: another config, split "
                            "rules or built-in inputs' Python / gensim); pass --overwrite or choose another --out")
    log.info("%s already holds this build; reusing it", out_dir)
    return BlockStore.open(out_dir)


@dataclass
class _SplitPack:
    stats: PackStats
    hashes: list[str]
    bytes: int


def _write_split(
    tmp: Path, split: str, domain: str, texts: list[SourceText], encode: Any, eos_id: int,
    cfg: DataBuildConfig, dtype: Any, bar: Any,
) -> _SplitPack:
    """Write texts/{split}/{domain}.jsonl and pack blocks/{split}/{domain}.bin in one streaming pass."""
    hashes: list[str] = []
    nbytes = 0
    tpath = texts_path(tmp, split, domain)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    with open(tpath, "w", encoding="utf-8") as fh:

        def stream():
            nonlocal nbytes
            for t in texts:
                fh.write(json.dumps(t.to_record(), ensure_ascii=False) + "\n")
                hashes.append(hash_text(t.text))
                nbytes += len(t.text.encode("utf-8"))
                yield t.text

        stats = pack_to_file(stream(), encode, eos_id=eos_id, block_size=cfg.block_size_tokens, dtype=dtype,
                             path=block_path(tmp, split, domain), batch_texts=cfg.encode_batch_texts,
                             batch_chars=cfg.encode_batch_chars,
                             on_batch=bar.update)
    if stats.n_blocks == 0:
        raise MoescopeError(
            f"domain {domain!r}, {split} split: block size {cfg.block_size_tokens} is larger than the whole "
            f"domain ({stats.n_tokens} tokens); lower --block-size or add texts"
        )
    return _SplitPack(stats=stats, hashes=hashes, bytes=nbytes)


def _balance(tmp: Path, cfg: DataBuildConfig, splits: dict[str, dict[str, dict]], dtype: Any) -> None:
    """Truncate every domain to the smallest block count of its split (seeded choice of blocks)."""
    for split in SPLITS:
        counts = {d: s["n_blocks"] for d, s in splits[split].items()}
        keep = min(counts.values())
        for d, n in counts.items():
            if n > keep:
                rows = choose_rows(n, keep, domain_seed(cfg.seed, f"balance/{split}/{d}"))
                truncate_block_file(block_path(tmp, split, d), rows, cfg.block_size_tokens, dtype)
                sources = block_sources_path(tmp, split, d)
                np.save(sources, np.load(sources)[rows])  # the kept blocks keep their packed numbers
            splits[split][d]["balanced_from_blocks"] = n
            splits[split][d]["n_blocks"] = keep
            splits[split][d]["n_block_tokens"] = keep * cfg.block_size_tokens


def _imbalance_warnings(cfg: DataBuildConfig, splits: dict[str, dict[str, dict]]) -> list[str]:
    tokens = {d: s["n_tokens"] for d, s in splits["train"].items()}
    if len(tokens) < 2:
        return []
    hi, lo = max(tokens, key=tokens.get), min(tokens, key=tokens.get)
    ratio = tokens[hi] / max(1, tokens[lo])
    if ratio <= cfg.imbalance_warn_ratio:
        return []
    msg = (f"train token counts differ by {ratio:.2f}x ({hi}: {tokens[hi]}, {lo}: {tokens[lo]}) "
           f"> {cfg.imbalance_warn_ratio}x; pass --balance to truncate every domain to the smallest block count")
    return [msg]


def build_dataset(cfg: DataBuildConfig, out_dir: str | Path, *, overwrite: bool = False) -> BlockStore:
    """Build the data directory `out_dir` from `cfg` and return it opened as a BlockStore.

    Nothing appears at `out_dir` unless the whole build succeeds (temporary directory,
    renamed at the end). An existing different build is an error unless `overwrite`.
    """
    out_dir = Path(out_dir)
    for stale in remove_stale_temporaries(out_dir):
        log.warning("removed %s, left by an interrupted build of %s", stale, out_dir)
    fingerprint = config_fingerprint(cfg)
    reuse = _existing_build(out_dir, fingerprint, overwrite)
    if reuse is not None:
        return reuse
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. sources, filters, dedup, size target
    collected: dict[str, DomainTexts] = {}
    for dom in tqdm(cfg.domains, desc="reading sources", unit="domain", disable=None):
        t0 = time.perf_counter()
        collected[dom.name] = collect_domain(dom, cfg.seed)
        timings[f"read_{dom.name}_s"] = time.perf_counter() - t0
        log.info("%s: %d texts (%s)", dom.name, len(collected[dom.name].texts), collected[dom.name].stats.stopped_by)

    # 2. document groups (near-duplicates joined), split by group, leakage check (all domains)
    t0 = time.perf_counter()
    all_texts = [t for dt in collected.values() for t in dt.texts]
    groups = document_groups(all_texts)
    timings["near_duplicates_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = split_groups({name: dt.texts for name, dt in collected.items()}, groups, seed=cfg.seed,
                         eval_fraction=cfg.eval_fraction, eval_min_texts=cfg.eval_min_texts,
                         eval_min_documents=cfg.eval_min_documents)
    all_train = [t for ts in parts["train"].values() for t in ts]
    all_eval = [t for ts in parts["eval"].values() for t in ts]
    leakage = check_leakage(all_train, all_eval, pairs=groups.crossing(all_texts, all_eval))
    joined = groups.joined_documents(all_texts)
    group_of = {id(t): g for t, g in zip(all_texts, groups.key)}
    for t, g in zip(all_texts, groups.key):
        if g != document_key(t):  # the analysis resamples groups: it reads them off the text records
            t.meta[GROUP_FIELD] = g
    group_sizes = Counter(groups.key)
    largest_group = {d: max((group_sizes[group_of[id(t)]] for t in dt.texts), default=0)
                     for d, dt in collected.items()}
    split_warnings = []
    for d, dt in collected.items():
        target = eval_count(len(dt.texts), cfg.eval_fraction, cfg.eval_min_texts)
        if len(parts["eval"][d]) > 2 * target:  # whole groups are drawn: one large group overshoots
            split_warnings.append(f"{d}: eval holds {len(parts['eval'][d])} texts for a target of {target} "
                                  f"(largest document group: {largest_group[d]} texts)")
    timings["split_s"] = time.perf_counter() - t0

    exists = out_dir.exists()
    with atomic_directory(out_dir, overwrite=overwrite or exists) as tmp:
        # 3. tokenizer (BPE sees the train split only)
        t0 = time.perf_counter()
        tok = make_tokenizer(cfg.tokenizer, (t.text for t in all_train), model_max_length=cfg.block_size_tokens)
        save_tokenizer(tok, tokenizer_dir(tmp))
        vocab = tokenizer_size(tok)
        eos_id = int(tok.eos_token_id)
        dtype = dtype_for_vocab(vocab)
        timings["tokenizer_s"] = time.perf_counter() - t0

        # 4. streaming tokenize + pack, texts written alongside
        t0 = time.perf_counter()
        encode = encoder_for(tok)
        splits: dict[str, dict[str, dict]] = {s: {} for s in SPLITS}
        hashes: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
        total = sum(len(v) for s in SPLITS for v in parts[s].values())
        with tqdm(total=total, desc="tokenizing + packing", unit="text", disable=None) as bar:
            for split in SPLITS:
                for name in collected:
                    res = _write_split(tmp, split, name, parts[split][name], encode, eos_id, cfg, dtype, bar)
                    np.save(block_sources_path(tmp, split, name),
                            block_sources(res.stats.text_ends, res.stats.n_blocks, cfg.block_size_tokens))
                    hashes[split][name] = res.hashes
                    splits[split][name] = {
                        "n_documents": len({document_key(t) for t in parts[split][name]}),
                        "n_document_groups": len({group_of[id(t)] for t in parts[split][name]}),
                        "n_texts": res.stats.n_texts, "n_chars": res.stats.n_chars, "n_bytes": res.bytes,
                        "n_tokens": res.stats.n_tokens, "n_blocks": res.stats.n_blocks,
                        "n_block_tokens": res.stats.n_blocks * cfg.block_size_tokens,
                        "tail_tokens_dropped": res.stats.tail_tokens_dropped,
                        "texts_digest": digest_hashes(res.hashes),
                    }
        timings["pack_s"] = time.perf_counter() - t0

        # 5. balance
        warnings = split_warnings + _imbalance_warnings(cfg, splits)
        for w in warnings:
            log.warning(w)
        if cfg.balance:
            t0 = time.perf_counter()
            _balance(tmp, cfg, splits, dtype)
            timings["balance_s"] = time.perf_counter() - t0

        # 6. provenance (block digests after balancing: a training run checks them before reading)
        for split in SPLITS:
            for d, entry in splits[split].items():
                path = block_path(tmp, split, d)
                if path.is_file():
                    entry["blocks_sha256"] = sha256_file(path)
                    entry["block_sources_sha256"] = sha256_file(block_sources_path(tmp, split, d))
        atomic_write_json(tmp / TEXT_HASHES_NAME, {"algorithm": "sha256 of UTF-8 text, in texts/*.jsonl line order",
                                                   "splits": hashes})
        timings["total_s"] = time.perf_counter() - t_start
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config_fingerprint": fingerprint,
            "block_size": cfg.block_size_tokens,
            "vocab_size": vocab,
            "eos_token_id": eos_id,
            "dtype": dtype.name,
            "domains": list(collected),
            "seed": cfg.seed,
            "split_rule": {"eval_fraction": cfg.eval_fraction, "eval_min_texts": cfg.eval_min_texts,
                           "eval_min_documents": cfg.eval_min_documents, "rules_version": SPLIT_RULES,
                           "level": "source document (article, code file, generated math problem by family "
                                    "and numbers, other math problem by statement), documents with near-duplicate "
                                    "texts joined into one group, before tokenization and packing"},
            "splits": splits,
            "sources": {n: dt.source for n, dt in collected.items()},
            "filtering": {n: dt.stats.as_dict() for n, dt in collected.items()},
            "leakage_check": {"passed": True, "raw_overlap": leakage.raw_overlap,
                              "normalized_overlap": leakage.normalized_overlap,
                              "document_overlap": leakage.document_overlap,
                              "near_duplicates": leakage.near_duplicates,
                              "method": "sha256 of every train and eval text, raw and whitespace-normalized; "
                                        "source documents of both splits; near-duplicate pairs across the split"},
            "near_duplicates": {
                "method": f"MinHash LSH (datasketch, {NEAR_DUP_NUM_PERM} permutations) on lower-cased "
                          f"{NEAR_DUP_SHINGLE_WORDS}-word shingles (Python source with its string literals set aside), "
                          f"estimated Jaccard >= {NEAR_DUP_THRESHOLD} between two texts of different documents (all domains, "
                          f"texts of {NEAR_DUP_MIN_SHINGLES}+ shingles); their documents form one group, which the "
                          "split keeps on one side",
                "threshold": NEAR_DUP_THRESHOLD,
                "pairs": {d: sum(all_texts[i].domain == d for i, _, _ in groups.pairs) for d in collected},
                "documents_joined": {d: joined.get(d, 0) for d in collected},
                "largest_group_texts": largest_group,
                "min_shingles_to_join": NEAR_DUP_MIN_SHINGLES,
                "examples": [{"a": all_texts[i].id, "b": all_texts[j].id, "jaccard": round(jac, 3)}
                             for i, j, jac in groups.pairs[:5]],
            },
            "tokenizer": {"kind": cfg.tokenizer.kind, "vocab_size": vocab,
                          "requested_vocab_size": cfg.tokenizer.vocab_size if cfg.tokenizer.kind == "bpe" else None,
                          "name_or_path": cfg.tokenizer.name_or_path if cfg.tokenizer.kind == "gpt2" else None,
                          "trained_on": "train split only" if cfg.tokenizer.kind == "bpe" else None,
                          "sha256": sha256_file(tokenizer_dir(tmp) / "tokenizer.json")},
            "balance": {"enabled": cfg.balance, "warn_ratio": cfg.imbalance_warn_ratio},
            "warnings": warnings,
            "text_hashes": {"file": TEXT_HASHES_NAME, "sha256": sha256_file(tmp / TEXT_HASHES_NAME)},
            "config": to_dict(cfg),
            "environment": environment_info(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    log.info("built %s in %.1f s", out_dir, time.perf_counter() - t_start)
    return BlockStore.open(out_dir)
