"""The routing table of one MoE layer on the eval split: token-aligned arrays (pure data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from moescope.analysis.metrics import token_router_entropy


@dataclass(frozen=True)
class RoutingTable:
    """Where every eval token of one layer went.

    block is the eval block's row in ``BlockStore.index("eval")`` (unique across
    domains); position is the token's index inside its block. router_probs may be
    float16 to halve the file size (enough for entropies and the viewer).

    experts_per_token and expert_mask are kept for expert-choice routing only, where experts
    pick tokens: how many experts took each token (0..E; 0 = unrouted, the token passes
    through the residual only) and which ones ([N, E] bool, the layer's own selection). The
    routing statistics of such a table count every (token, expert) assignment in expert_mask
    (:meth:`assignments`), not expert_index: that lists only up to k of a token's experts,
    highest router probability first, and an unrouted token's row holds its router's first
    choice with gate 0 (what the viewer shows). Token-choice tables leave both None (every
    token has its k experts in expert_index, less any dropped by capacity).

    router_probs may be None where N x E is too large to keep (released models with
    64-256 experts over a million tokens): then router_entropy holds each token's
    router entropy and expert_count says E. Statistics that need the full
    distribution (entropy of the mean, the format test) are left out for such tables.
    """

    token_id: np.ndarray  # int [N]
    block: np.ndarray  # int [N]
    position: np.ndarray  # int [N]
    domain: np.ndarray  # int [N]
    expert_index: np.ndarray  # int [N, k]
    gate_weight: np.ndarray  # float [N, k]; 0 = assignment dropped by capacity
    router_probs: np.ndarray | None  # float [N, E], or None when not kept
    router_entropy: np.ndarray | None = None  # float [N] nats; derived from router_probs when None
    expert_count: int = 0  # E; required when router_probs is None
    experts_per_token: np.ndarray | None = None  # int [N]; expert choice only (0 = unrouted)
    expert_mask: np.ndarray | None = None  # bool [N, E]; expert choice only: the experts that took each token

    def __post_init__(self) -> None:
        n = self.token_id.shape[0]
        for name in self.columns():
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape[0] != n:
                raise ValueError(f"routing table column {name} has {value.shape[0]} rows, token_id has {n}")
        if self.expert_index.ndim != 2 or self.expert_index.shape != self.gate_weight.shape:
            raise ValueError(
                f"expert_index {self.expert_index.shape} and gate_weight {self.gate_weight.shape} must be [N, k]"
            )
        if self.router_probs is None:
            if self.router_entropy is None or self.expert_count <= 0:
                raise ValueError("a table without router_probs needs router_entropy and expert_count")
        elif self.router_probs.ndim != 2:
            raise ValueError(f"router_probs must be [N, E], got {self.router_probs.shape}")
        elif self.expert_count not in (0, self.router_probs.shape[1]):
            raise ValueError(f"expert_count {self.expert_count} != router_probs width {self.router_probs.shape[1]}")
        if self.expert_mask is not None and (self.expert_mask.ndim != 2 or self.expert_mask.shape[1] != self.n_experts):
            raise ValueError(f"expert_mask {self.expert_mask.shape} must be [N, {self.n_experts}]")

    @classmethod
    def columns(cls) -> list[str]:
        """Names of the token-aligned array columns (everything but expert_count)."""
        return [f.name for f in fields(cls) if f.name != "expert_count"]

    @property
    def n_tokens(self) -> int:
        return int(self.token_id.shape[0])

    @property
    def n_experts(self) -> int:
        return int(self.router_probs.shape[1]) if self.router_probs is not None else int(self.expert_count)

    @property
    def top_k(self) -> int:
        return int(self.expert_index.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """Column name -> array (the npz layout); absent optional columns are left out."""
        out = {name: getattr(self, name) for name in self.columns() if getattr(self, name) is not None}
        out["expert_count"] = np.asarray(self.n_experts, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "RoutingTable":
        present = set(arrays.keys()) if hasattr(arrays, "keys") else set(arrays)
        cols = {name: (np.asarray(arrays[name]) if name in present else None) for name in cls.columns()}
        count = int(np.asarray(arrays["expert_count"])) if "expert_count" in present else 0
        return cls(**cols, expert_count=count)

    def select(self, mask: np.ndarray) -> "RoutingTable":
        """The rows where ``mask`` is true (e.g. one domain)."""
        cols = {name: (None if (v := getattr(self, name)) is None else v[mask]) for name in self.columns()}
        return RoutingTable(**cols, expert_count=self.expert_count)

    def unrouted(self) -> np.ndarray | None:
        """[N] bool, True for a token no expert took (expert choice); None for token choice."""
        return None if self.experts_per_token is None else np.asarray(self.experts_per_token) == 0

    @property
    def expert_choice(self) -> bool:
        """True when the layer's own selection is kept (experts picked the tokens)."""
        return self.expert_mask is not None

    def assignments(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (token row, expert) assignment the layer made, as two int64 arrays [M].

        Expert choice: the true cells of expert_mask (a token taken by 2 experts appears
        twice, an unrouted one never). Token choice: each of a token's k choices in
        expert_index (dropped ones included, as the token-choice statistics count them).
        """
        if self.expert_mask is not None:
            rows, experts = np.nonzero(np.asarray(self.expert_mask))
            return rows.astype(np.int64), experts.astype(np.int64)
        idx = np.asarray(self.expert_index, dtype=np.int64)
        return np.repeat(np.arange(self.n_tokens, dtype=np.int64), idx.shape[1]), idx.reshape(-1)

    def token_entropy(self) -> np.ndarray:
        """Router entropy (nats) of every token [N]: stored, or computed from router_probs."""
        if self.router_entropy is not None:
            return np.asarray(self.router_entropy, dtype=np.float64)
        return token_router_entropy(self.router_probs)

    def chosen_probability(self) -> np.ndarray:
        """Probability of each token's first-choice expert [N] (what the viewer shows on hover).

        The router probability where router_probs is kept, else the first gate weight.
        """
        if self.router_probs is None:
            return np.asarray(self.gate_weight[:, 0], dtype=np.float32)
        first = self.expert_index[:, 0].astype(np.int64)
        return self.router_probs[np.arange(self.n_tokens), first].astype(np.float32)
