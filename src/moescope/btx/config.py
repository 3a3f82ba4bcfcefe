"""Settings of a branch / merge / ensemble study (`moescope btx`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from moescope.errors import MoescopeError
from moescope.io.config import bounded, check_fields
from moescope.moe.config import MAX_EXPERTS, MoEConfig
from moescope.train.config import (
    MAX_SEED, MAX_STEPS, ModelConfig, OptimConfig, RunConfig, TrackingConfig, TrainConfig, validate_run,
)


@dataclass
class BTXConfig:
    """One shared dense base, N branches per partitioning, their merge (BTX) and ensemble (c-BTM).

    Compute is matched in training tokens: the dense baseline continues from the base for
    n_partitions x branch_steps + finetune_steps steps of the same batch, exactly what
    the branches plus the merged model's fine-tune cost (top-1 routing keeps a token's
    FLOPs those of one dense MLP).
    """

    data_dir: str = ""
    # the dense base every branch starts from: "scratch" = trained here for base_steps
    base_init: str = "scratch"
    base_steps: int = bounded(300, low=0, high=MAX_STEPS)
    branch_steps: int = bounded(100, low=1, high=MAX_STEPS)
    finetune_steps: int = bounded(60, low=0, high=MAX_STEPS)
    # peak learning rate of the merged model's brief fine-tune; None = optim.learning_rate x
    # optim.min_learning_rate_ratio, where the branches' schedules ended. A full-size restart with a
    # fresh AdamW moves every weight by ~learning_rate per step: it shifts the MLP inputs enough that the fitted routers send whole partitions
    # to another expert within a few steps
    finetune_learning_rate: float | None = bounded(None, low=0.0, low_open=True)
    n_partitions: int = bounded(3, low=2, high=MAX_EXPERTS)  # one expert each in the merge
    strategies: list[str] = field(default_factory=lambda: ["clustered", "random"])
    overlap_ratio: float = bounded(0.1, low=0.0, high=1.0)
    partition_seed: int = bounded(0, low=0, high=MAX_SEED)
    # blocks whose MLPs become MoE layers in the merge; None = every block (as in BTX)
    moe_layers: list[int] | None = bounded(None, low=0)
    top_k: int = bounded(1, low=1)
    load_balance_coef: float = bounded(0.01, low=0.0)
    # "fit": router rows fitted (bias-free logistic regression, block by block on the merged model's own
    # MLP inputs) to send each partition's tokens to its branch's expert; "means": rows from each
    # partition's mean hidden state (no bias term, so it can misroute whole partitions); "random":
    # install_moe's init
    router_init: Literal["fit", "means", "random"] = "fit"
    # blocks per partition used to fit the router / measure the mean hidden state
    router_init_blocks: int = bounded(64, low=1)
    router_fit_l2: float = bounded(1e-2, low=0.0)  # "fit": L2 penalty on the (unit-scale) router weights
    # c-BTM: weights softmax(-d^2 / T) over partition centroids, optionally top-k experts only
    cbtm_temperature: float = bounded(0.1, low=0.0, low_open=True)
    cbtm_top_k: int | None = bounded(None, low=1)
    # held-out scoring: tokens after the first eval_context_tokens of each eval block
    eval_context_tokens: int = bounded(32, low=0)
    eval_max_blocks_per_domain: int | None = bounded(64, low=1)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(eval_every_steps=1000, checkpoint_every_steps=0))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(progress_bar=True))

    def __post_init__(self) -> None:
        check_fields(self)  # each setting within its bounds; below, what they must be together
        bad = [s for s in self.strategies if s not in ("random", "clustered", "curriculum")]
        if bad:
            raise MoescopeError(f"strategies: unknown {bad} (random, clustered, curriculum)")
        if self.router_init not in ("fit", "means", "random"):
            raise MoescopeError(f"router_init must be fit, means or random, got {self.router_init!r}")
        if not self.top_k <= self.n_partitions:
            raise MoescopeError(f"top_k must be in 1..n_partitions={self.n_partitions}, got {self.top_k}")

    def stage_run(
        self, *, data_dir: str, arch: str, steps: int, moe: MoEConfig | None = None, lr: float | None = None
    ) -> RunConfig:
        """The RunConfig of one training stage: shared shape, optimizer and batch; its own data and steps."""
        run = RunConfig(
            data_dir=data_dir,
            arch=arch,  # type: ignore[arg-type]
            model=self.model,
            moe=moe or MoEConfig(),
            optim=self.optim if lr is None else dataclasses.replace(self.optim, learning_rate=lr),
            train=dataclasses.replace(self.train, steps=steps),
            tracking=self.tracking,
        )
        run.loss = dataclasses.replace(run.loss, load_balance_coef=self.load_balance_coef)
        validate_run(run, where=f"btx stage ({arch}, {steps} steps)")
        return run

    def resolved_finetune_learning_rate(self) -> float:
        if self.finetune_learning_rate is not None:
            return self.finetune_learning_rate
        return self.optim.learning_rate * self.optim.min_learning_rate_ratio

    def total_dense_steps(self) -> int:
        return self.n_partitions * self.branch_steps + self.finetune_steps
