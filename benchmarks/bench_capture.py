"""Cost of routing capture against a plain eval forward (claim: at most +10%).

Both variants run the same blocks through the same model and compute the per-block
loss; "capture" additionally records every MoE layer's expert choices, gate weights
and router probabilities and builds the routing tables. The variants alternate in
rounds within one process, so load from other processes hits both alike; the table
shows the median and min over rounds of capture time / plain time.

    .venv/bin/python benchmarks/bench_capture.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.analysis.capture import capture_routing
from moescope.data.blocks import FORMAT_VERSION, BlockStore, block_path, dtype_for_vocab
from moescope.moe.config import MoEConfig
from moescope.moe.gpt2 import install_moe

SIZES = {
    # the demo-scale model of anchors.md section 6: 4 layers, d=128, MoE in 2-3, 8 experts
    "demo d=128 L4 ctx128": dict(n_layer=4, n_embd=128, n_head=4, ctx=128, vocab=4096, layers=[2, 3]),
    "d=256 L6 ctx256": dict(n_layer=6, n_embd=256, n_head=4, ctx=256, vocab=8192, layers=[4, 5]),
}


def make_store(root: Path, vocab: int, block: int, n_blocks: int) -> BlockStore:
    rng = np.random.default_rng(0)
    dtype = dtype_for_vocab(vocab)
    splits = {"train": {}, "eval": {}}
    for name in ("code", "math", "prose"):
        for split in splits:
            path = block_path(root, split, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            rng.integers(0, vocab, size=(n_blocks, block)).astype(dtype).tofile(path)
            splits[split][name] = {"n_blocks": n_blocks}
    manifest = {"format_version": FORMAT_VERSION, "block_size": block, "vocab_size": vocab,
                "eos_token_id": vocab - 1, "dtype": dtype.name, "domains": ["code", "math", "prose"],
                "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return BlockStore.open(root)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--blocks-per-domain", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least disturbed by other jobs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; machine shared with other jobs")
    print(f"{'model':<24} {'tokens':>7} {'plain s':>8} {'capture s':>9} {'median ratio':>13} {'min ratio':>10}")
    for label, s in SIZES.items():
        model = GPT2LMHeadModel(GPT2Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                                           n_positions=s["ctx"], vocab_size=s["vocab"],
                                           bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1))
        install_moe(model, MoEConfig(n_experts=8, top_k=1, layers=s["layers"]))
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            store = make_store(Path(tmp), s["vocab"], s["ctx"], args.blocks_per_domain)
            run = dict(batch_blocks=8, progress=False)
            capture_routing(model, store, capture=True, **run)  # warm-up
            capture_routing(model, store, capture=False, **run)
            plain, cap, ratios = [], [], []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                took = {}
                for flag in order:
                    t0 = time.perf_counter()
                    capture_routing(model, store, capture=flag, **run)
                    took[flag] = time.perf_counter() - t0
                plain.append(took[False])
                cap.append(took[True])
                ratios.append(took[True] / took[False])
            n_tok = 3 * args.blocks_per_domain * s["ctx"]
            print(f"{label:<24} {n_tok:>7} {statistics.median(plain):>8.3f} {statistics.median(cap):>9.3f} "
                  f"{statistics.median(ratios):>13.3f} {min(ratios):>10.3f}")


if __name__ == "__main__":
    main()
