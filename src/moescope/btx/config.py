"""Settings of a branch / merge / ensemble study (`moescope btx`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig
from moescope.train.config import ModelConfig, OptimConfig, RunConfig, TrackingConfig, TrainConfig, validate_run


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
    base_steps: int = 300
    branch_steps: int = 100
    finetune_steps: int = 60
    # peak learning rate of the merged model's brief fine-tune; None = optim.learning_rate x
    # optim.min_learning_rate_ratio, where the branches' schedules ended. A full-size restart with a
    # fresh AdamW moves every weight by ~learning_rate per step: it shifts the MLP inputs enough that the fitted routers send whole partitions
    # to another expert within a few steps
    finetune_learning_rate: float | None = None
    n_partitions: int = 3
    strategies: list[str] = field(default_factory=lambda: ["clustered", "random"])
    overlap_ratio: float = 0.1
    partition_seed: int = 0
    # blocks whose MLPs become MoE layers in the merge; None = every block (as in BTX)
    moe_layers: list[int] | None = None
    top_k: int = 1
    load_balance_coef: float = 0.01
    # "fit": router rows fitted (bias-free logistic regression, block by block on the merged model's own
    # MLP inputs) to send each partition's tokens to its branch's expert; "means": rows from each
    # partition's mean hidden state (no bias term, so it can misroute whole partitions); "random":
    # install_moe's init
    router_init: Literal["fit", "means", "random"] = "fit"
    router_init_blocks: int = 64  # blocks per partition used to fit the router / measure the mean hidden state
    router_fit_l2: float = 1e-2  # "fit": L2 penalty on the (unit-scale) router weights
    # c-BTM: weights softmax(-d^2 / T) over partition centroids, optionally top-k experts only
    cbtm_temperature: float = 0.1
    cbtm_top_k: int | None = None
    # held-out scoring: tokens after the first eval_context_tokens of each eval block
    eval_context_tokens: int = 32
    eval_max_blocks_per_domain: int | None = 64
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(eval_every_steps=1000, checkpoint_every_steps=0))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(progress_bar=True))

    def __post_init__(self) -> None:
        if self.n_partitions < 2:
            raise MoescopeError(f"n_partitions must be >= 2, got {self.n_partitions}")
        bad = [s for s in self.strategies if s not in ("random", "clustered", "curriculum")]
        if bad:
            raise MoescopeError(f"strategies: unknown {bad} (random, clustered, curriculum)")
        for name in ("base_steps", "branch_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise MoescopeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cbtm_temperature <= 0:
            raise MoescopeError(f"cbtm_temperature must be > 0, got {self.cbtm_temperature}")
        if self.router_init not in ("fit", "means", "random"):
            raise MoescopeError(f"router_init must be fit, means or random, got {self.router_init!r}")
        if not 1 <= self.top_k <= self.n_partitions:
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
