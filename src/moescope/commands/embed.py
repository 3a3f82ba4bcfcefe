"""`moescope embed train|eval|encode|compare`: MoE sentence encoders on sentence-transformers."""

from __future__ import annotations

import argparse
from typing import Any


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (.toml/.yaml/.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.steps=100 --set encoder.moe.top_k=2 (repeatable)")
    p.add_argument("--base-model", help="sentence-transformers model dir or hub id (default: all-MiniLM-L6-v2, offline)")
    p.add_argument("--pairs-hf", metavar="NAME_OR_PATH",
                   help="train/evaluate on a Hugging Face pair dataset (hub id, parquet/jsonl/csv file, or save_to_disk dir)")


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model whose modules.json names custom module classes (runs their code); "
                        "moescope's own MoE encoders never need it")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("embed", help="MoE sentence-embedding encoders: train, evaluate, encode, compare")
    sub = parser.add_subparsers(dest="embed_command", metavar="ACTION")

    t = sub.add_parser("train", help="upcycle (or keep dense) an encoder, fine-tune it on pairs, evaluate, save")
    t.add_argument("--out", required=True, help="run directory: model/ (a sentence-transformers model: the best "
                   "validated checkpoint when train.eval_every_steps is set), metrics.json")
    t.add_argument("--dense", action="store_true", help="fine-tune the dense encoder (no MoE)")
    t.add_argument("--overwrite", action="store_true")
    _config_args(t)
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="IR metrics per domain (+ intervals) and k-NN domain accuracy of a saved encoder")
    e.add_argument("model", help="sentence-transformers model directory (e.g. RUN/model)")
    e.add_argument("--out", help="metrics JSON path (default: print only)")
    e.add_argument("--pairs", metavar="FILE",
                   help="evaluate on your own pairs instead: .csv/.tsv (header) or .jsonl with sentence1, sentence2, "
                        "score (STS -> Spearman with a bootstrap interval) or query, positive (retrieval -> IR metrics)")
    _trust_arg(e)
    _config_args(e)
    e.set_defaults(func=run_eval)

    c = sub.add_parser("encode", help="embed texts with a saved encoder (optionally search them)")
    c.add_argument("model", help="sentence-transformers model directory")
    c.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl (field --field)")
    c.add_argument("--field", default="text", help="jsonl field holding the text (default: text)")
    c.add_argument("--out", help="embeddings .npy (float32, L2-normalized, one row per text)")
    c.add_argument("--query", action="append", default=[], help="print the --top-k nearest texts (repeatable)")
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--batch-size", type=int, default=64)
    _trust_arg(c)
    c.set_defaults(func=run_encode)

    m = sub.add_parser("compare", help="base vs dense fine-tune vs MoE top-1/top-2 at matched steps (table + plot)")
    m.add_argument("--out", required=True, help="output directory: results.json, table.md, comparison.png, "
                   "embedding_pca.png / embedding_umap.png (held-out embeddings by domain and first-choice expert)")
    m.add_argument("--overwrite", action="store_true")
    _config_args(m)
    m.set_defaults(func=run_compare)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _load_config(cls, args: argparse.Namespace):
    from moescope.io.config import layered_config

    flags = {
        "encoder.base_model": args.base_model or None,
        "pairs": {"source": "hf", "name_or_path": args.pairs_hf} if args.pairs_hf else None,
        "encoder.use_moe": False if getattr(args, "dense", False) else None,
    }
    return layered_config(cls, args.config, args.overrides, flags)


def _quiet_libraries() -> None:
    import logging

    # The IR evaluator logs every metric at INFO; the results files hold them.
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.embed.config import EmbedRunConfig
    from moescope.embed.encoder import build_encoder
    from moescope.embed.evaluate import evaluate_encoder, without_arrays
    from moescope.embed.pairs import load_pairs, pair_stats
    from moescope.embed.train import build_loss_dataset, train_encoder, validation_evaluator
    from moescope.errors import MoescopeError
    from moescope.io.atomic import atomic_directory, atomic_write_json
    from moescope.io.config import to_dict
    from moescope.io.provenance import environment_info

    _quiet_libraries()
    cfg = _load_config(EmbedRunConfig, args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MoescopeError(f"{out} already exists (use --overwrite)")
    split = load_pairs(cfg.pairs)
    enc = cfg.encoder
    model = build_encoder(enc.base_model, enc.moe if enc.use_moe else None, pooling=enc.pooling,
                          max_seq_length_tokens=enc.max_seq_length_tokens, seed=cfg.train.seed)
    miner = None
    if cfg.train.loss != "mnrl":
        miner = build_encoder(enc.base_model, None, pooling=enc.pooling, max_seq_length_tokens=enc.max_seq_length_tokens)
    evaluator = validation_evaluator(split.validation, batch_size=cfg.eval.batch_size) if cfg.train.eval_every_steps else None
    result = train_encoder(model, build_loss_dataset(split.train, cfg.train.loss, miner, cfg.train), cfg.train,
                           evaluator=evaluator)
    report = without_arrays(evaluate_encoder(model, split.eval, split.train, cfg.eval, show_progress_bar=True))
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        model.save(str(tmp / "model"))
        atomic_write_json(tmp / "config.json", to_dict(cfg))
        atomic_write_json(tmp / "metrics.json", {
            "pairs": pair_stats(split), **report, "log_history": result.log_history,
            "routing_history": result.routing_history, "validation": result.validation,
            "environment": environment_info(),
        })
    if result.validation:
        v = result.validation
        history = ", ".join(f"{h['step']}: {h['value']:.3f}" for h in v["history"])
        print(f"validation {v['metric']} by step ({history}); the saved model is the best checkpoint, "
              f"step {v['best_step']} of {v['last_step']} ({v['best_value']:.3f})")
    pooled = report["retrieval_all"]
    print(f"saved {out / 'model'}; held-out MRR@10 {_with_ci(pooled, 'mrr@10')}, nDCG@10 {pooled['ndcg@10']:.3f}")
    return 0


def _with_ci(row: dict, metric: str) -> str:
    """A metric of an evaluation report with its interval ("[n/a]" where it has none)."""
    from moescope.report.fmt import fmt_interval

    low, high = row[f"{metric}_ci"]
    return fmt_interval({"estimate": row[metric], "low": low, "high": high})


def _print_stats(stats: dict) -> None:
    if stats:
        print(f"{'geometry':>10}: mean pairwise cosine {stats['mean_cosine']:.3f}, "
              f"effective rank {stats['effective_rank']:.1f} of {stats['dim']} ({stats['n_texts']} texts)")


def _print_retrieval(report: dict) -> None:
    for domain, row in report["retrieval"].items():
        print(f"{domain:>10}: MRR@10 {_with_ci(row, 'mrr@10')}"
              f"  nDCG@10 {row['ndcg@10']:.3f}  R@1 {row['recall@1']:.3f}  ({row['n_queries']} queries from "
              f"{row['n_units']} sources; 95% CI resamples sources)")


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.embed.config import EmbedRunConfig
    from moescope.embed.encoder import load_encoder
    from moescope.embed.evaluate import evaluate_encoder, evaluate_user_pairs, without_arrays
    from moescope.embed.pairs import load_pairs, read_pair_file
    from moescope.io.atomic import atomic_write_json

    _quiet_libraries()
    model_dir = Path(args.model)
    run_config = model_dir.parent / "config.json"
    if not args.config and not args.pairs and run_config.is_file():
        # Same pairs recipe as training, so the held-out side is the one training never saw.
        args.config = str(run_config)
    cfg = _load_config(EmbedRunConfig, args)
    if args.pairs:
        user = read_pair_file(args.pairs)  # refused before the model loads
        report = without_arrays(evaluate_user_pairs(load_encoder(model_dir, trust_remote_code=args.trust_remote_code),
                                                    user, cfg.eval, name=Path(args.pairs).stem, show_progress_bar=True))
        report.pop("cosine", None)
        if user.kind == "sts":
            lo, hi = report["spearman_ci"]
            print(f"{'STS':>10}: Spearman {report['spearman']:.3f} [{lo:.3f}, {hi:.3f}]  "
                  f"Pearson {report['pearson']:.3f}  ({report['n_pairs']} pairs, cosine similarity)")
        else:
            _print_retrieval(report)
    else:
        split = load_pairs(cfg.pairs)
        model = load_encoder(model_dir, trust_remote_code=args.trust_remote_code)
        report = without_arrays(evaluate_encoder(model, split.eval, split.train, cfg.eval, show_progress_bar=True))
        _print_retrieval(report)
        knn = report["knn"]
        if "accuracy" in knn:
            print(f"{'k-NN':>10}: domain accuracy {knn['accuracy']:.3f}")
    _print_stats(report["embedding_stats"])
    if args.out:
        atomic_write_json(args.out, report)
    return 0


def _read_texts(path, field: str) -> list[str]:
    import json
    from pathlib import Path

    from moescope.errors import MoescopeError

    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"input file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise MoescopeError(f"{path}:{n}: no {field!r} field in a JSON object ({exc})") from exc
        return texts
    return [line for line in lines if line.strip()]


def run_encode(args: argparse.Namespace) -> int:
    import io

    import numpy as np

    from moescope.embed.encoder import load_encoder
    from moescope.errors import MoescopeError
    from moescope.io.atomic import atomic_write_bytes
    from moescope.io.config import Range, check_ranges

    check_ranges(args, {"top_k": Range(low=1), "batch_size": Range(low=1)}, {"top_k": "--top-k", "batch_size": "--batch-size"})
    _quiet_libraries()
    texts = _read_texts(args.input, args.field)
    if not texts:
        raise MoescopeError(f"{args.input}: no texts")
    model = load_encoder(args.model, trust_remote_code=args.trust_remote_code)
    emb = model.encode(texts, batch_size=args.batch_size, show_progress_bar=True, convert_to_numpy=True,
                       normalize_embeddings=True).astype(np.float32)
    if args.out:
        buf = io.BytesIO()
        np.save(buf, emb)
        atomic_write_bytes(args.out, buf.getvalue())
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.out}")
    if args.query:
        import torch
        from sentence_transformers import util

        q = model.encode(args.query, convert_to_tensor=True, normalize_embeddings=True)
        hits = util.semantic_search(q, torch.as_tensor(emb), top_k=args.top_k)
        for query, rows in zip(args.query, hits):
            print(f"query: {query}")
            for h in rows:
                print(f"  {h['score']:.3f}  {texts[h['corpus_id']][:100]!r}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from moescope.embed.compare import run_comparison
    from moescope.embed.config import CompareConfig

    _quiet_libraries()
    cfg = _load_config(CompareConfig, args)
    doc = run_comparison(cfg, args.out, overwrite=args.overwrite)
    from pathlib import Path

    print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    maps = ", ".join(f"{args.out}/embedding_{m}.png" for m in cfg.projections)
    print(f"results: {args.out}/results.json, plot: {args.out}/comparison.png, embedding maps: {maps or 'none'} "
          f"({doc['seconds_total']:.0f} s)")
    return 0
