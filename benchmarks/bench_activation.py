"""Dense GPT-2 FFN with GPT-2's Python gelu_new against torch's fused tanh GELU (issue 18, item 1).

Claim: the fused op (`F.gelu(approximate="tanh")`, transformers' "gelu_pytorch_tanh", the
same function to ~1e-7) makes the FFN faster than gelu_new, and running it on cache-sized
row blocks (what moe/activation.py did for gelu_new) no longer pays, so moescope builds
every model with the plain fused op.

Variants, one fwd+bwd of c_fc -> activation -> c_proj (Conv1D, GPT-2's layout) on 2048
rows with a fixed upstream gradient, parameter grads set to None before each pass:
  gelu_new        transformers' NewGELUActivation (seven elementwise ops)
  fused           transformers' GELUTanh = F.gelu(x, approximate="tanh")   (the reference)
  fused-blocked   the fused op on ~2 MiB row blocks, concatenated (the old wrapper's scheme)
Interleaved rounds (every variant once per round); the ratio to `fused` is taken within
a round, then the median over rounds. wall/2thr is what training sees and moves with
other processes on a shared machine; cpu/1thr (time.process_time, one thread) is the
work itself.

Run: .venv/bin/python benchmarks/bench_activation.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

SHAPES = ((128, 512), (768, 3072))  # (d, ff): the demo's width and GPT-2 small's
ROWS = 2048
BLOCK_BYTES = 2 * 2**20


class Blocked(nn.Module):
    """`fn` applied to row blocks of about BLOCK_BYTES, results concatenated (same values)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(64, BLOCK_BYTES // (x.shape[-1] * x.element_size()) // 64 * 64)
        return torch.cat([self.fn(part) for part in x.split(rows)]) if x.shape[0] > rows else self.fn(x)


class FFN(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(ff, d), Conv1D(d, ff)
        self.act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    variants = {"gelu_new": ACT2FN["gelu_new"], "fused": ACT2FN["gelu_pytorch_tanh"],
                "fused-blocked": Blocked(ACT2FN["gelu_pytorch_tanh"])}
    for d, ff in SHAPES:
        torch.manual_seed(0)
        ffn = FFN(d, ff)
        x = torch.randn(ROWS, d, requires_grad=True)
        grad = torch.randn(ROWS, d)

        def step(act: nn.Module) -> None:
            ffn.act = act
            ffn(x).backward(grad)
            x.grad = None
            for p in ffn.parameters():
                p.grad = None

        print(f"dense FFN {ROWS} x {d} -> {ff} -> {d}, fwd+bwd, median over {args.rounds} interleaved rounds")
        for label, threads, clock in (("wall/2thr", 2, time.perf_counter), ("cpu/1thr", 1, time.process_time)):
            torch.set_num_threads(threads)
            for act in variants.values():
                step(act)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                for name, act in variants.items():
                    t = clock()
                    step(act)
                    times[name].append(clock() - t)
            for name in variants:
                ratio = statistics.median(a / b for a, b in zip(times[name], times["fused"]))
                print(f"  {label:9s} {name:14s} {statistics.median(times[name]) * 1e3:9.2f} ms   "
                      f"x fused {ratio:.3f}")


if __name__ == "__main__":
    main()
