"""The per-token routing viewer's data (viewer.json, see INTERFACES.md): pure computation.

For a few eval blocks of every domain: each token's text and, per MoE layer, its
first-choice expert and that expert's router probability. The report colours the
tokens by expert and shows the probability on hover.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moescope.analysis.table import RoutingTable


def choose_sample_rows(block_rows: np.ndarray, block_domain: np.ndarray, per_domain: int) -> list[int]:
    """Up to ``per_domain`` block rows of every domain, spread evenly over the captured ones."""
    chosen: list[int] = []
    for d in np.unique(block_domain):
        mine = np.asarray(block_rows)[np.asarray(block_domain) == d]
        take = np.unique(np.linspace(0, mine.size - 1, min(per_domain, mine.size)).round().astype(np.int64))
        chosen.extend(int(r) for r in mine[take])
    return chosen


def viewer_arm(
    tables: Mapping[int, RoutingTable],
    rows: Sequence[int],
    domain_names: Sequence[str],
    pieces: Mapping[int, Sequence[str]],
) -> dict:
    """One arm's entry of viewer.json.

    tables: {layer: routing table}; rows: the eval block rows to show; pieces: the
    decoded text of each token of each of those rows (block order).
    """
    layers = sorted(tables)
    if not layers:
        raise ValueError("a viewer needs at least one MoE layer")
    samples = []
    for row in rows:
        sample: dict = {"experts": {}, "probs": {}}
        for layer in layers:
            table = tables[layer]
            mask = table.block == row
            if not mask.any():
                raise ValueError(f"block {row} is not in the routing table of layer {layer}")
            order = np.argsort(table.position[mask], kind="stable")
            part = table.select(np.flatnonzero(mask)[order])
            sample["experts"][str(layer)] = part.expert_index[:, 0].astype(int).tolist()
            sample["probs"][str(layer)] = np.round(part.chosen_probability(), 4).tolist()
            domain = int(part.domain[0])
        tokens = list(pieces[row])
        if len(tokens) != len(sample["experts"][str(layers[0])]):
            raise ValueError(f"block {row}: {len(tokens)} token texts for {len(sample['experts'][str(layers[0])])} tokens")
        sample["domain"] = domain_names[domain]
        sample["text_id"] = f"{domain_names[domain]}:eval-block-{row}"
        sample["tokens"] = tokens
        samples.append(sample)
    return {"layers": layers, "n_experts": tables[layers[0]].n_experts, "samples": samples}
