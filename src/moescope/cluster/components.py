"""What the clustering merges: components of an MoE model and their per-token activations (layer 1).

A component is a (layer, expert) pair: its activation on a token is the gate
weight the token gave that expert (0 where the token was not routed there).
Co-activation across layers finds expert pathways; within a layer under top-k
it finds experts chosen together.  As an option a component is one FFN neuron
of one expert (activation = the hidden unit's value on the tokens routed to
that expert, 0 elsewhere).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

import numpy as np


_EXPERT_LABEL = re.compile(r"L(\d+)\.e(\d+)")


def expert_label(layer: int, expert: int) -> str:
    return f"L{layer}.e{expert}"


def neuron_label(layer: int, expert: int, unit: int) -> str:
    return f"L{layer}.e{expert}.n{unit}"


def expert_activations(
    expert_index: Mapping[int, np.ndarray],
    gate_weight: Mapping[int, np.ndarray],
    n_experts: int,
) -> tuple[np.ndarray, list[str]]:
    """Per-token gate weight of every (layer, expert): float32 [N, n_layers * n_experts] and labels.

    expert_index / gate_weight: {layer: int [N, k]} / {layer: float [N, k]}, tokens aligned
    across layers (the shape of analysis.table.RoutingTable).
    """
    layers = sorted(expert_index)
    if not layers:
        raise ValueError("no MoE layers in the routing table")
    n_tokens = np.asarray(expert_index[layers[0]]).shape[0]
    out = np.zeros((n_tokens, len(layers) * n_experts), dtype=np.float32)
    rows = np.arange(n_tokens)
    labels: list[str] = []
    for li, layer in enumerate(layers):
        idx = np.asarray(expert_index[layer]).reshape(n_tokens, -1)
        w = np.asarray(gate_weight[layer], dtype=np.float32).reshape(n_tokens, -1)
        if idx.shape != w.shape:
            raise ValueError(f"layer {layer}: expert_index {idx.shape} and gate_weight {w.shape} differ")
        if idx.size and (idx.min() < 0 or idx.max() >= n_experts):
            raise ValueError(f"layer {layer}: expert ids outside 0..{n_experts - 1}")
        for j in range(idx.shape[1]):
            np.add.at(out, (rows, li * n_experts + idx[:, j]), w[:, j])
        labels.extend(expert_label(layer, e) for e in range(n_experts))
    return out, labels


def null_blocks(labels: Sequence[str]) -> np.ndarray:
    """Which columns the token-shuffled null moves together: one block per MoE layer when every
    component is a (layer, expert) pair, else every column alone (neurons of one expert)."""
    layers = []
    for lab in labels:
        m = _EXPERT_LABEL.fullmatch(lab)
        if m is None:
            return np.arange(len(labels))
        layers.append(int(m.group(1)))
    return np.asarray(layers, dtype=np.int64)


def group_masks(masks: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """bool [N, k]: token t is served by group g when any of g's components is active on it."""
    k = int(assignment.max()) + 1 if assignment.size else 0
    out = np.zeros((masks.shape[0], k), dtype=bool)
    for g in range(k):
        out[:, g] = masks[:, assignment == g].any(axis=1)
    return out


def served_fraction(served: np.ndarray, category: np.ndarray, n_categories: int) -> np.ndarray:
    """float [k, n_categories]: fraction of each category's tokens that group g serves (NaN if no tokens)."""
    counts = np.bincount(category, minlength=n_categories).astype(np.float64)
    hits = np.stack([np.bincount(category[served[:, g]], minlength=n_categories) for g in range(served.shape[1])])
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits.reshape(served.shape[1], n_categories) / counts[None, :]


TOKEN_TYPES: tuple[str, ...] = ("word", "capitalized", "number", "punctuation", "whitespace", "mixed")
_PUNCT = set(string.punctuation)


def classify_tokens(token_strings: Sequence[str]) -> np.ndarray:
    """Coarse type of each decoded token (index into TOKEN_TYPES), ignoring one leading space."""
    out = np.empty(len(token_strings), dtype=np.int64)
    for i, tok in enumerate(token_strings):
        core = tok[1:] if tok.startswith(" ") and len(tok) > 1 else tok
        if not core.strip():
            kind = "whitespace"
        elif core.isdigit():
            kind = "number"
        elif core.isalpha():
            kind = "capitalized" if core[0].isupper() else "word"
        elif all(ch in _PUNCT for ch in core.strip()):
            kind = "punctuation"
        else:
            kind = "mixed"
        out[i] = TOKEN_TYPES.index(kind)
    return out
