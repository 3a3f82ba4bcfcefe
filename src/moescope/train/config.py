"""Typed configs of a training run and of an experiment of several arms.

An experiment is ONE shared run config plus, per arm, a small diff. The diff may
only touch the parts that define the arm (architecture, MoE settings, aux losses,
router learning-rate multiplier, collapse detection); data, steps, batch, seed,
schedule and evaluation are shared by construction, and `resolve_arms` asserts it.
That makes the reference's unfair comparisons (different step counts or schedules
per arm, an ablation that changes two things) impossible to configure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moescope.errors import MoescopeError
from moescope.io.config import (
    bounded, check_fields, deep_merge, from_dict, load_config_file, parse_overrides, to_dict, upgrade_keys,
)
from moescope.io.names import check_path_name
from moescope.moe.config import MoEConfig

# Bounds of the settings that count steps and sequences: beyond them a run could never finish or a
# batch never fit, so such a value is a typo (1e20 for 1e2) refused before anything is written.
# 10**8 optimizer steps are weeks even at 100 steps/s (GPT-3 took ~10**5 steps).
MAX_STEPS = 10**8
# 2**20 sequences in one optimizer step (or one eval forward) are ~10**9 tokens at context 1024: more
# than any machine holds in one step (a batch is materialized as one index array).
MAX_BATCH_SEQUENCES = 2**20
MAX_SEED = 2**32 - 1  # numpy's seed range
# Model shape: 1024 blocks of width 2**16 are ~10**14 parameters, far past any one machine; larger
# values are typos that would otherwise hang in the model's constructor or end in an allocation failure.
MAX_LAYERS = 1024
MAX_WIDTH = 2**16
MAX_CONTEXT_TOKENS = 2**20


@dataclass
class ModelConfig:
    """Shape of a GPT-2 trained from scratch (ignored when starting from pretrained weights)."""

    n_layers: int = bounded(4, low=1, high=MAX_LAYERS)
    d_model: int = bounded(128, low=1, high=MAX_WIDTH)
    n_heads: int = bounded(4, low=1, high=MAX_WIDTH)
    context_tokens: int = bounded(128, low=1, high=MAX_CONTEXT_TOKENS)
    d_ff: int | None = bounded(None, low=1, high=4 * MAX_WIDTH)  # None = 4 * d_model (GPT-2's choice)
    dropout: float = bounded(0.0, low=0.0, high=1.0, high_open=True)
    activation: str = "gelu_pytorch_tanh"  # torch's fused GELU; "gelu_new" (same function) is mapped to it


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_learning_rate_ratio * learning_rate."""

    learning_rate: float = bounded(2e-3, low=0.0, low_open=True)
    router_learning_rate_mult: float = bounded(1.0, low=0.0)  # 0 = routers frozen
    weight_decay: float = bounded(0.1, low=0.0)  # not applied to norms, biases (any parameter with < 2 dims)
    beta1: float = bounded(0.9, low=0.0, high=1.0, high_open=True)  # AdamW's own limits
    beta2: float = bounded(0.95, low=0.0, high=1.0, high_open=True)
    eps: float = bounded(1e-8, low=0.0, low_open=True)
    grad_clip_norm: float | None = bounded(1.0, low=0.0, low_open=True)  # None = no clipping
    warmup_fraction: float = bounded(0.05, low=0.0, high=1.0, high_open=True)
    min_learning_rate_ratio: float = bounded(0.1, low=0.0, high=1.0)


@dataclass
class LossConfig:
    """Auxiliary router losses. Coefficients apply to EACH MoE layer's loss; layer losses are summed.

    load_balance_scope: which tokens the load-balancing statistics f_i and P_i are taken over:
      "step"       all tokens of the optimizer step (all micro-batches, all processes); default
      "microbatch" each micro-batch separately, then averaged (the reference's behaviour)
      "sequence"   each sequence separately, then averaged (pushes every sequence to balance)
    load_balance_accumulation: how the "step" scope is made exact when grad_accum_steps > 1:
      "prepass"     a no-grad routing forward over all micro-batches first (RNG replayed so
                    routing is identical): +1 forward per step, memory of one micro-batch
      "keep_graphs" keep every micro-batch graph and do one backward: no extra compute,
                    activation memory x grad_accum_steps
    """

    load_balance_coef: float = bounded(0.01, low=0.0)
    z_loss_coef: float = bounded(1e-3, low=0.0)
    # block index -> coef override
    load_balance_coef_by_layer: dict[str, float] = bounded(default_factory=dict, low=0.0)
    load_balance_scope: Literal["step", "microbatch", "sequence"] = "step"
    load_balance_accumulation: Literal["prepass", "keep_graphs"] = "prepass"
    # Auxiliary-loss-free balancing: after every optimizer step each MoE layer's selection
    # bias (moe.balance_bias) moves by this much toward balance, from the step's counts
    # (DeepSeek-V3's bias update speed). 0 = the bias stays where it is.
    bias_update_rate: float = bounded(0.0, low=0.0)


@dataclass
class TrainConfig:
    steps: int = bounded(600, low=1, high=MAX_STEPS)
    # sequences per optimizer step, over all micro-batches and processes
    batch_sequences: int = bounded(16, low=1, high=MAX_BATCH_SEQUENCES)
    grad_accum_steps: int = bounded(1, low=1, high=MAX_BATCH_SEQUENCES)
    seed: int = bounded(0, low=0, high=MAX_SEED)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    log_every_steps: int = bounded(10, low=1)
    eval_every_steps: int = bounded(100, low=1)
    eval_max_blocks_per_domain: int | None = bounded(64, low=1)  # None = the whole eval split
    eval_batch_sequences: int = bounded(32, low=1, high=MAX_BATCH_SEQUENCES)
    # which eval blocks share a forward pass (data/batch_order.py): "by_domain", "mixed" (domains interleaved
    # evenly), "auto" = "mixed" for expert-choice models, whose routing depends on the batch
    eval_batch_order: Literal["auto", "by_domain", "mixed"] = "auto"
    checkpoint_every_steps: int = bounded(100, low=0)  # 0 = only at the end and on SIGINT/SIGTERM
    keep_checkpoints: int = bounded(2, low=0)  # 0 keeps one, the newest (runs written with 0 stay resumable)
    snapshot_at_eval: bool = True  # model-only snapshot at every eval (router saturation analysis)
    cpu_threads: int | None = bounded(None, low=1)  # torch intra-op threads on CPU; None = torch's default
    # A step whose loss or gradient norm is NaN/inf is never applied. "stop": training stops at once
    # (the last checkpoint, verified and finite, is named); "skip": that update is dropped, counted,
    # and training goes on, stopping only at max_nonfinite_skips_in_a_row dropped updates in a row.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips_in_a_row: int = bounded(5, low=1)


@dataclass
class CollapseConfig:
    """An expert holding more than threshold_share of a layer's tokens in window_evals evals in a row
    (evaluations after step 0; the untrained router's step-0 evaluation does not count)."""

    threshold_share: float = bounded(0.6, low=0.0, high=1.0, low_open=True)
    window_evals: int = bounded(2, low=1)
    early_stop: bool = False


@dataclass
class TrackingConfig:
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False  # offline mode, only if wandb is installed


@dataclass
class RunConfig:
    """Everything one training run (the base stage or one arm) needs."""

    data_dir: str = ""
    arch: Literal["dense", "moe"] = "moe"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class BaseConfig:
    """Where the arms start. "scratch": a dense base stage trained here first (the offline
    stand-in for pretrained GPT-2); "gpt2" or a directory: pretrained weights."""

    init: str = "scratch"
    steps: int = bounded(600, low=0, high=MAX_STEPS)  # only a scratch base trains (at least 1 step, validate_run)
    learning_rate: float | None = bounded(None, low=0.0, low_open=True)  # None = optim.learning_rate


@dataclass
class ExperimentConfig(RunConfig):
    """The shared run config (every RunConfig section) plus the arms and the base stage."""

    arms: list[str] = field(default_factory=lambda: ["dense", "moe", "moe-nolb"])
    arm: dict[str, dict] = field(default_factory=dict)  # user-defined arms: name -> diff table
    base: BaseConfig = field(default_factory=BaseConfig)


# The built-in arms. "moe-nolb" differs from "moe" ONLY in load balancing: the balancing
# loss coefficient and the selection-bias update rate are 0 (a balance bias, if the model
# has one, stays at 0); router noise, z-loss and everything else stay as in "moe".
BUILTIN_ARMS: dict[str, dict[str, Any]] = {
    "dense": {"arch": "dense"},
    "moe": {"arch": "moe", "moe": {"top_k": 1}},
    "moe-top2": {"arch": "moe", "moe": {"top_k": 2}},
    "moe-nolb": {"arch": "moe", "moe": {"top_k": 1},
                 "loss": {"load_balance_coef": 0.0, "load_balance_coef_by_layer": {}, "bias_update_rate": 0.0}},
    # Designs of today at the active compute of "moe" (see MoEConfig): each expert split in
    # four and top-4 of them (DeepSeekMoE's fine-grained experts); the same with one of the
    # four active slices always on (a shared expert; 63 routed, top-3); expert-choice routing
    # at capacity factor 1 (balanced by construction: no balance bias, no balancing loss).
    "moe-fine": {"arch": "moe", "moe": {"top_k": 1, "expert_granularity": 4}},
    "moe-shared": {"arch": "moe", "moe": {"top_k": 1, "expert_granularity": 4, "n_shared_experts": 1}},
    "moe-ec": {"arch": "moe", "moe": {"top_k": 1, "routing": "expert_choice", "capacity_factor": 1.0,
                                      "balance_bias": False},
               "loss": {"load_balance_coef": 0.0, "load_balance_coef_by_layer": {}, "bias_update_rate": 0.0}},
}

# The only config paths an arm diff may change. Anything else (data, steps, batch, seed,
# schedule, evaluation, model shape) is shared by every arm of an experiment.
ARM_MUTABLE_PATHS: tuple[str, ...] = ("arch", "moe", "loss", "optim.router_learning_rate_mult", "collapse", "tracking")


def load_experiment_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML/YAML/JSON experiment config and apply `key.sub=value` overrides."""
    data = load_config_file(path) if path is not None else {}
    return experiment_config_from_dict(deep_merge(data, parse_overrides(overrides)))


def experiment_config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, data)
    validate_experiment(cfg)
    return cfg


def shared_run_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The RunConfig part of an experiment config, as a plain dict."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in to_dict(cfg).items() if k in names}


def arm_diff(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """The diff that defines arm `name`: a built-in one, or `[arm.NAME]` (optionally `extends = "moe"`)."""
    if name in cfg.arm:
        user = dict(cfg.arm[name])
        parent = user.pop("extends", None)
        if parent is not None and parent not in BUILTIN_ARMS:
            raise MoescopeError(f"arm {name!r}: extends {parent!r}, which is not one of {sorted(BUILTIN_ARMS)}")
        return deep_merge(BUILTIN_ARMS.get(parent, {}) if parent else {}, user)
    if name in BUILTIN_ARMS:
        return BUILTIN_ARMS[name]
    import difflib

    known = sorted(set(BUILTIN_ARMS) | set(cfg.arm))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known arms: {', '.join(known)}"
    raise MoescopeError(f"unknown arm {name!r}{hint} (define it in an [arm.{name}] table)")


def resolve_arms(cfg: ExperimentConfig, names: list[str] | None = None) -> dict[str, RunConfig]:
    """One RunConfig per arm: the shared config plus the arm's diff, with the shared part asserted equal."""
    shared = shared_run_dict(cfg)
    out: dict[str, RunConfig] = {}
    for name in names if names is not None else cfg.arms:
        check_path_name(name, "arm")  # it names the stage's directory, RUN/arms/NAME
        diff = arm_diff(cfg, name)
        for path in _leaf_paths(diff):
            if not any(path == p or path.startswith(p + ".") for p in ARM_MUTABLE_PATHS):
                raise MoescopeError(
                    f"arm {name!r} changes {path!r}, which every arm must share (data, steps, batch, seed, "
                    f"schedule, evaluation, model shape); an arm may only change {', '.join(ARM_MUTABLE_PATHS)}"
                )
        merged = deep_merge(shared, diff)
        run = from_dict(RunConfig, merged, where=f"arm.{name}")
        assert _strip(to_dict(run)) == _strip(shared), f"arm {name}: shared part differs"  # by construction
        validate_run(run, where=f"arm {name!r}")
        out[name] = run
    return out


def base_run_config(cfg: ExperimentConfig) -> RunConfig:
    """The dense base stage: the shared config with arch dense, base.steps and base.learning_rate."""
    run = from_dict(RunConfig, shared_run_dict(cfg))
    run.arch = "dense"
    run.train = dataclasses.replace(run.train, steps=cfg.base.steps)
    if cfg.base.learning_rate is not None:
        run.optim = dataclasses.replace(run.optim, learning_rate=cfg.base.learning_rate)
    validate_run(run, where="base stage")
    return run


def comparable_config(run: RunConfig | dict) -> dict[str, Any]:
    """The part of a run config a checkpoint must match to be resumed (not tracking/logging)."""
    if isinstance(run, dict):
        # A run saved by an earlier moescope: keys renamed since are upgraded, and settings added
        # since are filled with their defaults (a new setting's default is the old behaviour), so
        # adding an option never makes an existing run unresumable.
        run = from_dict(RunConfig, upgrade_keys(dict(run)), where="stored run config")
    d = to_dict(run)
    # the data is matched by its manifest's sha256 (checkpoints, experiment.json), not by how its
    # path was spelled: a run resumed with an absolute --out, or moved with its data, is the same run
    d = {k: v for k, v in d.items() if k not in ("tracking", "data_dir")}
    # how to react to a NaN is policy, not trajectory: a stopped run may be resumed with "skip"
    d["train"] = {k: v for k, v in d["train"].items()
                  if k not in ("log_every_steps", "keep_checkpoints", "on_nonfinite", "max_nonfinite_skips_in_a_row")}
    return d


def validate_run(run: RunConfig, where: str = "run") -> None:
    """Each setting within its declared bounds (check_fields), then what relates settings to each other."""
    try:
        check_fields(run)
    except MoescopeError as exc:
        raise MoescopeError(f"{where}: {exc}") from None
    t = run.train
    if t.batch_sequences % t.grad_accum_steps:
        raise MoescopeError(
            f"{where}: train.batch_sequences={t.batch_sequences} is not divisible by "
            f"train.grad_accum_steps={t.grad_accum_steps}"
        )
    if run.loss.bias_update_rate > 0 and run.arch == "moe" and not run.moe.balance_bias:
        raise MoescopeError(
            f"{where}: loss.bias_update_rate={run.loss.bias_update_rate} needs moe.balance_bias = true "
            "(the selection bias it updates)"
        )
    for key in run.loss.load_balance_coef_by_layer:
        if not str(key).isdigit():
            raise MoescopeError(f"{where}: loss.load_balance_coef_by_layer key {key!r} must be a block index")
    _check_activation(run.model.activation, where)
    if run.model.d_model % run.model.n_heads:
        raise MoescopeError(f"{where}: model.d_model={run.model.d_model} not divisible by n_heads={run.model.n_heads}")


def _check_activation(name: str, where: str) -> None:
    """The activation must be one transformers' ACT2FN builds (gelu_new is mapped to the fused GELU)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise MoescopeError(f"{where}: model.activation {name!r} is not one transformers knows "
                            f"(e.g. {', '.join(sorted(ACT2FN)[:6])}, ...)")


def validate_experiment(cfg: ExperimentConfig) -> None:
    if not cfg.arms:
        raise MoescopeError("config: arms is empty")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise MoescopeError(f"config: arms lists a name twice: {cfg.arms}")
    runs = resolve_arms(cfg)  # raises on unknown arms, forbidden diffs, bad values
    if cfg.base.init == "scratch":
        base_run_config(cfg)
        # the scratch base has model.n_layers blocks: a block index beyond them is known before any training
        for name, run in runs.items():
            outside = [i for i in (run.moe.layers or []) if i >= run.model.n_layers] if run.arch == "moe" else []
            if outside:
                raise MoescopeError(f"arm {name!r}: moe.layers {outside} are not blocks of a model with "
                                    f"model.n_layers = {run.model.n_layers} (blocks 0..{run.model.n_layers - 1})")


def _leaf_paths(d: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in d.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and key != "load_balance_coef_by_layer":
            out.extend(_leaf_paths(value, path))
        else:
            out.append(path)
    return out


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    """Drop the arm-mutable paths from a run dict (what remains must be identical across arms)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for path in ARM_MUTABLE_PATHS:
        node = out
        *parents, last = path.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return out
