"""The order in which training blocks are visited: a pure function of (seed, step).

Every arm of an experiment uses the same seed and batch, so every arm sees exactly
the same blocks in the same order. The order does not depend on the number of
processes either: a step's batch is fixed first, then cut into micro-batches and
per-process shards. Resuming needs only the step number (the data position).
"""

from __future__ import annotations

import numpy as np


class TrainOrder:
    """Epoch-wise random permutations of a split's (domain_id, row) index."""

    def __init__(self, index: np.ndarray, seed: int, batch_sequences: int) -> None:
        if len(index) == 0:
            raise ValueError("empty training index")
        self.index = index
        self.seed = int(seed)
        self.batch_sequences = int(batch_sequences)
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
            self._epoch = epoch
        return self._perm

    def positions(self, step: int) -> np.ndarray:
        """Global sequence positions of optimizer step `step` (0-based)."""
        start = step * self.batch_sequences
        return np.arange(start, start + self.batch_sequences, dtype=np.int64)

    def rows(self, step: int, micro: int = 0, n_micro: int = 1, process: int = 0, n_processes: int = 1) -> np.ndarray:
        """(domain_id, row) pairs of one micro-batch shard of step `step`."""
        per_micro = self.batch_sequences // n_micro
        per_proc = per_micro // n_processes
        pos = self.positions(step)[micro * per_micro : (micro + 1) * per_micro]
        pos = pos[process * per_proc : (process + 1) * per_proc]
        n = len(self.index)
        out = np.empty((len(pos), 2), dtype=np.int64)
        for j, p in enumerate(pos):
            out[j] = self.index[self._permutation(int(p // n))[int(p % n)]]
        return out

    def sequences_consumed(self, steps_done: int) -> int:
        """The data position after `steps_done` optimizer steps."""
        return steps_done * self.batch_sequences
