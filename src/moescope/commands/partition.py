"""`moescope partition`: split a corpus into N partitions (one per expert / branch) and report how."""

from __future__ import annotations

import argparse
from typing import Any

from moescope.io.config import Range


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "partition",
        help="split a corpus into N partitions (random / clustered / curriculum) with overlap and balance",
        description="Split a corpus into N partitions, one directory each (usable as a `files` data source), "
        "plus a report (sizes, overlaps, top terms, purity and ARI against the domains).",
    )
    src = p.add_argument_group("corpus (default: the built-in code / math / prose domains)")
    src.add_argument("--data", help="a built data directory: partition its texts of --split")
    src.add_argument("--split", default="train", choices=["train", "eval"], help="split of --data (default train)")
    src.add_argument("--data-config", metavar="FILE",
                     help="data build config file (.toml/.yaml/.json): partition its domains' sources")
    src.add_argument("--files", action="append", default=[], metavar="DOMAIN=PATH[,PATH...]",
                     help="take DOMAIN from .txt/.jsonl/.py files, directories or globs (repeatable)")
    src.add_argument("--target-mb", type=float, help="size target per source domain in MB (default: the data config's)")
    src.add_argument("--max-texts-per-domain", type=int, help="seeded subsample: at most this many texts per domain")
    p.add_argument("--out", required=True, help="output directory (one partition_NN/ per partition + report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cfg = p.add_argument_group("partitioning (PartitionConfig; flags override --config and --set)")
    cfg.add_argument("--config", help="config file (.toml/.yaml/.json) mapping onto PartitionConfig")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a PartitionConfig field, e.g. --set balance_tolerance=0.1 (repeatable)")
    cfg.add_argument("-n", "--n-partitions", type=int, help="number of partitions (default 3)")
    cfg.add_argument("--strategy", choices=["random", "clustered", "curriculum"],
                     help="default clustered (sentence embeddings + KMeans)")
    cfg.add_argument("--overlap-ratio", type=float, help="extra share of texts from other partitions (default 0.1)")
    cfg.add_argument("--seed", type=int)
    cfg.add_argument("--min-article-length", type=int, metavar="CHARS",
                     help="drop texts shorter than this many characters first (default 0)")
    cfg.add_argument("--balance-tolerance", type=float, help="allowed deviation from the mean size (default 0.2)")
    cfg.add_argument("--balance-unit", choices=["auto", "chars", "texts"],
                     help="what partition size counts: chars (~ training tokens) or texts; default auto: "
                          "clustered tries both and keeps the better-separated partitions (silhouette)")
    cfg.add_argument("--embedding-backend", choices=["minilm", "tfidf"],
                     help="clustered: all-MiniLM-L6-v2 sentence embeddings (default) or tf-idf + truncated SVD")
    p.add_argument("--curriculum-model", metavar="DIR",
                   help="curriculum: score texts by this trained model's perplexity instead of mean word length")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer of --curriculum-model (default: the one saved beside or inside the model)")
    p.add_argument("--embedding-model", help="sentence-transformers model path or hub name (default all-MiniLM-L6-v2)")
    p.add_argument("--embedding-cache", help="embedding cache directory (default ~/.cache/moescope/embeddings)")
    p.add_argument("--no-embedding-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--embed-max-tokens", type=int, default=128, help="truncate texts to this many word pieces (default 128)")
    p.set_defaults(func=run_partition)


def _corpus_from_args(args: argparse.Namespace):
    import dataclasses

    from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig
    from moescope.errors import MoescopeError
    from moescope.io.config import from_dict, load_config_file
    from moescope.partition.io import read_data_dir_corpus, read_source_corpus

    if args.data and (args.data_config or args.files):
        raise MoescopeError("--data reads a built data directory; do not combine it with --data-config or --files")
    if args.data:
        return read_data_dir_corpus(args.data, args.split)
    cfg = from_dict(DataBuildConfig, load_config_file(args.data_config)) if args.data_config else DataBuildConfig()
    domains = list(cfg.domains)
    if args.files:
        domains = [] if not args.data_config else domains
        for item in args.files:
            if "=" not in item:
                raise MoescopeError(f"--files {item!r} must look like DOMAIN=PATH[,PATH...]")
            name, paths = item.split("=", 1)
            domains = [d for d in domains if d.name != name.strip()]
            domains.append(DomainConfig(name=name.strip(), source=SourceConfig(backend="files", paths=paths.split(","))))
    if args.target_mb is not None:
        domains = [dataclasses.replace(d, target_mb=args.target_mb) for d in domains]
    return read_source_corpus(dataclasses.replace(cfg, domains=domains))


def _perplexity_scorer(model_dir: str, tokenizer_dir: str | None):
    def score(texts: list[str]):
        from moescope.partition.scoring import score_perplexity

        return score_perplexity(texts, model_dir, tokenizer_dir=tokenizer_dir)

    return score


def build_config(args: argparse.Namespace) -> Any:
    """Config file, then --set overrides, then the dedicated flags (last wins)."""
    from moescope.io.config import layered_config
    from moescope.partition.config import PartitionConfig

    flags = {
        "n_partitions": args.n_partitions,
        "strategy": args.strategy,
        "overlap_ratio": args.overlap_ratio,
        "seed": args.seed,
        "min_article_length_chars": args.min_article_length,
        "balance_tolerance": args.balance_tolerance,
        "balance_unit": args.balance_unit,
        "embedding_backend": args.embedding_backend,
        "curriculum_score": "perplexity" if args.curriculum_model else None,
    }
    return layered_config(PartitionConfig, args.config, args.overrides, flags, ranges=RANGES,
                          flag_names={"n_partitions": "--n-partitions", "overlap_ratio": "--overlap-ratio",
                                      "seed": "--seed", "min_article_length_chars": "--min-article-length",
                                      "balance_tolerance": "--balance-tolerance"})


RANGES = {"n_partitions": Range(low=1), "overlap_ratio": Range(0.0, 1.0), "seed": Range(low=0),
          "min_article_length_chars": Range(low=0), "balance_tolerance": Range(0.0, 1.0, high_open=True)}
# flags outside PartitionConfig (the corpus and the embedder)
FLAG_RANGES = {"target_mb": Range(low=0.0, low_open=True), "max_texts_per_domain": Range(low=1),
               "embed_max_tokens": Range(low=1)}


def run_partition(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from moescope.errors import MoescopeError
    from moescope.io.config import check_ranges
    from moescope.io.provenance import environment_info
    from moescope.partition.embedding import default_cache_dir
    from moescope.partition.io import write_partitions
    from moescope.partition.partitioner import EmbeddingOptions, partition_texts, summarize_outcome

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MoescopeError(f"{out} already exists (pass --overwrite to replace it)")
    check_ranges(args, FLAG_RANGES, {"target_mb": "--target-mb", "max_texts_per_domain": "--max-texts-per-domain",
                                     "embed_max_tokens": "--embed-max-tokens"})
    cfg = build_config(args)
    if args.curriculum_model and cfg.strategy != "curriculum":
        raise MoescopeError("--curriculum-model only applies to --strategy curriculum")
    if cfg.curriculum_score == "perplexity" and not args.curriculum_model:
        raise MoescopeError("curriculum_score = perplexity needs --curriculum-model DIR")
    if args.tokenizer and not args.curriculum_model:
        raise MoescopeError("--tokenizer goes with --curriculum-model")

    start = time.perf_counter()
    corpus = _corpus_from_args(args).subsample(args.max_texts_per_domain, args.seed)
    print(f"partitioning {len(corpus.texts)} texts into {cfg.n_partitions} ({cfg.strategy})")
    cache = None if args.no_embedding_cache else Path(args.embedding_cache) if args.embedding_cache else default_cache_dir()
    try:
        outcome = partition_texts(
            corpus.texts,
            cfg,
            domains=corpus.domains,
            scores=_perplexity_scorer(args.curriculum_model, args.tokenizer) if args.curriculum_model else None,
            embedding=EmbeddingOptions(model=args.embedding_model, cache_dir=cache, max_tokens=args.embed_max_tokens),
        )
    except ValueError as exc:
        raise MoescopeError(str(exc)) from exc
    report = summarize_outcome(outcome)
    report["corpus"] = corpus.source
    report["seconds_total"] = round(time.perf_counter() - start, 2)
    report["environment"] = environment_info()
    ids = [corpus.ids[i] for i in outcome.kept_index]
    write_partitions(outcome, ids, out, report=report, overwrite=args.overwrite)

    print(f"sizes (texts): {report['sizes']}  chars: {report['sizes_chars']}  within band: {report['within_band']}")
    if "adjusted_rand_index" in report:
        print(f"ARI vs domains {report['adjusted_rand_index']:.3f}  purity {report['purity']:.3f}")
    if "embedding" in report:
        e = report["embedding"]
        print(f"embedding: {e['backend']} {e['seconds']:.1f} s ({e['n_computed']} computed, {e['n_cached']} cached)")
    for p, terms in enumerate(report["top_terms"]):
        print(f"  partition {p}: {', '.join(terms[:8])}")
    print(f"wrote {out} (report: {out / 'report.md'})")
    return 0
