"""Cost of checkpoint integrity: sha256 manifest on save and its verification on resume.

One checkpoint of a GPT-2-shaped MoE model with AdamW state after one step is written with
`save_checkpoint` (fsync, manifest included), then, alternating in rounds within one process:
"write" = save_checkpoint again, "manifest" = write_manifest alone (the sha256 part of a save),
"verify" = verify_checkpoint alone (the sha256 part of a resume), "load" = load_checkpoint
(verify + JSON/safetensors + finiteness checks + model rebuild). The table gives the median
and min over rounds, and the sha256 share of save and load.

    .venv/bin/python benchmarks/bench_checkpoint.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.moe.config import MoEConfig
from moescope.moe.install import install_moe
from moescope.train.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint, write_manifest
from moescope.train.config import OptimConfig
from moescope.train.optim import build_optimizer, build_scheduler

SIZES = {
    "demo d=128 L4, 8 experts in 2": dict(n_layer=4, n_embd=128, n_head=4, vocab=4096, layers=[2, 3]),
    "d=512 L6, 8 experts in 2": dict(n_layer=6, n_embd=512, n_head=8, vocab=16384, layers=[4, 5]),
}


def build(size: dict):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=size["vocab"], n_positions=128, n_embd=size["n_embd"],
                                       n_layer=size["n_layer"], n_head=size["n_head"]))
    install_moe(model, MoEConfig(n_experts=8, top_k=1, layers=size["layers"]), seed=0)
    opt = build_optimizer(model, OptimConfig(), [])
    sched = build_scheduler(opt, OptimConfig(), 100)
    x = torch.randint(0, size["vocab"], (2, 64))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"{'model':<32} {'MiB':>6} {'save s':>8} {'sha256 s':>9} {'verify s':>9} {'load s':>8} "
          f"{'sha/save':>9} {'verify/load':>12}")
    for name, size in SIZES.items():
        model, opt, sched = build(size)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            path = save_checkpoint(root, 1, model, opt, sched, {"config": {}})
            mib = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
            times: dict[str, list[float]] = {"save": [], "manifest": [], "verify": [], "load": []}
            for _ in range(args.rounds):
                for key, fn in (("save", lambda: save_checkpoint(root, 1, model, opt, sched, {"config": {}})),
                                ("manifest", lambda: write_manifest(path, 1)),
                                ("verify", lambda: verify_checkpoint(path)),
                                ("load", lambda: load_checkpoint(path))):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:<32} {mib:>6.1f} {med['save']:>8.3f} {med['manifest']:>9.3f} {med['verify']:>9.3f} "
              f"{med['load']:>8.3f} {med['manifest'] / med['save']:>9.1%} {med['verify'] / med['load']:>12.1%}")
        print(f"{'  (min over rounds)':<32} {'':>6} {min(times['save']):>8.3f} {min(times['manifest']):>9.3f} "
              f"{min(times['verify']):>9.3f} {min(times['load']):>8.3f}")


if __name__ == "__main__":
    main()
