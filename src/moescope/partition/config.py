"""Settings of one partitioning run (`moescope partition`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STRATEGIES = ("random", "clustered", "curriculum")


@dataclass
class PartitionConfig:
    """How a corpus is split into N partitions, one per expert or branch.

    Sizes are counted in texts; lengths in characters.
    """

    n_partitions: int = 3
    # random: seeded shuffle and deal; clustered: KMeans on sentence embeddings;
    # curriculum: sorted by a complexity score and dealt from easy to hard.
    strategy: Literal["random", "clustered", "curriculum"] = "clustered"
    # each partition receives overlap_ratio x its own size extra texts from the others
    overlap_ratio: float = 0.1
    seed: int = 0
    # texts shorter than this are dropped before partitioning
    min_article_length_chars: int = 0
    # after overlap every partition ends within +-balance_tolerance of the mean size
    balance_tolerance: float = 0.2
    # what "size" counts: characters (~ training tokens, so branches cost alike) or texts
    balance_unit: Literal["chars", "texts"] = "chars"
    # curriculum score: mean word length (the seed's proxy) or a trained model's perplexity
    curriculum_score: Literal["word_length", "perplexity"] = "word_length"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.n_partitions < 1:
            raise ValueError(f"n_partitions must be >= 1, got {self.n_partitions}")
        if not 0.0 <= self.overlap_ratio <= 1.0:
            raise ValueError(f"overlap_ratio must be in [0, 1], got {self.overlap_ratio}")
        if not 0.0 <= self.balance_tolerance < 1.0:
            raise ValueError(f"balance_tolerance must be in [0, 1), got {self.balance_tolerance}")
        if self.balance_unit not in ("chars", "texts"):
            raise ValueError(f"balance_unit must be 'chars' or 'texts', got {self.balance_unit!r}")
        if self.min_article_length_chars < 0:
            raise ValueError(f"min_article_length_chars must be >= 0, got {self.min_article_length_chars}")
