"""Experiment configs, arms, data order, optimizer groups, schedule, routing summaries (no training)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.errors import MoescopeError
from moescope.io.config import to_dict
from moescope.train.config import (
    ARM_MUTABLE_PATHS, load_experiment_config, resolve_arms,
)
from moescope.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from moescope.train.order import TrainOrder
from moescope.moe.routing_sums import RoutingSums
from train_fixtures import tiny_experiment

REPO = Path(__file__).resolve().parents[1]


def _leaves(d, prefix=""):
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            yield from _leaves(v, p)
        else:
            yield p, v


def _diff_paths(a, b):
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    return sorted(k for k in set(la) | set(lb) if la.get(k, object()) != lb.get(k, object()))


def test_builtin_arms_share_everything_but_their_own_difference(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, arms=["dense", "moe", "moe-top2", "moe-nolb"])
    runs = {k: to_dict(v) for k, v in resolve_arms(cfg).items()}
    # moe-nolb differs from moe ONLY in the load-balancing coefficient: noise and z-loss unchanged
    assert _diff_paths(runs["moe"], runs["moe-nolb"]) == ["loss.load_balance_coef"]
    assert runs["moe-nolb"]["moe"]["router_noise_std"] == 0.1
    assert runs["moe-nolb"]["loss"]["z_loss_coef"] == runs["moe"]["loss"]["z_loss_coef"] > 0
    assert _diff_paths(runs["moe"], runs["moe-top2"]) == ["moe.top_k"]
    assert _diff_paths(runs["moe"], runs["dense"]) == ["arch"]
    # data, steps, batch, seed, schedule and eval are identical in every arm
    for run in runs.values():
        assert run["train"] == runs["moe"]["train"]
        assert run["data_dir"] == runs["moe"]["data_dir"]
        assert run["model"] == runs["moe"]["model"]
        assert {k: v for k, v in run["optim"].items() if k != "router_learning_rate_mult"} == \
            {k: v for k, v in runs["moe"]["optim"].items() if k != "router_learning_rate_mult"}


def test_user_arm_is_a_config_diff_and_cannot_touch_shared_keys(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, arms=["moe", "moe-e8"], arm={"moe-e8": {"extends": "moe", "moe": {"n_experts": 8}}})
    runs = {k: to_dict(v) for k, v in resolve_arms(cfg).items()}
    assert _diff_paths(runs["moe"], runs["moe-e8"]) == ["moe.n_experts"]
    with pytest.raises(MoescopeError, match=r"arm 'longer' changes 'train.steps'.*must share"):
        tiny_experiment(tmp_path, arms=["moe", "longer"], arm={"longer": {"train": {"steps": 99}}})
    with pytest.raises(MoescopeError, match=r"changes 'optim.learning_rate'"):
        tiny_experiment(tmp_path, arms=["hot"], arm={"hot": {"optim": {"learning_rate": 1.0}}})
    with pytest.raises(MoescopeError, match=r"unknown config key 'arm.typo.moe.n_expert'.*'n_experts'"):
        tiny_experiment(tmp_path, arms=["typo"], arm={"typo": {"moe": {"n_expert": 8}}})
    with pytest.raises(MoescopeError, match=r"unknown arm 'moe-nlb'.*'moe-nolb'"):
        tiny_experiment(tmp_path, arms=["moe-nlb"])
    # an arm's name is its stage directory, RUN/arms/NAME: nothing may lead outside RUN
    for name in ("../../escaped", "/tmp/abs", "a/b", "..", ".hidden", "a\\b", "", "x" * 65):
        with pytest.raises(MoescopeError, match=r"arm .* cannot name a directory"):
            tiny_experiment(tmp_path, arms=[name], arm={name: {"extends": "moe"}})
    assert tiny_experiment(tmp_path, arms=["moe_2.b-x"], arm={"moe_2.b-x": {"extends": "moe"}})
    assert "train" not in ARM_MUTABLE_PATHS and "data_dir" not in ARM_MUTABLE_PATHS


def test_unknown_config_key_in_a_file_names_the_closest(tmp_path: Path) -> None:
    p = tmp_path / "exp.toml"
    p.write_text('data_dir = "x"\n[train]\nstep = 10\n')
    with pytest.raises(MoescopeError, match=r"unknown config key 'train.step'; did you mean 'steps'"):
        load_experiment_config(p)
    p.write_text('data_dir = "x"\n[optim]\nlearning_rate = 0.1\n')
    with pytest.raises(MoescopeError, match=r"'optim.learning_rat'.*did you mean 'learning_rate'"):
        load_experiment_config(p, ["optim.learning_rat=0.2"])
    with pytest.raises(MoescopeError, match="not divisible"):
        load_experiment_config(p, ["train.batch_sequences=6", "train.grad_accum_steps=4"])


def test_demo_config_has_the_demo_scale_settings() -> None:
    cfg = load_experiment_config(REPO / "configs" / "demo.toml")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.context_tokens) == (4, 128, 4, 128)
    assert cfg.moe.layers == [2, 3] and cfg.moe.n_experts == 8 and cfg.moe.top_k == 1 and cfg.moe.gating == "ste"
    assert cfg.loss.load_balance_scope == "step" and cfg.loss.z_loss_coef == 1e-3
    assert cfg.train.batch_sequences * cfg.model.context_tokens == 2048 and cfg.train.steps == 600
    assert set(cfg.arms) >= {"dense", "moe", "moe-nolb"}
    resolve_arms(cfg)


def test_train_order_is_shared_by_any_split_into_micro_batches_and_processes() -> None:
    index = np.stack([np.repeat([0, 1, 2], 10), np.tile(np.arange(10), 3)], axis=1)
    order = TrainOrder(index, seed=7, batch_sequences=8)
    whole = [order.rows(s) for s in range(8)]
    for n_micro, n_proc in ((2, 1), (2, 2), (4, 2), (1, 4)):
        other = TrainOrder(index, seed=7, batch_sequences=8)
        for s in range(8):
            parts = [other.rows(s, m, n_micro, p, n_proc) for m in range(n_micro) for p in range(n_proc)]
            np.testing.assert_array_equal(np.concatenate(parts), whole[s])
    # each epoch visits every block exactly once; different seeds give different orders
    first_epoch = np.concatenate([order.rows(s) for s in range(0, 30 // 8)] + [order.rows(3)[:6]])
    assert len({tuple(r) for r in first_epoch}) == 30
    assert not np.array_equal(TrainOrder(index, 8, 8).rows(0), whole[0])
    assert order.sequences_consumed(5) == 40


def test_optimizer_groups_and_warmup_cosine_schedule() -> None:
    from moescope.moe.config import MoEConfig
    from moescope.moe.install import install_moe
    from moescope.moe.model import router_parameters
    from moescope.train.config import OptimConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    install_moe(model, MoEConfig(n_experts=4, layers=[1]))
    cfg = OptimConfig(learning_rate=1e-2, router_learning_rate_mult=0.5, weight_decay=0.1, warmup_fraction=0.1, min_learning_rate_ratio=0.1)
    opt = build_optimizer(model, cfg, router_parameters(model))
    groups = {g["name"]: g for g in opt.param_groups}
    assert all(p.ndim < 2 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.1
    assert len(groups["router"]["params"]) == 1 and groups["router"]["lr"] == pytest.approx(5e-3)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len({id(p) for p in model.parameters()})  # every parameter once (tied wte/lm_head)
    sched = build_scheduler(opt, cfg, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[5][0] == pytest.approx(1e-2 * 5 / 10)  # linear warmup over 10 steps
    assert lrs[10][0] == pytest.approx(1e-2)
    assert lrs[55][0] == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[99][2] / lrs[99][0] == pytest.approx(0.5)  # router multiplier kept through the schedule


@pytest.mark.parametrize("max_norm", [0.5, 20.0, 1e9])
def test_clip_equals_torchs_bit_for_bit_and_skips_only_the_unit_rescale(max_norm: float, monkeypatch) -> None:
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = [torch.randn(s) for s in shapes]
    for p, q, g in zip(ours, ref, grads):
        p.grad, q.grad = g.clone(), g.clone()
    unused = torch.nn.Parameter(torch.ones(2))  # no grad: ignored by both
    rescales = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: rescales.append(1) or real(*a, **k))
    norm = clip_grad_norm([*ours, unused], max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_([*ref, unused], max_norm)
    assert torch.equal(norm, ref_norm)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref))
    assert unused.grad is None
    assert len(rescales) == (1 if float(ref_norm) > max_norm else 0)
    assert (max_norm == 0.5) == (len(rescales) == 1)  # the three cases: clipped, not clipped, not clipped


def test_clip_takes_a_single_tensor_like_torch() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 10.0)
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = p.grad.clone()
    assert torch.equal(clip_grad_norm(p, 1.0), torch.nn.utils.clip_grad_norm_(q, 1.0))
    assert torch.equal(p.grad, q.grad) and float(p.grad.norm()) == pytest.approx(1.0, abs=1e-5)


def test_clip_applies_a_non_finite_norm_like_torch() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = p.grad.clone()
    assert torch.isnan(clip_grad_norm([p], 1.0))
    torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert torch.isnan(p.grad).all() and torch.isnan(q.grad).all()


def test_routing_summary_known_values() -> None:
    class Rec:
        def __init__(self, counts, probs):
            self.tokens_per_expert = torch.tensor(counts)
            self.prob_sum = torch.tensor(probs).sum(0)
            self.n_tokens = len(probs)
            self.dropped = torch.tensor(1)
            self.entropy_mean = torch.tensor(0.5)
            self.z_loss = torch.tensor(2.0)

    t = RoutingSums(n_experts=2, top_k=1, dtype=torch.float64, detail=True)
    t.add(Rec([3, 1], [[0.9, 0.1]] * 4))
    t.add(Rec([0, 4], [[0.5, 0.5]] * 4))
    s = t.summary()
    assert s["token_fraction"] == [0.375, 0.625] and s["max_fraction"] == 0.625 and s["argmax_expert"] == 1
    assert s["load_cv"] == pytest.approx(1 / 4)  # counts 3, 5: std 1, mean 4
    assert s["dropped_fraction"] == pytest.approx(2 / 8)
    mean_p = np.array([0.7, 0.3])
    assert s["router_entropy_of_mean"] == pytest.approx(float(-(mean_p * np.log(mean_p)).sum()))
    assert s["router_entropy_token"] == pytest.approx(0.5) and s["z_loss"] == pytest.approx(2.0)
    assert s["load_balance_loss"] == pytest.approx(2 * (0.375 * 0.7 + 0.625 * 0.3))


def test_nolb_also_switches_off_bias_balancing_and_the_bias_needs_a_layer_to_act_on(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, arms=["moe", "moe-nolb"], moe__balance_bias=True, loss__bias_update_rate=0.01)
    runs = {k: to_dict(v) for k, v in resolve_arms(cfg).items()}
    assert _diff_paths(runs["moe"], runs["moe-nolb"]) == ["loss.bias_update_rate", "loss.load_balance_coef"]
    assert runs["moe-nolb"]["moe"]["balance_bias"] is True  # same model; its bias just stays at 0
    with pytest.raises(MoescopeError, match="needs moe.balance_bias"):
        resolve_arms(tiny_experiment(tmp_path, arms=["moe"], loss__bias_update_rate=0.01))


@pytest.mark.parametrize("override, text", [
    ({"optim__learning_rate": -1.0}, "optim.learning_rate must be > 0"),
    ({"optim__weight_decay": -0.1}, "optim.weight_decay must be >= 0"),
    ({"train__seed": -1}, "train.seed must be in [0, 4294967295], got -1"),
    ({"train__seed": 2**32}, "train.seed must be in [0, 4294967295], got 4294967296"),
    ({"model__activation": "bogus"}, "model.activation 'bogus' is not one transformers knows"),
    ({"loss__load_balance_coef": -1.0}, "loss.load_balance_coef must be >= 0, got -1.0"),
    ({"loss__load_balance_coef_by_layer": {"1": -0.5}}, "loss.load_balance_coef_by_layer must be >= 0, got -0.5"),
    ({"train__log_every_steps": -1}, "train.log_every_steps must be >= 1, got -1"),
    ({"collapse__window_evals": 0}, "collapse.window_evals must be >= 1, got 0"),
    ({"model__d_model": -4}, "model.d_model must be in [1, 65536], got -4"),
    ({"model__dropout": 1.5}, "model.dropout must be in [0, 1)"),
    # what torch refuses only once the optimizer or the thread pool is built, after the run directory exists
    ({"optim__beta1": 2.0}, "optim.beta1 must be in [0, 1), got 2.0"),
    ({"optim__eps": -1.0}, "optim.eps must be > 0, got -1.0"),
    ({"train__cpu_threads": 0}, "train.cpu_threads must be >= 1, got 0"),
    ({"train__eval_batch_sequences": 0}, "train.eval_batch_sequences must be in [1, 1048576], got 0"),
    # what would run silently wrong or never finish
    ({"optim__grad_clip_norm": -1.0}, "optim.grad_clip_norm must be > 0, got -1.0"),
    ({"optim__min_learning_rate_ratio": 5.0}, "optim.min_learning_rate_ratio must be in [0, 1], got 5.0"),
    ({"train__steps": 10**10}, "train.steps must be in [1, 100000000], got 10000000000"),
    ({"train__steps": 10**20}, "config train.steps: 100000000000000000000 does not fit a 64-bit integer"),
    ({"base__steps": 10**9}, "base.steps must be in [0, 100000000], got 1000000000"),
    ({"train__batch_sequences": 10**12}, "train.batch_sequences must be in [1, 1048576]"),
    ({"model__n_layers": 100_000}, "model.n_layers must be in [1, 1024], got 100000"),
])
def test_values_torch_would_reject_mid_run_are_refused_before_anything_is_written(tmp_path: Path, override,
                                                                                  text: str) -> None:
    from moescope.train.config import resolve_arms

    with pytest.raises(MoescopeError, match=re.escape(text)):
        resolve_arms(tiny_experiment(tmp_path, **override))


@pytest.mark.parametrize("layers, text", [([], "moe.layers is empty"), ([1, 7], "moe.layers [7] are not blocks")])
def test_moe_layers_a_scratch_base_cannot_have_are_refused_before_the_base_trains(tmp_path: Path, layers,
                                                                                   text: str) -> None:
    from moescope.train.config import experiment_config_from_dict

    cfg = to_dict(tiny_experiment(tmp_path))
    cfg["moe"]["layers"] = layers
    with pytest.raises(MoescopeError, match=re.escape(text)):
        experiment_config_from_dict(cfg)


@pytest.mark.parametrize("name, text", [("deep.toml", "a = " + "[" * 5000 + "]" * 5000),
                                        ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000),
                                        ("digits.toml", "a = " + "9" * 5000)])
def test_a_config_file_too_deep_or_too_long_is_one_error(tmp_path: Path, name: str, text: str) -> None:
    from moescope.io.config import load_config_file, parse_scalar

    (tmp_path / name).write_text(text)
    with pytest.raises(MoescopeError, match=re.escape(str(tmp_path / name))):
        load_config_file(tmp_path / name)
    with pytest.raises(MoescopeError, match="cannot be read"):
        parse_scalar("9" * 5000)


def test_a_sweep_too_large_or_with_seeds_numpy_refuses_is_refused_before_any_cell() -> None:
    from moescope.sweep.grid import expand_cells

    with pytest.raises(ValueError, match="27,000,000 cells"):
        expand_cells({f"k{i}": list(range(300)) for i in range(3)}, [0])
    with pytest.raises(ValueError, match=re.escape("seeds must be in 0..2**32 - 1")):
        expand_cells({}, [2**32])
    from moescope.sweep.grid import parse_grid_item

    with pytest.raises(ValueError, match="a value cannot be read"):
        parse_grid_item("experiment.train.steps=" + "9" * 5000)


@pytest.mark.parametrize("error", [
    MemoryError("Unable to allocate 47.7 GiB for an array"),
    # what torch's CPU allocator raises for a model too large for the machine (a plain RuntimeError)
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 384000000000 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_running_out_of_memory_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path: Path, error) -> None:
    """A setting too large for the machine (a batch of 10^8 sequences) ends in one line, not a traceback."""
    import moescope.commands.data as data_command
    from moescope.cli import main

    def too_big(args):
        raise error

    monkeypatch.setattr(data_command, "run_inspect", too_big)
    assert main(["data", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moescope: error: out of memory (") and str(error)[:20] in err
