"""Settings of one partitioning run (`moescope partition`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moescope.errors import MoescopeError

STRATEGIES = ("random", "clustered", "curriculum")
EMBEDDING_BACKENDS = ("minilm", "tfidf")
BALANCE_UNITS = ("auto", "chars", "texts")


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
    # what partition "size" counts, for overlap, rebalancing and KMeans' point weights:
    # characters (~ training tokens, so branches cost alike) or texts. "auto" (clustered):
    # cluster both ways and keep the clustering whose partitions are better separated
    # (higher cosine silhouette), because each unit undoes the clustering when the natural
    # groups differ in it: the built-in corpus is balanced in characters, a per-domain
    # subsample in texts (tests/test_partition_config.py measures both). Other
    # strategies take "auto" as characters.
    balance_unit: Literal["auto", "chars", "texts"] = "auto"
    # curriculum score: mean word length (the seed's proxy) or a trained model's perplexity
    curriculum_score: Literal["word_length", "perplexity"] = "word_length"
    # clustered: sentence embeddings (all-MiniLM-L6-v2) or tf-idf + truncated SVD
    embedding_backend: Literal["minilm", "tfidf"] = "minilm"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MoescopeError(f"strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.n_partitions < 1:
            raise MoescopeError(f"n_partitions must be >= 1, got {self.n_partitions}")
        if not 0.0 <= self.overlap_ratio <= 1.0:
            raise MoescopeError(f"overlap_ratio must be in [0, 1], got {self.overlap_ratio}")
        if not 0.0 <= self.balance_tolerance < 1.0:
            raise MoescopeError(f"balance_tolerance must be in [0, 1), got {self.balance_tolerance}")
        if self.balance_unit not in BALANCE_UNITS:
            raise MoescopeError(f"balance_unit must be one of {list(BALANCE_UNITS)}, got {self.balance_unit!r}")
        if self.min_article_length_chars < 0:
            raise MoescopeError(f"min_article_length_chars must be >= 0, got {self.min_article_length_chars}")
        if self.embedding_backend not in EMBEDDING_BACKENDS:
            raise MoescopeError(f"embedding_backend must be one of {list(EMBEDDING_BACKENDS)}, got {self.embedding_backend!r}")
