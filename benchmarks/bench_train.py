"""Training throughput of the `moe` arm against the `dense` arm (same active parameters), whole trainer steps.

All arms are real `Trainer`s on the same synthetic data directory (the demo shape:
vocab 4096, 128-token blocks, 16 sequences per step); their steps are interleaved in
rounds inside one process so that load from other processes hits all alike, and the
table reports the median (and min / max) of the per-round ratio of tokens per second.
The MoE arm uses the demo preset's MoE and loss settings (expert count, balancing, router
noise); `--experts 8,16` times other expert counts in the same run.

The peer arm is the same dense trainer with the MLPs of the MoE blocks replaced by
transformers' own Switch Transformers sparse MLP (the "loop over experts, index, run,
index_add" dispatch the GPT-2 reference also used), same expert count and GELU expert
size, capacity = sequence length (dropless), no router noise and no auxiliary losses:
every simplification is in the peer's favour.

Target (issue 18): moe / dense >= 0.95 at the demo preset. The GPT-2 reference's own MoE code reached 0.93-0.94 (4 layers,
d=128) and 0.95-0.97 (6 layers, d=256) on this kind of 2-core CPU (shared/research/anchors.md §7),
in a model whose vocabulary is not stated there; `--vocab 50257` times GPT-2's, where the output
layer dominates a step and any MoE layer's overhead shows less.

    python benchmarks/bench_train.py [--rounds 20] [--steps-per-round 3] [--threads 2] [--sizes demo,large]
                                     [--experts 8,16] [--vocab 4096] [--no-peer] [--breakdown] [--clock cpu]

After the table: one optimizer step per arm (tensors, parameters, CPU ms on one thread), which
shows whether the MoE arm's optimizer costs by tensor count or by parameter count; and the moe arm's
parameters stepped once as trained and once with each layer's experts stacked into one 3-D tensor
per weight kind (issue 18's question: would 3-D expert parameters close the optimizer gap?).
"""

from __future__ import annotations

import argparse
import contextlib
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
from moescope.train.optim import build_optimizer, build_scheduler
from moescope.train.trainer import Trainer
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

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


def build_trainers(
    data: Path, size: dict, tmp: Path, n_experts: int | None = None, peer: bool = True
) -> dict[str, Trainer]:
    """dense and moe Trainers with the demo preset's MoE and loss settings (experts, balancing, noise),
    plus the peer (see the module docstring)."""
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
    trainers = {name: Trainer(run, tmp / name, name=name, write=False) for name, run in runs.items()}
    if peer:
        trainers["peer"] = _switch_peer(Trainer(runs["dense"], tmp / "peer", name="peer", write=False),
                                        size["moe_layers"], moe["n_experts"])
    return trainers


def _switch_peer(trainer: Trainer, layers: list[int], n_experts: int) -> Trainer:
    """The dense trainer with transformers' Switch sparse MLP in `layers` (dropless), optimizer rebuilt."""
    model = trainer.raw_model
    d = model.config.n_embd
    seq = model.config.n_positions
    for i in layers:
        model.transformer.h[i].mlp = SwitchTransformersSparseMLP(SwitchTransformersConfig(
            d_model=d, d_ff=4 * d, num_experts=n_experts, expert_capacity=seq, router_bias=False,
            router_jitter_noise=0.0, dense_act_fn=model.config.activation_function, dropout_rate=0.0))
    model.train()
    routers = [model.transformer.h[i].mlp.router.classifier.weight for i in layers]
    optimizer = build_optimizer(model, trainer.cfg.optim, routers)
    trainer.scheduler = build_scheduler(optimizer, trainer.cfg.optim, trainer.cfg.train.steps)
    trainer.optimizer = trainer.accelerator.prepare(optimizer)
    if trainer.model is not model:  # a DDP wrapper would still hold the old MLPs' parameters
        raise RuntimeError("the peer arm is built for one unwrapped process")
    return trainer


def measure(trainers: dict[str, Trainer], rounds: int, steps_per_round: int,
            clock=time.perf_counter) -> dict[str, list[float]]:
    tokens = {n: t.tokens_per_step * steps_per_round for n, t in trainers.items()}
    for t in trainers.values():  # warm-up
        t.train_step()
    rates: dict[str, list[float]] = {n: [] for n in trainers}
    for r in range(rounds):
        names = list(trainers) if r % 2 == 0 else list(reversed(trainers))  # alternate who goes first
        for n in names:
            t0 = clock()
            for _ in range(steps_per_round):
                trainers[n].train_step()
            rates[n].append(tokens[n] / (clock() - t0))
    return rates


def forward_backward(trainer: Trainer) -> None:
    """Forward and backward of the step's micro-batches on the cross-entropy only, gradients starting
    empty as after zero_grad(set_to_none=True); the step counter does not move."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.train()
    for x in trainer._micro_batches(trainer.step):
        trainer.accelerator.backward(trainer._forward(x))


def measure_breakdown(trainers: dict[str, Trainer], rounds: int, steps_per_round: int) -> dict[str, dict[str, float]]:
    """Median ms per step of forward+backward and of the whole step, interleaved in rounds."""
    times: dict[str, dict[str, list[float]]] = {n: {"fb": [], "step": []} for n in trainers}
    for r in range(rounds):
        for n in trainers if r % 2 == 0 else reversed(list(trainers)):
            for part, fn in (("fb", forward_backward), ("step", Trainer.train_step)):
                # forward_backward leaves its gradients in place; a step must start from none, as
                # after the previous step's zero_grad, or its backward would add onto them (untimed)
                trainers[n].optimizer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                for _ in range(steps_per_round):
                    fn(trainers[n])
                times[n][part].append((time.perf_counter() - t0) / steps_per_round * 1e3)
    return {n: {part: statistics.median(v) for part, v in parts.items()} for n, parts in times.items()}


def ffn_modules(trainer: Trainer, layers: list[int]) -> list[torch.nn.Module]:
    """The feed-forward module (dense MLP, MoELayer or the peer's sparse MLP) of each block in `layers`."""
    return [trainer.raw_model.transformer.h[i].mlp for i in layers]


def measure_parts(trainers: dict[str, Trainer], layers: list[int], rounds: int) -> dict[str, dict[str, float]]:
    """Median wall ms per step of the parts where the arms differ, interleaved in rounds, at torch's threads:
    ffn = forward+backward of the FFN modules of `layers` on the step's activations (a fixed input
    [16, 128, d] and upstream gradient, parameter gradients set to None first), optimizer = AdamW's
    step, clip = the gradient-norm clip (moescope's: it reads the norm of every gradient)."""
    from moescope.train.optim import clip_grad_norm

    any_trainer = next(iter(trainers.values()))
    d = any_trainer.raw_model.config.n_embd
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, d, generator=gen)
    up = torch.randn(16, 128, d, generator=gen)
    times: dict[str, dict[str, list[float]]] = {n: {"ffn": [], "experts": [], "optimizer": [], "clip": []}
                                                for n in trainers}
    for t in trainers.values():
        forward_backward(t)  # gradients in place for the optimizer and clip timings
    for r in range(rounds):
        for n in trainers if r % 2 == 0 else reversed(list(trainers)):
            trainer = trainers[n]
            mods = ffn_modules(trainer, layers)
            t0 = time.perf_counter()
            for m in mods:
                for p in m.parameters():
                    p.grad = None
                xi = x.clone().requires_grad_(True)
                out = m(xi)
                (out[0] if isinstance(out, tuple) else out).backward(up)
            times[n]["ffn"].append((time.perf_counter() - t0) * 1e3)
            times[n]["experts"].append(_experts_only_ms(mods, x, up) if n == "moe" else times[n]["ffn"][-1])
            forward_backward(trainer)
            t0 = time.perf_counter()
            clip_grad_norm(trainer.raw_model.parameters(), 1e9)
            times[n]["clip"].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            trainer.optimizer.step()
            times[n]["optimizer"].append((time.perf_counter() - t0) * 1e3)
    for t in trainers.values():
        t.optimizer.zero_grad(set_to_none=True)
    return {n: {part: statistics.median(v) for part, v in parts.items()} for n, parts in times.items()}


def _experts_only_ms(mods: list[torch.nn.Module], x: torch.Tensor, up: torch.Tensor) -> float:
    """Wall ms of forward+backward of the MoE layers' experts alone (moescope's grouped GEMMs) on the
    same tokens split evenly over the experts: no router, no sort, no gather or combine. What an MoE
    layer of this shape would cost with routing for free: its distance from the dense FFN is the price
    of E experts' separate weights (each read, packed and given a gradient of its own)."""
    from bench_moe_layer import ExpertsOnly  # the layer benchmark's bound, on this arm's own experts

    t0 = time.perf_counter()
    for m in mods:
        for p in m.parameters():
            p.grad = None
        ExpertsOnly(m).train()(x.clone().requires_grad_(True)).backward(up)
    return (time.perf_counter() - t0) * 1e3


def optimizer_cost(trainer: Trainer, reps: int = 5) -> tuple[int, int, float]:
    """(parameter tensors, parameters, CPU ms of one optimizer step on one thread, fastest of `reps`).

    CPU time on one thread, because a step's wall time on a loaded machine says more about the load;
    the gradients are the last forward+backward's (the step's values do not matter here).
    """
    forward_backward(trainer)
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        trainer.optimizer.step()
        times.append(time.process_time() - t0)
    torch.set_num_threads(threads)
    trainer.optimizer.zero_grad(set_to_none=True)
    return len(params), sum(p.numel() for p in params), min(times) * 1e3


def stacked_expert_cost(trainer: Trainer, reps: int = 5) -> tuple[tuple[int, float], tuple[int, float]]:
    """The moe arm's parameters in one fused AdamW, as trained (one tensor per expert weight) and with each
    MoE layer's experts stacked into one 3-D tensor per weight kind (transformers v5 / torchtitan layout):
    ((tensors, CPU ms), (tensors, CPU ms)) of one step on one thread, fastest of `reps`. Same elements,
    same gradients, one parameter group each, so only the tensor count differs."""
    from moescope.moe.model import moe_layers

    forward_backward(trainer)
    model = trainer.raw_model
    in_experts: set[int] = set()
    stacked: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in moe_layers(model).values():
        by_name: dict[str, list[torch.Tensor]] = {}
        for expert in layer.experts:
            for name, p in expert.named_parameters():
                by_name.setdefault(name, []).append(p)
                in_experts.add(id(p))
        for ps in by_name.values():
            stacked.append((torch.stack([p.detach() for p in ps]), torch.stack([p.grad for p in ps])))
    flat = [(p.detach(), p.grad) for p in model.parameters() if p.grad is not None]
    rest = [(p.detach(), p.grad) for p in model.parameters() if p.grad is not None and id(p) not in in_experts]

    def cost(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
        params = []
        for value, grad in pairs:
            q = value.clone().requires_grad_(True)
            q.grad = grad.clone()
            params.append(q)
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            opt.step()
            times.append(time.process_time() - t0)
        torch.set_num_threads(threads)
        return len(params), min(times) * 1e3

    result = cost(flat), cost(rest + stacked)
    trainer.optimizer.zero_grad(set_to_none=True)
    return result


def gemm_split_cost(d: int, ff: int, n_experts: int, tokens: int = 2048, reps: int = 30) -> list[tuple[str, float, float]]:
    """What E separate expert weights cost the BLAS itself, before any moescope code: the six GEMMs of one
    FFN's forward and backward (fc, proj; their input and weight gradients) as one GEMM over all `tokens`
    rows and as `n_experts` GEMMs of tokens / E rows each (same FLOPs, torch.mm as the grouped kernel calls
    it), CPU ms on one thread, fastest of 5 rounds of `reps`. [(name, one GEMM ms, E GEMMs ms)]."""
    gen = torch.Generator().manual_seed(0)
    m = tokens // n_experts
    x, h = torch.randn(tokens, d, generator=gen), torch.randn(tokens, ff, generator=gen)
    gy, gh = torch.randn(tokens, d, generator=gen), torch.randn(tokens, ff, generator=gen)
    w1 = [torch.randn(d, ff, generator=gen) for _ in range(n_experts)]
    w2 = [torch.randn(ff, d, generator=gen) for _ in range(n_experts)]
    shapes = {  # name: (rows, right-hand matrix of expert e) as the forward / backward compute them
        "fc forward": (x, lambda e: w1[e]), "proj forward": (h, lambda e: w2[e]),
        "fc input grad": (gh, lambda e: w1[e].t()), "proj input grad": (gy, lambda e: w2[e].t()),
    }

    def cpu_ms(fn) -> float:
        fn()
        best = []
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(reps):
                fn()
            best.append((time.process_time() - t0) / reps * 1e3)
        return min(best)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for name, (a, rhs) in shapes.items():
        rows.append((name, cpu_ms(lambda: a.mm(rhs(0))),
                     cpu_ms(lambda: [a[e * m:(e + 1) * m].mm(rhs(e)) for e in range(n_experts)])))
    for name, (a, g) in {"fc weight grad": (x, gh), "proj weight grad": (h, gy)}.items():
        rows.append((name, cpu_ms(lambda: a.t().mm(g)),
                     cpu_ms(lambda: [a[e * m:(e + 1) * m].t().mm(g[e * m:(e + 1) * m]) for e in range(n_experts)])))
    torch.set_num_threads(threads)
    return rows


def experts_overhead(layer, tokens: int = 2048, rounds: int = 40) -> dict[str, float]:
    """Median wall ms of one FFN's forward+backward four ways, interleaved, at torch's threads, on one MoE
    layer's GELU experts (tokens split evenly): a dense FFN of one expert's shape through autograd (what
    the dense arm runs); the grouped experts through autograd (what the moe arm runs, routing aside); the
    grouped kernel's six calls alone on preallocated buffers, no autograd; and the six dense GEMMs alone.
    grouped - raw grouped is the autograd wrapper's cost (per-expert inputs, gradient buffers and
    AccumulateGrad); raw grouped - raw dense, the kernel's and the BLAS's."""
    from torch.nn import functional as F

    from moescope.moe.grouped import MIN_EXPERT_ROWS, run_grouped_experts
    from moescope.moe.native import grouped_kernels

    experts = layer.experts
    n_exp = len(experts)
    fc, proj = experts[0].c_fc, experts[0].c_proj
    d, ff = fc.weight.shape
    gen = torch.Generator().manual_seed(0)
    x, up = torch.randn(tokens, d, generator=gen), torch.randn(tokens, d, generator=gen)
    sizes = [tokens // n_exp] * n_exp
    kernels = grouped_kernels()
    w1, b1 = [e.c_fc.weight.detach() for e in experts], [e.c_fc.bias.detach() for e in experts]
    w2, b2 = [e.c_proj.weight.detach() for e in experts], [e.c_proj.bias.detach() for e in experts]
    h, y, gh, gx = x.new_empty(tokens, ff), x.new_empty(tokens, d), x.new_empty(tokens, ff), x.new_empty(tokens, d)
    gw1, gb1 = [torch.empty_like(w) for w in w1], [torch.empty_like(b) for b in b1]
    gw2, gb2 = [torch.empty_like(w) for w in w2], [torch.empty_like(b) for b in b2]

    def dense() -> None:
        for q in (*fc.parameters(), *proj.parameters()):
            q.grad = None
        proj(F.gelu(fc(x.clone().requires_grad_(True)), approximate="tanh")).backward(up)

    def grouped() -> None:
        for q in experts.parameters():
            q.grad = None
        run_grouped_experts(experts, x.clone().requires_grad_(True), sizes, True).backward(up)

    def raw_grouped() -> None:
        kernels.grouped_rows_mm(h, x, w1, b1, sizes, False, MIN_EXPERT_ROWS)
        a = F.gelu(h, approximate="tanh")
        kernels.grouped_rows_mm(y, a, w2, b2, sizes, False, MIN_EXPERT_ROWS)
        kernels.grouped_rows_mm(gh, up, w2, [], sizes, True, MIN_EXPERT_ROWS)
        kernels.grouped_weight_grads(gw2, gb2, a, up, sizes, True)
        g = torch.ops.aten.gelu_backward(gh, h, approximate="tanh")
        kernels.grouped_rows_mm(gx, g, w1, [], sizes, True, MIN_EXPERT_ROWS)
        kernels.grouped_weight_grads(gw1, gb1, x, g, sizes, True)

    def raw_dense() -> None:
        torch.addmm(b1[0], x, w1[0], out=h)
        a = F.gelu(h, approximate="tanh")
        torch.addmm(b2[0], a, w2[0], out=y)
        torch.mm(up, w2[0].t(), out=gh)
        a.t().mm(up), up.sum(0)
        g = torch.ops.aten.gelu_backward(gh, h, approximate="tanh")
        torch.mm(g, w1[0].t(), out=gx)
        x.t().mm(g), g.sum(0)

    ways = {"dense FFN": dense, "grouped experts": grouped, "raw grouped kernel": raw_grouped,
            "raw dense GEMMs": raw_dense}
    with torch.no_grad():
        for fn in (raw_grouped, raw_dense):
            fn()
    for fn in (dense, grouped):
        fn()
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(rounds):
        for name, fn in ways.items() if r % 2 == 0 else reversed(list(ways.items())):
            with torch.no_grad() if name.startswith("raw") else contextlib.nullcontext():
                t0 = time.perf_counter()
                for _ in range(3):
                    fn()
                times[name].append((time.perf_counter() - t0) / 3 * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sizes", default="demo,large")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: what training sees; cpu: this process's CPU time (time.process_time), much less "
                         "moved by other processes on a shared machine (use with --threads 1)")
    ap.add_argument("--experts", default="", help="comma-separated expert counts to time instead of the preset's")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the demo's is 4096; GPT-2's 50257)")
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers Switch peer arm")
    ap.add_argument("--breakdown", action="store_true",
                    help="also split each arm's step into forward+backward and the rest (aux losses, clip, AdamW, "
                         "zero_grad, bookkeeping), in ms per step, with the ratio the rest alone allows")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as the CLI does for real runs
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, {args.rounds} rounds x {args.steps_per_round} "
          f"steps per arm, 16 x 128 tokens per step, vocab {args.vocab}; machine shared with other processes")
    head = f"{'size':<10} {'dense tok/s':>11} {'moe tok/s':>10} {'moe/dense median':>17} {'min':>6} {'max':>6}"
    if not args.no_peer:
        head += f" {'peer tok/s':>10} {'peer/dense median':>18} {'min':>6} {'max':>6}"
    print(head)
    breakdowns: list[str] = []
    part_rows: list[str] = []
    optimizer_rows: list[str] = []
    stack_rows: list[str] = []
    gemm_rows: list[str] = []
    overhead_rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = write_random_store(tmp / "data", vocab=args.vocab)
        experts = [int(e) for e in args.experts.split(",") if e] or [None]
        for size_name in args.sizes.split(","):
            for n_exp in experts:
                trainers = build_trainers(data, SIZES[size_name], tmp / f"{size_name}{n_exp}", n_exp,
                                          peer=not args.no_peer)
                rates = measure(trainers, args.rounds, args.steps_per_round,
                                time.perf_counter if args.clock == "wall" else time.process_time)
                e = trainers["moe"].cfg.moe.n_experts
                line = f"{size_name + f'/E={e}':<10} {statistics.median(rates['dense']):>11,.0f}"
                for arm in ("moe", "peer") if not args.no_peer else ("moe",):
                    ratios = [m / d for m, d in zip(rates[arm], rates["dense"])]
                    width = 17 if arm == "moe" else 18
                    line += (f" {statistics.median(rates[arm]):>10,.0f} {statistics.median(ratios):>{width}.3f}"
                             f" {min(ratios):>6.3f} {max(ratios):>6.3f}")
                print(line, flush=True)
                for arm, trainer in trainers.items():
                    n_tensors, n_params, ms = optimizer_cost(trainer)
                    optimizer_rows.append(f"{size_name + f'/E={e}':<10} {arm:<6} {n_tensors:>8} {n_params / 1e6:>8.2f}M "
                                          f"{ms:>8.2f}")
                split_rows = gemm_split_cost(SIZES[size_name]["d_model"], 4 * SIZES[size_name]["d_model"], e)
                one, many = sum(r[1] for r in split_rows), sum(r[2] for r in split_rows)
                gemm_rows.extend(f"{size_name + f'/E={e}':<10} {name:<17} {a:>9.3f} {b:>9.3f} {b / a:>7.3f}"
                                 for name, a, b in split_rows)
                gemm_rows.append(f"{size_name + f'/E={e}':<10} {'all six':<17} {one:>9.3f} {many:>9.3f} {many / one:>7.3f}")
                (n_flat, ms_flat), (n_3d, ms_3d) = stacked_expert_cost(trainers["moe"])
                stack_rows.append(f"{size_name + f'/E={e}':<10} {n_flat:>8} {ms_flat:>8.2f} {n_3d:>8} {ms_3d:>8.2f} "
                                  f"{ms_3d / ms_flat:>8.3f}")
                if args.breakdown:
                    from moescope.moe.model import moe_layers

                    first = next(iter(moe_layers(trainers["moe"].raw_model).values()))
                    overhead_rows.append((f"{size_name}/E={e}", experts_overhead(first, rounds=2 * args.rounds)))
                    split = measure_parts(trainers, SIZES[size_name]["moe_layers"], args.rounds)
                    parts = measure_breakdown(trainers, args.rounds, args.steps_per_round)
                    for arm, p in split.items():
                        diff = {k: v - split["dense"][k] for k, v in p.items()}
                        # the x dense an arm reaches if routing and everything else were free: dense's step
                        # plus only its experts' extra GEMM time, optimizer and clip
                        bound = parts["dense"]["step"] / (parts["dense"]["step"] + diff["experts"]
                                                          + diff["optimizer"] + diff["clip"])
                        part_rows.append(f"{size_name + f'/E={e}':<10} {arm:<6} " + " ".join(
                            f"{p[k]:>9.2f} {diff[k]:>+8.2f}" for k in ("ffn", "experts", "optimizer", "clip"))
                            + f" {bound:>9.3f}")
                    dense = parts["dense"]
                    for arm, p in parts.items():
                        rest = p["step"] - p["fb"]
                        # the ratio this arm would reach if its forward+backward cost no more than dense's
                        cap = dense["step"] / (dense["fb"] + rest)
                        breakdowns.append(f"{size_name + f'/E={e}':<10} {arm:<6} {p['step']:>9.1f} {p['fb']:>15.1f} "
                                          f"{rest:>9.1f} {cap:>9.3f}")
    opt = trainers["dense"].optimizer
    opt = getattr(opt, "optimizer", opt)
    print(f"\noptimizer step ({type(opt).__name__}, fused={opt.defaults.get('fused')}, "
          f"CPU ms on one thread, fastest of 5; after the timed rounds)\n"
          f"{'size':<10} {'arm':<6} {'tensors':>8} {'params':>9} {'ms':>8}")
    print("\n".join(optimizer_rows))
    print(f"\nthe moe arm's parameters in one fused AdamW group, as trained vs each layer's experts stacked into "
          f"one 3-D tensor per weight kind (CPU ms on one thread, fastest of 5)\n"
          f"{'size':<10} {'tensors':>8} {'ms':>8} {'3-D':>8} {'ms':>8} {'3-D/as':>8}")
    print("\n".join(stack_rows))
    print(f"\nwhat separate expert weights cost the BLAS alone: one FFN's six forward/backward GEMMs as one GEMM over "
          f"2048 rows vs E GEMMs of 2048 / E rows (same FLOPs; CPU ms on one thread, fastest of 5)\n"
          f"{'size':<10} {'GEMM':<17} {'one':>9} {'E GEMMs':>9} {'ratio':>7}")
    print("\n".join(gemm_rows))
    if breakdowns:
        print(f"\nms per step (medians over rounds); cap = dense step / (dense forward+backward + this arm's rest):\n"
              f"the x dense this arm would reach if its forward+backward cost nothing over dense's\n"
              f"{'size':<10} {'arm':<6} {'step':>9} {'forward+backward':>15} {'rest':>9} {'cap':>9}")
        print("\n".join(breakdowns))
        print(f"\nwhere the arms differ, wall ms per step at {args.threads} thread(s) (medians over rounds; "
              f"each value, then its difference from dense):\n"
              f"ffn = forward+backward of the MoE blocks' FFNs on one step's tokens; experts = the moe arm's "
              f"experts alone on the same tokens split evenly (no routing; = ffn for the others);\n"
              f"optimizer = AdamW step; clip = gradient-norm clip; bound = dense step / (dense step + the "
              f"experts', optimizer's and clip's extra): the x dense with routing for free\n"
              f"{'size':<10} {'arm':<6} {'ffn':>9} {'vs dense':>8} {'experts':>9} {'vs dense':>8} "
              f"{'optimizer':>9} {'vs dense':>8} {'clip':>9} {'vs dense':>8} {'bound':>9}")
        print("\n".join(part_rows))
        print(f"\none MoE layer's FFN forward+backward four ways (wall ms, medians of interleaved rounds, tokens split "
              f"evenly): autograd wrapper = grouped - raw grouped (dense: dense FFN - raw dense)")
        print(f"{'size':<10} {'dense FFN':>10} {'grouped':>10} {'raw grouped':>12} {'raw dense':>10} "
              f"{'wrapper':>8} {'(dense)':>8}")
        for size, o in overhead_rows:
            print(f"{size:<10} {o['dense FFN']:>10.3f} {o['grouped experts']:>10.3f} {o['raw grouped kernel']:>12.3f} "
                  f"{o['raw dense GEMMs']:>10.3f} {o['grouped experts'] - o['raw grouped kernel']:>8.3f} "
                  f"{o['dense FFN'] - o['raw dense GEMMs']:>8.3f}")
    print("reference (GPT-2 MoE project's code, same kind of machine): 0.93-0.94 (demo), 0.95-0.97 (large); target (demo) >= 0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
