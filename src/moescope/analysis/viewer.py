"""The per-token routing viewer's data (viewer.json): pure computation.

For a few eval blocks of every domain: each token's text and, per MoE layer, its
first-choice expert and that expert's router probability ("experts", "probs").
With top-k routing (k > 1) every token carries instead all k experts and their gate
weights ("topk", "topk_weights"; the first choice is the first of them), packed as
base64 so that a 24-layer top-8 model stays a few MB: ids as little-endian uint8
(E <= 256) or uint16, weights as uint8 levels w * 255 (resolution 0.004), k per
token, in block order.

Expert-choice arms (experts pick tokens; a token may be taken by 0..E experts) also carry,
per sample and layer, "experts_per_token": how many experts took each token, 0 = unrouted
(no expert selected it: it passes through the residual only, and its "experts" / "topk"
entry is only its router's first choice, with gate 0). The arm then says "routing":
"expert_choice" and gives each layer's "unrouted_fraction" over all captured tokens (the
number metrics.json reports as load.unrouted_fraction). Token-choice arms have none of these keys.

Per layer, "expert_domain" gives every expert's dominant domain (the domain d
maximizing P(expert | domain), -1 for an unused expert) and "expert_domain_share"
P(that domain | expert) under equal domain weights: the report colours tokens by
their expert's dominant domain, so the colours stay readable with 64-256 experts.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np

from moescope.analysis import metrics
from moescope.analysis.table import RoutingTable

WEIGHT_LEVELS = 255  # gate weights are stored as round(w * 255) in one byte


def choose_sample_rows(block_rows: np.ndarray, block_domain: np.ndarray, per_domain: int) -> list[int]:
    """Up to ``per_domain`` block rows of every domain, spread evenly over the captured ones."""
    chosen: list[int] = []
    for d in np.unique(block_domain):
        mine = np.asarray(block_rows)[np.asarray(block_domain) == d]
        take = np.unique(np.linspace(0, mine.size - 1, min(per_domain, mine.size)).round().astype(np.int64))
        chosen.extend(int(r) for r in mine[take])
    return chosen


def pack_topk(expert_index: np.ndarray, gate_weight: np.ndarray, n_experts: int) -> tuple[str, str]:
    """[T, k] expert ids and gate weights -> (base64 ids, base64 weight levels), row-major."""
    dtype = "<u1" if n_experts <= 256 else "<u2"
    ids = np.ascontiguousarray(expert_index, dtype=np.int64).astype(dtype)
    levels = np.clip(np.rint(np.asarray(gate_weight, dtype=np.float64) * WEIGHT_LEVELS), 0, WEIGHT_LEVELS)
    return (base64.b64encode(ids.tobytes()).decode("ascii"),
            base64.b64encode(levels.astype(np.uint8).tobytes()).decode("ascii"))


def unpack_topk(ids: str, weights: str, top_k: int, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_topk`: ([T, k] ids, [T, k] weights rounded to 1/255)."""
    dtype = "<u1" if n_experts <= 256 else "<u2"
    e = np.frombuffer(base64.b64decode(ids), dtype=dtype).astype(np.int64).reshape(-1, top_k)
    w = np.frombuffer(base64.b64decode(weights), dtype=np.uint8).astype(np.float64).reshape(-1, top_k) / WEIGHT_LEVELS
    return e, w


def expert_domains(table: RoutingTable, n_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Each expert's dominant domain [E] (-1 = unused) and P(that domain | expert) with equal domain weights [E].

    Over all top-k assignments of the whole table, so the colours mean the same in every sample.
    """
    counts = metrics.count_domain_expert(table.expert_index, table.domain, table.n_experts, n_domains)
    joint = metrics.joint_distribution(counts, equal_domain_weights=True)  # [D, E]
    used = joint.sum(axis=0) > 0
    share = metrics.domain_given_expert(joint)
    dominant = np.where(used, np.nan_to_num(share, nan=-1.0).argmax(axis=0), -1)
    best = np.where(used, np.nan_to_num(share).max(axis=0), 0.0)
    return dominant.astype(np.int64), best


def viewer_arm(
    tables: Mapping[int, RoutingTable],
    rows: Sequence[int],
    domain_names: Sequence[str],
    pieces: Mapping[int, Sequence[str]],
    *,
    max_tokens: int | None = None,
    n_shared_experts: int = 0,
) -> dict:
    """One arm's entry of viewer.json.

    tables: {layer: routing table}; rows: the eval block rows to show; pieces: the
    decoded text of each token of each of those rows (block order). max_tokens:
    show only the first tokens of each block (keeps viewer.json small for long
    contexts and many layers). n_shared_experts: always-active experts outside the
    routed top-k, named in the hover text.
    """
    layers = sorted(tables)
    if not layers:
        raise ValueError("a viewer needs at least one MoE layer")
    n_experts, top_k = tables[layers[0]].n_experts, tables[layers[0]].top_k
    samples = []
    for row in rows:
        sample: dict = {"experts": {}, "probs": {}} if top_k == 1 else {"topk": {}, "topk_weights": {}}
        for layer in layers:
            table = tables[layer]
            mask = table.block == row
            if not mask.any():
                raise ValueError(f"block {row} is not in the routing table of layer {layer}")
            order = np.argsort(table.position[mask], kind="stable")[:max_tokens]
            part = table.select(np.flatnonzero(mask)[order])
            if top_k == 1:
                sample["experts"][str(layer)] = part.expert_index[:, 0].astype(int).tolist()
                sample["probs"][str(layer)] = np.round(part.chosen_probability(), 4).tolist()
            else:
                ids, weights = pack_topk(part.expert_index, part.gate_weight, n_experts)
                sample["topk"][str(layer)], sample["topk_weights"][str(layer)] = ids, weights
            if part.experts_per_token is not None:
                sample.setdefault("experts_per_token", {})[str(layer)] = part.experts_per_token.astype(int).tolist()
            domain = int(part.domain[0])
            n_shown = part.n_tokens
        tokens = list(pieces[row])[:max_tokens]
        if len(tokens) != n_shown:
            raise ValueError(f"block {row}: {len(tokens)} token texts for {n_shown} tokens")
        sample["domain"] = domain_names[domain]
        sample["text_id"] = f"{domain_names[domain]}:eval-block-{row}"
        sample["tokens"] = tokens
        samples.append(sample)
    dominant = {str(layer): expert_domains(tables[layer], len(domain_names)) for layer in layers}
    unrouted = {str(layer): tables[layer].unrouted() for layer in layers}
    expert_choice = {} if any(u is None for u in unrouted.values()) else {
        "routing": "expert_choice",
        "unrouted_fraction": {layer: round(float(u.mean()), 4) for layer, u in unrouted.items()},
    }
    return {
        "layers": layers,
        "n_experts": n_experts,
        "top_k": top_k,
        "domains": list(domain_names),
        "expert_domain": {layer: d.tolist() for layer, (d, _) in dominant.items()},
        "expert_domain_share": {layer: np.round(s, 3).tolist() for layer, (_, s) in dominant.items()},
        "samples": samples,
        **({"n_shared_experts": int(n_shared_experts)} if n_shared_experts else {}),
        **expert_choice,
    }
