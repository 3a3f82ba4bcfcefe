"""The routing table of one MoE layer on the eval split: token-aligned arrays (pure data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class RoutingTable:
    """Where every eval token of one layer went.

    block is the eval block's row in ``BlockStore.index("eval")`` (unique across
    domains); position is the token's index inside its block. router_probs may be
    float16 to halve the file size (enough for entropies and the viewer).
    """

    token_id: np.ndarray  # int [N]
    block: np.ndarray  # int [N]
    position: np.ndarray  # int [N]
    domain: np.ndarray  # int [N]
    expert_index: np.ndarray  # int [N, k]
    gate_weight: np.ndarray  # float [N, k]; 0 = assignment dropped by capacity
    router_probs: np.ndarray  # float [N, E]

    def __post_init__(self) -> None:
        n = self.token_id.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if value.shape[0] != n:
                raise ValueError(f"routing table column {f.name} has {value.shape[0]} rows, token_id has {n}")
        if self.expert_index.ndim != 2 or self.expert_index.shape != self.gate_weight.shape:
            raise ValueError(
                f"expert_index {self.expert_index.shape} and gate_weight {self.gate_weight.shape} must be [N, k]"
            )
        if self.router_probs.ndim != 2:
            raise ValueError(f"router_probs must be [N, E], got {self.router_probs.shape}")

    @property
    def n_tokens(self) -> int:
        return int(self.token_id.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.router_probs.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_index.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """Column name -> array (the npz layout)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays) -> "RoutingTable":
        return cls(**{f.name: np.asarray(arrays[f.name]) for f in fields(cls)})

    def select(self, mask: np.ndarray) -> "RoutingTable":
        """The rows where ``mask`` is true (e.g. one domain)."""
        return RoutingTable(**{name: value[mask] for name, value in self.arrays().items()})

    def chosen_probability(self) -> np.ndarray:
        """Router probability of each token's first-choice expert [N] (what the viewer shows on hover)."""
        first = self.expert_index[:, 0].astype(np.int64)
        return self.router_probs[np.arange(self.n_tokens), first].astype(np.float32)
