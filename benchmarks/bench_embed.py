"""Sentences per second of MoE encoders vs the dense encoder at the same active parameters.

Claim (issue 7): an upcycled top-1 MoE encoder (8 experts in the last third of
all-MiniLM-L6-v2's layers) encodes at >= 0.8x the dense encoder's sentences/s. Top-1
activates one expert of the dense FFN's size per token, so its active parameters equal
the dense model's plus a 384 x 8 router. Top-2 (twice the FFN compute in its MoE layers)
is shown for reference.

Method: real held-out texts of the built-in corpus (code, math, prose); the variants run
interleaved in rounds in one process, so load from other processes on a shared machine
hits all of them alike; the table gives the median and the best (max) per-round ratio.
Two workloads: `encode` (SentenceTransformer.encode, inference, batches sorted by length
as sentence-transformers does) and `train step` (forward + backward of one batch).

Run: .venv/bin/python benchmarks/bench_embed.py [--rounds 7] [--sentences 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sentences", type=int, default=256, help="texts encoded per round and variant")
    ap.add_argument("--train-batch", type=int, default=32, help="texts per forward+backward step")
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()

    import torch

    from moescope.embed.config import PairSourceConfig
    from moescope.embed.encoder import build_encoder
    from moescope.embed.pairs import load_pairs
    from moescope.moe.config import MoEConfig

    split = load_pairs(PairSourceConfig(texts_per_domain=200, max_eval_pairs_per_domain=None))
    texts = sorted({t for p in split.eval + split.train for t in (p.anchor, p.positive)})
    texts = texts[:: max(1, len(texts) // args.sentences)][: args.sentences]
    train_texts = texts[: args.train_batch]

    variants = {
        "dense": build_encoder(max_seq_length_tokens=args.max_seq_length),
        "moe top-1": build_encoder(moe=MoEConfig(n_experts=args.experts, top_k=1), max_seq_length_tokens=args.max_seq_length),
        "moe top-2": build_encoder(moe=MoEConfig(n_experts=args.experts, top_k=2), max_seq_length_tokens=args.max_seq_length),
    }
    features = {name: m.preprocess(train_texts) for name, m in variants.items()}
    n_tokens = int(features["dense"]["attention_mask"].sum())

    def encode(name: str) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        variants[name].encode(texts, batch_size=32)
        return time.perf_counter() - t, time.process_time() - c

    def train_step(name: str) -> float:
        model = variants[name]
        model.train()
        t, c = time.perf_counter(), time.process_time()
        out = model(dict(features[name]))["sentence_embedding"]
        out.pow(2).sum().backward()
        elapsed = time.perf_counter() - t, time.process_time() - c
        model.zero_grad(set_to_none=True)
        model.eval()
        return elapsed

    for fn in (encode, train_step):  # warm-up
        for name in variants:
            fn(name)
    times: dict[str, dict[str, list[tuple[float, float]]]] = {
        w: {n: [] for n in variants} for w in ("encode", "train step")
    }
    for _ in range(args.rounds):
        for workload, fn in (("encode", encode), ("train step", train_step)):
            for name in variants:
                times[workload][name].append(fn(name))

    print(f"machine: {os.cpu_count()} CPUs (shared with other jobs), torch threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds; encode: {len(texts)} texts, batch 32, max {args.max_seq_length} tokens; "
          f"train step: {len(train_texts)} texts ({n_tokens} real tokens)")
    # Wall-clock ratios are what a user sees; CPU-time ratios (this process, all threads)
    # are steadier when other jobs share the cores.
    print(f"{'workload':<11} {'variant':<10} {'median s':>9} {'sent/s':>8} {'wall ratio':>11} {'best':>6} "
          f"{'cpu ratio':>10}")
    for workload, by_name in times.items():
        n = len(texts) if workload == "encode" else len(train_texts)
        dense = by_name["dense"]
        for name, ts in by_name.items():
            wall = [w for w, _ in ts]
            wall_ratios = [d[0] / t[0] for d, t in zip(dense, ts)]  # speed ratio = time(dense) / time(variant)
            cpu_ratios = [d[1] / t[1] for d, t in zip(dense, ts)]
            print(f"{workload:<11} {name:<10} {statistics.median(wall):>9.3f} {n / statistics.median(wall):>8.1f} "
                  f"{statistics.median(wall_ratios):>10.2f}x {max(wall_ratios):>5.2f}x {statistics.median(cpu_ratios):>9.2f}x")
    print("target: moe top-1 / dense >= 0.80x (same active parameters)")


if __name__ == "__main__":
    main()
