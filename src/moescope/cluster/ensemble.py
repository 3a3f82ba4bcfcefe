"""Put several merge histories on one label set so they can be compared (layer 1).

Members of an ensemble (one merge per data batch) may keep different
components: a component dead in one batch is absent from that member's
history.  On the common label set such a component is a singleton group of
its own at every step, which is what it is for that member: never merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.cluster.merge import MergeHistory


@dataclass
class NormalizedHistories:
    """Group assignments of every member at every step over one shared label order."""

    assignments: np.ndarray  # int32 [n_members, n_steps + 1, n_labels]; ids 0..n_groups-1 per row
    labels: list[str]  # the common label set (union, in order of first appearance)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_members(self) -> int:
        return int(self.assignments.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.assignments.shape[1]) - 1

    @property
    def n_groups(self) -> np.ndarray:
        """Groups on the common label set (missing labels counted as singletons), int [n_members, n_steps + 1]."""
        return self.assignments.max(axis=2) + 1


def normalize_ensemble(histories: Sequence[MergeHistory]) -> NormalizedHistories:
    """Common label set for all members; missing labels become singletons.

    Members are aligned by merge step and truncated to the shortest history
    (step i = i merges done in every member).
    """
    if not histories:
        raise ValueError("normalize_ensemble needs at least one history")
    labels: list[str] = []
    seen: set[str] = set()
    for hist in histories:
        for lab in list(hist.labels) + list(hist.dropped):
            if lab not in seen:
                seen.add(lab)
                labels.append(lab)
    position = {lab: i for i, lab in enumerate(labels)}
    n_steps = min(h.n_steps for h in histories)
    out = np.empty((len(histories), n_steps + 1, len(labels)), dtype=np.int32)
    for m, hist in enumerate(histories):
        cols = np.array([position[lab] for lab in hist.labels], dtype=np.int64)
        missing = np.setdiff1d(np.arange(len(labels)), cols)
        rows = hist.assignments[: n_steps + 1]
        k = rows.max(axis=1, initial=-1) + 1  # groups among the member's own components, per step
        out[m][:, cols] = rows
        out[m][:, missing] = k[:, None] + np.arange(len(missing))[None, :]
    return NormalizedHistories(
        assignments=out,
        labels=labels,
        metadata={"n_members": len(histories), "n_steps": n_steps,
                  "n_kept": [len(h.labels) for h in histories]},
    )
