"""Training throughput of the `moe` arm against the `dense` arm (same active parameters), whole trainer steps.

Both arms are real `Trainer`s on the same synthetic data directory (the demo shape:
vocab 4096, 128-token blocks, 16 sequences per step); their steps are interleaved in
rounds inside one process so that load from other processes hits both alike, and the
table reports the median (and min / max) of the per-round ratio of tokens per second.
The MoE arm uses the demo preset's MoE and loss settings (expert count, balancing, router
noise); `--experts 8,16` times other expert counts in the same run.
Target: moe / dense >= 0.97. The GPT-2 reference's own MoE code reached 0.93-0.94 (4 layers,
d=128) and 0.95-0.97 (6 layers, d=256) on this kind of 2-core CPU (shared/research/anchors.md §7).

    python benchmarks/bench_train.py [--rounds 20] [--steps-per-round 3] [--threads 2] [--sizes demo,large] [--experts 8,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moescope.data.blocks import FORMAT_VERSION, block_path, dtype_for_vocab
from moescope.demo import load_demo_config
from moescope.io.config import to_dict
from moescope.runtime import keep_freed_memory
from moescope.train.config import experiment_config_from_dict, resolve_arms
from moescope.train.trainer import Trainer

SIZES = {
    "demo": {"n_layers": 4, "d_model": 128, "n_heads": 4, "moe_layers": [2, 3]},
    "large": {"n_layers": 6, "d_model": 256, "n_heads": 4, "moe_layers": [4, 5]},
}


def write_random_store(root: Path, vocab: int = 4096, block: int = 128, n_train: int = 512, n_eval: int = 8) -> Path:
    rng = np.random.default_rng(0)
    dtype = dtype_for_vocab(vocab)
    domains = ["code", "math", "prose"]
    splits: dict = {"train": {}, "eval": {}}
    for split, n in (("train", n_train), ("eval", n_eval)):
        for d in domains:
            path = block_path(root, split, d)
            path.parent.mkdir(parents=True, exist_ok=True)
            rng.integers(0, vocab, size=(n, block)).astype(dtype).tofile(path)
            splits[split][d] = {"n_blocks": n}
    (root / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "block_size": block, "vocab_size": vocab, "eos_token_id": vocab - 1,
        "dtype": dtype.name, "domains": domains, "splits": splits}))
    return root


def build_trainers(data: Path, size: dict, tmp: Path, n_experts: int | None = None) -> dict[str, Trainer]:
    """dense and moe Trainers with the demo preset's MoE and loss settings (experts, balancing, noise)."""
    demo = to_dict(load_demo_config("demo").experiment)
    moe = {**demo["moe"], "layers": size["moe_layers"]}
    if n_experts is not None:
        moe["n_experts"] = n_experts
    cfg = experiment_config_from_dict({
        "data_dir": str(data), "arms": ["dense", "moe"],
        "model": {"n_layers": size["n_layers"], "d_model": size["d_model"], "n_heads": size["n_heads"],
                  "context_tokens": 128},
        "moe": moe, "loss": demo["loss"], "optim": demo["optim"],
        "train": {"steps": 100_000, "batch_sequences": 16},
        "tracking": {"progress_bar": False},
    })
    runs = resolve_arms(cfg)
    return {name: Trainer(run, tmp / name, name=name, write=False) for name, run in runs.items()}


def measure(trainers: dict[str, Trainer], rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    tokens = {n: t.tokens_per_step * steps_per_round for n, t in trainers.items()}
    for t in trainers.values():  # warm-up
        t.train_step()
    rates: dict[str, list[float]] = {n: [] for n in trainers}
    for r in range(rounds):
        names = list(trainers) if r % 2 == 0 else list(reversed(trainers))  # alternate who goes first
        for n in names:
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                trainers[n].train_step()
            rates[n].append(tokens[n] / (time.perf_counter() - t0))
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sizes", default="demo,large")
    ap.add_argument("--experts", default="", help="comma-separated expert counts to time instead of the preset's")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the CLI does for real runs
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.steps_per_round} "
          f"steps per arm, 16 x 128 tokens per step; machine shared with other processes")
    print(f"{'size':<10} {'dense tok/s':>10} {'moe tok/s':>10} {'moe/dense median':>17} {'min':>6} {'max':>6}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = write_random_store(tmp / "data")
        experts = [int(e) for e in args.experts.split(",") if e] or [None]
        for size_name in args.sizes.split(","):
            for n_exp in experts:
                trainers = build_trainers(data, SIZES[size_name], tmp / f"{size_name}{n_exp}", n_exp)
                rates = measure(trainers, args.rounds, args.steps_per_round)
                ratios = [m / d for m, d in zip(rates["moe"], rates["dense"])]
                e = trainers["moe"].cfg.moe.n_experts
                print(f"{size_name + f'/E={e}':<10} {statistics.median(rates['dense']):>10,.0f} "
                      f"{statistics.median(rates['moe']):>10,.0f} {statistics.median(ratios):>17.3f} "
                      f"{min(ratios):>6.3f} {max(ratios):>6.3f}")
    print("reference (GPT-2 MoE project's code, same kind of machine): 0.93-0.94 (demo), 0.95-0.97 (large); target >= 0.97")
    return 0


if __name__ == "__main__":
    sys.exit(main())
