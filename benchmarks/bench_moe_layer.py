"""MoE layer speed against the fastest dense FFN torch offers and transformers v5's MoE blocks.

Claim (issue 18, item 1): forward+backward of moescope's top-1 MoE layer (E=8, 2048 tokens)
costs <= 1.08x the fastest dense FFN of one expert's size at d=768 and <= 1.15x at d=256, for
GELU and SwiGLU experts alike, and is ahead of every transformers peer, grouped_mm included.
Issue 20: the fine-grained layer (each expert cut in m=4, top-4 of 4E) costs <= 1.3x the coarse one.

One fwd+bwd per call: input [4, 512, d], a fixed upstream gradient, parameter grads set to None
before each call (as after optimizer.zero_grad()). All weights N(0, 0.02), biases zero.

Floor (per expert kind): every dense candidate below is timed; the one with the lowest median
is the floor, and each variant's ratio is its time / the floor's time in the same round.
  gelu:   dense-linear   nn.Linear -> F.gelu(approximate="tanh") -> nn.Linear   (d -> ff -> d)
          dense-addmm    GPT-2's Conv1D layout (addmm on [in, out] weights), fused GELU
          dense-compiled (--compile) torch.compile of dense-linear (inductor, CPU)
  swiglu: I = 2ff/3 rounded to a multiple of 8 (same matmul FLOPs as the GELU FFN)
          dense-swiglu   three nn.Linear (gate, up, down), silu(gate) * up
          dense-gateup   gate and up as one [2I, d] nn.Linear, chunked (one GEMM fewer)
          dense-swiglu-compiled (--compile)
Variants:
  moescope-gelu / moescope-swiglu   MoELayer, dropless, STE gating, E=8 experts of the floor's size
  moescope-*-fine4                  the same E*ff parameters cut in m=4: 32 experts of ff/4, top-4
  experts-only-{gelu,swiglu}        moescope's experts alone on the tokens split evenly (no router, sort,
                                    gather, combine): the floor any layer with E separate experts has here
  mixtral-{eager,batched_mm,grouped_mm}   transformers' MixtralSparseMoeBlock, top-1
  qwen3-{eager,batched_mm,grouped_mm}     transformers' Qwen3MoeSparseMoeBlock, top-1
  nemotron-{eager,batched_mm,grouped_mm}  transformers' NemotronHExperts (non-gated experts with
                                          mlp_hidden_act="gelu_pytorch_tanh": the GELU peer) behind
                                          Mixtral's top-k router
  switch-cf1.25  (--all) transformers' SwitchTransformersSparseMLP, capacity 1.25 per 512-token sequence
  moescope-gelu-python (--all) moescope with its compiled grouped GEMM switched off (MOESCOPE_NATIVE=0)
transformers picks an experts implementation per call: the `@use_experts_implementation`
decorator on the experts class looks up `config._experts_implementation` (set by the config's
`experts_implementation=` kwarg, by `from_pretrained(..., experts_implementation=)` or by
`model.set_experts_implementation`; a PreTrainedModel defaults to "grouped_mm") in
`ALL_EXPERTS_FUNCTIONS`. batched_mm gathers one copy of its expert's weights per token
(`gate_up_proj[expert_ids]`), and backward makes a gradient of the same size: its memory is
estimated first and the variant is skipped, with the estimate printed, when it exceeds
--mem-limit-gb (default: half of the machine's available memory).

Timing: every variant once per round, rounds interleaved until the time budget is spent, wall
clock at --threads threads (--clock cpu: CPU time of this process, for a loaded machine).
"ahead" is judged pairwise: the median over rounds of ours / peer in the same round must be
below 1 against every peer of the same kind. The GELU peer's experts have no biases; moescope's
GELU experts keep GPT-2's (as the dense floors do).

Run: .venv/bin/python benchmarks/bench_moe_layer.py [--threads 2] [--budget-s 200] [--compile] [--all]
                                                     [--dims 256,768] [--designs] [--clock cpu]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import MixtralConfig, NemotronHConfig, Qwen3MoeConfig, SwitchTransformersConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, MixtralTopKRouter
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

from moescope.moe.config import MoEConfig
from moescope.moe.experts import GeluExpert, SwiGLUExpert, build_experts
from moescope.moe.grouped import run_grouped_experts
from moescope.moe.layer import MoELayer
from moescope.moe.native import ENV_SWITCH
from moescope.runtime import keep_freed_memory

E = 8
SEQ = 512
TOKENS = 2048
TARGET = {256: 1.15, 768: 1.08}
FINE_TARGET = 1.3
IMPLS = ("eager", "batched_mm", "grouped_mm")


def swiglu_width(ff: int) -> int:
    """SwiGLU intermediate size with the GELU FFN's matmul FLOPs; a multiple of 8 (grouped_mm's strides)."""
    return 8 * round(2 * ff / 3 / 8)


class DenseLinear(nn.Module):
    """nn.Linear -> fused tanh GELU -> nn.Linear."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class DenseGateUp(nn.Module):
    """SwiGLU with gate and up in one GEMM."""

    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 2 * inter, bias=False), nn.Linear(inter, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class RoutedExperts(nn.Module):
    """Mixtral's top-k router in front of any transformers `@use_experts_implementation` experts."""

    def __init__(self, router: nn.Module, experts: nn.Module) -> None:
        super().__init__()
        self.gate, self.experts = router, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        _, weights, index = self.gate(h)
        return self.experts(h, index, weights).reshape(x.shape)


class ExpertsOnly(nn.Module):
    """A moescope layer's experts alone (the grouped GEMMs) on the tokens split evenly over them: no
    router, sort, gather or combine. Its distance from the floor is what E separate expert weights cost
    (each read, packed and given its own gradient); moescope's distance from it is the routing's."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.experts = layer.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        n, e = h.shape[0], len(self.experts)
        sizes = [n // e + (1 if i < n % e else 0) for i in range(e)]
        return run_grouped_experts(self.experts, h, sizes, self.training).reshape(x.shape)


class WithoutNative(nn.Module):
    """Runs `layer` with the compiled grouped GEMM switched off; the backward follows the forward's path."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = os.environ.get(ENV_SWITCH)
        os.environ[ENV_SWITCH] = "0"
        try:
            return self.layer(x)
        finally:
            if before is None:
                del os.environ[ENV_SWITCH]
            else:
                os.environ[ENV_SWITCH] = before


def moescope_layer(d: int, width: int, kind: str, granularity: int = 1, **options) -> MoELayer:
    """E coarse experts of `width`, top-1, laid out by MoEConfig (granularity m: mE experts of width/m, top-m)."""
    cfg = MoEConfig(n_experts=E, top_k=1, expert_granularity=granularity, expert_type=kind, **options)
    w = width // granularity
    shared = build_experts(cfg.n_shared_experts, d, w, expert_type=kind) if cfg.n_shared_experts else None
    return MoELayer.from_config(cfg, build_experts(cfg.routed_experts, d, w, expert_type=kind), d,
                                shared_experts=shared)


def peer_block(family: str, impl: str, d: int, width: int) -> nn.Module:
    """A transformers MoE block, top-1 of E, its experts run by `impl`."""
    common = dict(hidden_size=d, num_experts_per_tok=1, experts_implementation=impl)
    if family == "mixtral":
        return MixtralSparseMoeBlock(MixtralConfig(intermediate_size=width, num_local_experts=E,
                                                   router_jitter_noise=0.0, **common))
    if family == "qwen3":
        return Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(moe_intermediate_size=width, num_experts=E,
                                                     norm_topk_prob=True, **common))
    if family == "nemotron":
        experts = NemotronHExperts(NemotronHConfig(moe_intermediate_size=width, n_routed_experts=E,
                                                   mlp_hidden_act="gelu_pytorch_tanh", **common))
        router = MixtralTopKRouter(MixtralConfig(num_local_experts=E, **common))
        return RoutedExperts(router, experts)
    raise ValueError(family)


def batched_mm_bytes(module: nn.Module, tokens: int) -> int:
    """Memory batched_mm needs: every expert weight gathered once per token, and its gradient in backward."""
    experts = module.experts
    per_expert = sum(p[0].numel() * p.element_size() for p in experts.parameters() if p.ndim == 3)
    return 2 * tokens * per_expert


def init_weights(module: nn.Module, seed: int) -> nn.Module:
    """N(0, 0.02) weights, zero biases, for every variant alike (transformers' are torch.empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.train()


def mem_available_gb() -> float:
    """The machine's MemAvailable in GiB (Linux); inf where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def build_variants(d: int, args) -> tuple[dict[str, tuple[nn.Module, str, str]], list[str]]:
    """{name: (module, kind, role)} with role floor / ours / fine / peer / other; and skip notes."""
    ff, inter = 4 * d, swiglu_width(4 * d)
    v: dict[str, tuple[nn.Module, str, str]] = {
        "dense-linear": (DenseLinear(d, ff), "gelu", "floor"),
        "dense-addmm": (GeluExpert(d, ff), "gelu", "floor"),
        "dense-swiglu": (SwiGLUExpert(d, inter), "swiglu", "floor"),
        "dense-gateup": (DenseGateUp(d, inter), "swiglu", "floor"),
        "moescope-gelu": (moescope_layer(d, ff, "gelu"), "gelu", "ours"),
        "moescope-gelu-fine4": (moescope_layer(d, ff, "gelu", 4), "gelu", "fine"),
        "moescope-swiglu": (moescope_layer(d, inter, "swiglu"), "swiglu", "ours"),
        "moescope-swiglu-fine4": (moescope_layer(d, inter, "swiglu", 4), "swiglu", "fine"),
    }
    for kind in ("gelu", "swiglu"):
        v[f"experts-only-{kind}"] = (ExpertsOnly(moescope_layer(d, ff if kind == "gelu" else inter, kind)), kind,
                                     "bound")
    for family, kind in (("nemotron", "gelu"), ("mixtral", "swiglu"), ("qwen3", "swiglu")):
        for impl in IMPLS:
            v[f"{family}-{impl}"] = (peer_block(family, impl, d, ff if kind == "gelu" else inter), kind, "peer")
    if args.all:
        v["switch-cf1.25"] = (SwitchTransformersSparseMLP(SwitchTransformersConfig(
            d_model=d, d_ff=ff, num_experts=E, expert_capacity=math.ceil(1.25 * SEQ / E), router_bias=False,
            router_jitter_noise=0.0, dense_act_fn="gelu_pytorch_tanh", dropout_rate=0.0)), "gelu", "peer")
        v["moescope-gelu-python"] = (WithoutNative(moescope_layer(d, ff, "gelu")), "gelu", "other")
    if args.designs:
        for name, opts in {"design-shared": {"expert_granularity": 4, "n_shared_experts": 1},
                           "design-ec": {"routing": "expert_choice", "capacity_factor": 1.0},
                           "design-sigmoid": {"router_score": "sigmoid", "balance_bias": True}}.items():
            granularity = opts.pop("expert_granularity", 1)
            v[name] = (moescope_layer(d, ff, "gelu", granularity, **opts), "gelu", "other")
    v = {name: (init_weights(m, 1), kind, role) for name, (m, kind, role) in v.items()}
    skipped = []
    limit = args.mem_limit_gb if args.mem_limit_gb is not None else mem_available_gb() / 2
    for name in [n for n in v if n.endswith("batched_mm")]:
        need = batched_mm_bytes(v[name][0], TOKENS) / 2**30
        if need > limit:
            del v[name]
            skipped.append(f"{name:<22} skipped at d={d}: batched_mm gathers a weight copy per token, "
                           f"~{need:.1f} GB for fwd+bwd > limit {limit:.1f} GB (--mem-limit-gb)")
    if args.compile:
        for base, kind in (("dense-linear", "gelu"), ("dense-swiglu", "swiglu")):
            name = base + "-compiled" if kind == "gelu" else "dense-swiglu-compiled"
            module = v[base][0]
            v[name] = (torch.compile(module), kind, "floor")
    return v, skipped


def make_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        xx = x.detach().requires_grad_()
        module(xx).backward(grad)

    return step


def release_memory() -> None:
    """Give freed heap back to the system (glibc): batched_mm's gigabytes must not stay resident."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def time_rounds(steps: dict[str, Callable[[], None]], budget_s: float, min_rounds: int, max_rounds: int,
                slow_s: float, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of `clock` per call, every step once per round, until the wall budget is spent (after min_rounds).

    A step whose warm-up call took more than `slow_s` (batched_mm: seconds per call) keeps that one
    call as its only timing, so that it cannot eat the others' rounds.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    slow = set()
    for name, step in steps.items():  # warm-up (and compilation)
        t0 = clock()
        step()
        elapsed = clock() - t0
        if elapsed > slow_s:
            slow.add(name)
            times[name].append(elapsed)
            release_memory()
    start = time.perf_counter()
    for r in range(max_rounds):
        for name, step in steps.items():
            if name in slow:
                continue
            t0 = clock()
            step()
            times[name].append(clock() - t0)
        if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return times


def paired(ours: list[float], other: list[float]) -> float:
    """Median over rounds of ours / other in the same round (< 1: ours faster); a slow variant timed
    once is compared by medians."""
    if len(ours) != len(other):
        return statistics.median(ours) / statistics.median(other)
    return statistics.median(a / b for a, b in zip(ours, other))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: what training sees; cpu: this process's CPU time (time.process_time), "
                             "much less moved by other processes on a shared machine (use with --threads 1)")
    parser.add_argument("--dims", default="256,768", help="model widths d (ff = 4d), comma-separated")
    parser.add_argument("--budget-s", type=float, default=200.0, help="time budget for all timing rounds")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd dense floors "
                        "(compiles for about a minute per shape)")
    parser.add_argument("--all", action="store_true", help="also time switch-cf1.25 and moescope without its kernel")
    parser.add_argument("--designs", action="store_true", help="also time the other designs of issue 20")
    parser.add_argument("--slow-s", type=float, default=5.0,
                        help="a variant whose warm-up call takes longer keeps that call as its only timing")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="skip batched_mm variants estimated above this (default: half the available memory)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the CLI does for real runs (moescope.runtime)
    torch.set_num_threads(args.threads)
    dims = [int(d) for d in args.dims.split(",")]
    t_start = time.perf_counter()
    print(f"MoE layer fwd+bwd, top-1 of E={E}, {TOKENS} tokens; torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.clock} clock; medians over interleaved rounds; ratio = time / the floor's time in the same round")
    weights = [d * d for d in dims]  # a round costs ~ d^2
    summary: list[str] = []
    for d, w in zip(dims, weights):
        torch.manual_seed(0)
        variants, skipped = build_variants(d, args)
        x, grad = torch.randn(TOKENS // SEQ, SEQ, d), torch.randn(TOKENS // SEQ, SEQ, d)
        steps = {name: make_step(m, x, grad) for name, (m, _, _) in variants.items()}
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        times = time_rounds(steps, args.budget_s * w / sum(weights), args.min_rounds, args.max_rounds, args.slow_s,
                            clock)
        n_rounds = max(len(ts) for ts in times.values())
        med = {name: statistics.median(ts) for name, ts in times.items()}
        floors = {}
        for kind in ("gelu", "swiglu"):
            cands = [n for n, (_, k, role) in variants.items() if k == kind and role == "floor"]
            floors[kind] = min(cands, key=med.__getitem__)
        print(f"\nd={d} ff={4 * d} (SwiGLU I={swiglu_width(4 * d)}), {n_rounds} rounds; "
              f"floors: gelu = {floors['gelu']}, swiglu = {floors['swiglu']}")
        head = f"{'variant':<24} {'kind':<7} {'ms':>9} {'x floor':>8} {'(min)':>7}  note"
        print(head)
        print("-" * len(head))
        for name, (module, kind, role) in variants.items():
            if len(times[name]) < n_rounds:  # a slow variant's one call, against the floor's median
                r = [times[name][0] / med[floors[kind]]]
            else:
                r = [a / b for a, b in zip(times[name], times[floors[kind]])]
            note = "floor" if name == floors[kind] else ("floor candidate" if role == "floor" else "")
            if len(times[name]) < n_rounds:
                note = f"slow (> {args.slow_s:.0f} s): one call, / the floor's median"
            if role == "bound":
                ours = f"moescope-{kind}"
                note = f"routing for free; moescope / this {paired(times[ours], times[name]):.3f}x"
                summary.append(f"d={d:<4} {name:<16} {statistics.median(r):.3f}x floor: E experts' weights, "
                               f"no routing (moescope-{kind} / it: {paired(times[ours], times[name]):.3f}x)")
            if role == "fine":
                coarse = name.removesuffix("-fine4")
                pf = paired(times[name], times[coarse])
                note = f"/ {coarse} {pf:.3f}x (target <= {FINE_TARGET}x: {'met' if pf <= FINE_TARGET else 'MISSED'})"
            if role == "ours":
                peers = [n for n, (_, k, rl) in variants.items() if k == kind and rl == "peer"]
                vs = {p: paired(times[name], times[p]) for p in peers}
                closest = max(vs, key=vs.__getitem__)
                target = TARGET.get(d)
                ratio = statistics.median(r)
                verdict = "" if target is None else f"target <= {target}x {'met' if ratio <= target else 'MISSED'}; "
                note = (f"{verdict}/ closest peer {closest} {vs[closest]:.3f}x "
                        f"({'ahead of all' if vs[closest] < 1 else 'NOT ahead'})")
                summary.append(f"d={d:<4} {name:<16} {ratio:.3f}x floor ({floors[kind]}); {note}")
            print(f"{name:<24} {kind:<7} {med[name] * 1e3:>9.1f} {statistics.median(r):>8.3f} {min(r):>7.3f}  {note}")
        for line in skipped:
            print(line)
    print("\nsummary (noisy on a shared machine; ratios are within one interleaved run)")
    print("\n".join(summary))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"elapsed {time.perf_counter() - t_start:.0f} s; load average {load:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
