"""Clustering data and I/O (layer 2): capture activations, run one batch, save/load, plots.

Files of a clustering output directory::

    batches/<name>/activations.npy   float32 [N, n_components] (gate weights, 0 = not routed)
    batches/<name>/tokens.npz        token_id, domain, block, position, token_type (int [N])
    batches/<name>/meta.json         component labels, domains, model/data paths, capture config
    histories/<name>.npz             one MergeHistory (arrays + its metadata as a JSON string)
    ensemble.npz / ensemble.json     normalized assignments, distances per step, summary

torch is imported only inside the capture function, so worker processes that
merge saved batches never load it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moescope.cluster.components import (
    TOKEN_TYPES,
    classify_tokens,
    expert_activations,
    group_masks,
    null_blocks,
    neuron_label,
    served_fraction,
)
from moescope.cluster.ensemble import NormalizedHistories
from moescope.cluster.merge import MergeConfig, MergeHistory, merge_iteration, shuffle_tokens
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_bytes, atomic_write_json
from moescope.io.config import bounded, check_fields, from_dict, to_dict
from moescope.io.jsonfile import read_json_object
from moescope.io.manifest import verify_manifest

ACTIVATIONS_NAME = "activations.npy"
TOKENS_NAME = "tokens.npz"
META_NAME = "meta.json"


@dataclass
class CaptureConfig:
    """Which tokens go into which batch, and what a component is."""

    split: str = "eval"
    batch_by: Literal["seed", "domain"] = "seed"  # disjoint random batches, or one batch per domain
    n_batches: int = bounded(4, low=1)  # `seed` only
    tokens_per_batch: int = bounded(16384, low=1)  # rounded up to whole blocks; fewer when the split is short
    seed: int = bounded(0, low=0, high=2**32 - 1)
    components: Literal["experts", "neurons"] = "experts"
    neuron_layer: int | None = None  # `neurons`: block index (None = first MoE block)
    neuron_expert: int = 0  # `neurons`: which expert's FFN units
    weight: Literal["gate", "router_prob"] = "gate"  # activation of a routed (layer, expert)
    forward_batch_blocks: int = bounded(8, low=1, high=2**20)
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "capture")
        if self.batch_by not in ("seed", "domain"):
            raise MoescopeError(f"capture.batch_by must be 'seed' or 'domain', got {self.batch_by!r}")
        if self.components not in ("experts", "neurons"):
            raise MoescopeError(f"capture.components must be 'experts' or 'neurons', got {self.components!r}")
        if self.weight not in ("gate", "router_prob"):
            raise MoescopeError(f"capture.weight must be 'gate' or 'router_prob', got {self.weight!r}")


# ---------------------------------------------------------------- capture


def plan_batches(index: np.ndarray, domains: list[str], cfg: CaptureConfig, block_size: int) -> list[tuple[str, np.ndarray]]:
    """[(batch name, sorted positions in `index` = BlockStore.index(split))]: disjoint blocks per batch."""
    n_blocks = -(-cfg.tokens_per_batch // block_size)
    rng = np.random.default_rng(cfg.seed)
    if cfg.batch_by == "domain":
        plan = []
        for d, name in enumerate(domains):
            pos = np.flatnonzero(index[:, 0] == d)
            if len(pos):
                plan.append((name, np.sort(pos[rng.permutation(len(pos))[:n_blocks]])))
        return plan
    order = rng.permutation(len(index))
    per = min(n_blocks, len(index) // cfg.n_batches)
    if per == 0:
        raise MoescopeError(f"{len(index)} blocks cannot make {cfg.n_batches} batches")
    return [(f"seed{cfg.seed + i}", np.sort(order[i * per : (i + 1) * per])) for i in range(cfg.n_batches)]


def resolve_model_dir(path: str | Path, arm: str = "moe") -> tuple[Path, str | None]:
    """(model directory, recorded data directory or None) for a saved model, a stage or an experiment run.

    Accepts a model directory (config.json), a stage (final/ or checkpoints/latest)
    or an experiment run (arms/<arm>/...).  The data directory comes from the
    stage's config.json or the run's experiment.json when they record one.
    """
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path, None
    stage = path / "arms" / arm if (path / "arms" / arm).is_dir() else path
    data_dir = _recorded_data_dir(stage / "config.json") or _recorded_data_dir(path / "experiment.json", "experiment")
    if (stage / "final" / "config.json").is_file():
        return stage / "final", data_dir
    latest = stage / "checkpoints" / "latest"
    if latest.is_file():
        candidate = stage / "checkpoints" / latest.read_text().strip() / "model"
        if (candidate / "config.json").is_file():
            verify_manifest(candidate.parent, ("model/config.json", "model/model.safetensors"))  # the checkpoint's
            return candidate, data_dir
    if (path / "arms").is_dir():
        arms = sorted(p.name for p in (path / "arms").iterdir() if p.is_dir())
        raise MoescopeError(f"{path}: arm {arm!r} has no final/ or checkpoint model (arms: {', '.join(arms)})")
    raise MoescopeError(f"{path}: not a saved model (config.json + model.safetensors), a stage or an experiment run")


def _recorded_data_dir(path: Path, section: str | None = None) -> str | None:
    if not path.is_file():
        return None
    doc = read_json_object(path)
    doc = doc.get(section, {}) if section else doc
    value = doc.get("data_dir") if isinstance(doc, dict) else None
    return value or None


def capture_batches(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, cfg: CaptureConfig) -> list[Path]:
    """Run the model on each planned batch with routing capture on; write one batch directory each.

    The forward pass and routing record are the analysis stage's
    (moescope.analysis.capture.capture_routing); for `neurons` a pre-hook also
    keeps the chosen MoE layer's input so the expert's hidden units can be computed.
    """
    import torch
    from tqdm.auto import tqdm

    from moescope.analysis.capture import capture_routing
    from moescope.data.blocks import BlockStore, tokenizer_dir
    from moescope.io.saved_model import load_saved_model
    from moescope.moe.model import moe_layers

    store = BlockStore.open(data_dir)
    store.verify_blocks((cfg.split,))  # token ids within the vocabulary before any forward pass
    model = load_saved_model(model_dir, device=cfg.device)
    layers = moe_layers(model)
    if not layers:
        raise MoescopeError(f"{model_dir}: the model has no MoE layers to cluster")
    neuron_block = cfg.neuron_layer if cfg.neuron_layer is not None else min(layers)
    if cfg.components == "neurons":
        if neuron_block not in layers:
            raise MoescopeError(f"capture.neuron_layer={neuron_block} is not an MoE block (have {sorted(layers)})")
        if not 0 <= cfg.neuron_expert < layers[neuron_block].n_experts:
            raise MoescopeError(f"capture.neuron_expert={cfg.neuron_expert} outside 0..{layers[neuron_block].n_experts - 1}")
    n_experts = next(iter(layers.values())).n_experts
    tokenizer = _load_tokenizer(tokenizer_dir(data_dir))
    index = store.index(cfg.split)
    plan = plan_batches(index, store.domains, cfg, store.block_size)
    out_paths = []
    for name, positions in tqdm(plan, desc="capture batches", unit="batch"):
        layer_input: list[torch.Tensor] = []
        hook = None
        if cfg.components == "neurons":
            hook = layers[neuron_block].register_forward_pre_hook(lambda _m, args: layer_input.append(args[0].detach()))
        try:
            result = capture_routing(model, store, split=cfg.split, rows=positions,
                                     batch_blocks=cfg.forward_batch_blocks, progress=False)
        finally:
            if hook is not None:
                hook.remove()
        tables = result.tables
        if cfg.components == "experts":
            weights = {
                b: t.gate_weight if cfg.weight == "gate"
                else np.take_along_axis(t.router_probs, t.expert_index.astype(np.int64), axis=1)
                for b, t in tables.items()
            }
            acts, labels = expert_activations({b: t.expert_index for b, t in tables.items()}, weights, n_experts)
        else:
            layer = layers[neuron_block]
            x = torch.cat([h.reshape(-1, layer.d_model) for h in layer_input])
            routed = torch.from_numpy((tables[neuron_block].expert_index == cfg.neuron_expert).any(axis=1))
            with torch.no_grad():
                acts = _expert_hidden(layer.experts[cfg.neuron_expert], x, routed.to(x.device))
            labels = [neuron_label(neuron_block, cfg.neuron_expert, u) for u in range(acts.shape[1])]
        table = next(iter(tables.values()))
        token_ids = table.token_id.astype(np.int64)
        token_type = (
            classify_tokens(_decode_each(tokenizer, token_ids)) if tokenizer is not None else np.full(token_ids.shape, -1)
        )
        arrays = {
            "token_id": token_ids,
            "domain": table.domain.astype(np.int64),
            "block": table.block.astype(np.int64),  # row in BlockStore.index(split), as in RoutingTable
            "position": table.position.astype(np.int64),
            "token_type": token_type,
        }
        meta = {
            "name": name,
            "labels": labels,
            "domains": store.domains,
            "token_types": list(TOKEN_TYPES),
            "n_tokens": int(acts.shape[0]),
            "model_dir": str(model_dir),
            "data_dir": str(data_dir),
            "capture": to_dict(cfg),
        }
        out_paths.append(write_batch(Path(out_dir) / name, acts, arrays, meta))
    return out_paths


def _expert_hidden(expert: Any, x: Any, routed: Any) -> np.ndarray:
    """Hidden units of one expert on every token, 0 on tokens not routed to it."""
    import torch

    if hasattr(expert, "c_fc"):
        h = expert.act(expert.c_fc(x))
    elif hasattr(expert, "gate_proj"):
        h = torch.nn.functional.silu(expert.gate_proj(x)) * expert.up_proj(x)
    else:
        raise MoescopeError(f"cannot read hidden units of expert type {type(expert).__name__}")
    return (h * routed[:, None].to(h.dtype)).float().cpu().numpy()


def _load_tokenizer(path: Path) -> Any:
    if not path.is_dir():
        return None
    from moescope.data.tokenizer import load_pretrained_tokenizer

    return load_pretrained_tokenizer(str(path))


def _decode_each(tokenizer: Any, token_ids: np.ndarray) -> list[str]:
    """Decoded text of every token (decoded once per distinct id)."""
    uniq, inverse = np.unique(token_ids, return_inverse=True)
    texts = [tokenizer.decode([int(t)]) for t in uniq]
    return [texts[i] for i in inverse]


def write_batch(batch_dir: Path, activations: np.ndarray, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """One batch directory: activations.npy, tokens.npz, meta.json (each written atomically)."""
    if activations.shape[1] != len(meta["labels"]):
        raise ValueError(f"{activations.shape[1]} activation columns for {len(meta['labels'])} labels")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(activations, dtype=np.float32))
    atomic_write_bytes(batch_dir / ACTIVATIONS_NAME, buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(batch_dir / TOKENS_NAME, buf.getvalue())
    atomic_write_json(batch_dir / META_NAME, meta)
    return batch_dir


def read_batch(batch_dir: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(activations, token arrays, meta) of a batch directory; errors name the file."""
    batch_dir = Path(batch_dir)
    try:
        meta = json.loads((batch_dir / META_NAME).read_text(encoding="utf-8"))
        acts = np.load(batch_dir / ACTIVATIONS_NAME, mmap_mode="r")
        with np.load(batch_dir / TOKENS_NAME) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise MoescopeError(f"batch {batch_dir}: unreadable ({exc})") from exc
    if acts.ndim != 2 or acts.shape[1] != len(meta.get("labels", [])):
        raise MoescopeError(f"batch {batch_dir}: activations shape {acts.shape} does not match its labels")
    return acts, arrays, meta


# ---------------------------------------------------------------- one batch (what a worker runs)


@dataclass
class MergeTask:
    """Everything a worker needs, as plain values and paths (no arrays cross processes)."""

    name: str
    batch_dir: str
    result_path: str
    merge: dict  # MergeConfig fields
    seed: int
    shuffle_seed: int | None = None  # set: merge the token-shuffled null of the batch


def process_batch(task: MergeTask) -> str:
    """Load one batch, optionally shuffle it (null model), merge, save the history; return its path."""
    acts, _, meta = read_batch(task.batch_dir)
    acts = np.asarray(acts)
    if task.shuffle_seed is not None:
        acts = shuffle_tokens(acts, np.random.default_rng(task.shuffle_seed), null_blocks(meta["labels"]))
    cfg = from_dict(MergeConfig, {**task.merge, "seed": task.seed}, where="merge")
    history = merge_iteration(acts, cfg, labels=meta["labels"])
    if not history.labels:
        raise MoescopeError(f"batch {task.batch_dir}: every component is dead (max activation <= "
                            f"merge.dead_threshold={cfg.dead_threshold})")
    save_merge_history(history, task.result_path)
    return task.result_path


# ---------------------------------------------------------------- histories and ensembles


def save_merge_history(history: MergeHistory, path: str | Path) -> Path:
    meta = {
        "labels": history.labels,
        "dropped": history.dropped,
        "n_tokens": history.n_tokens,
        "config": to_dict(history.config),
    }
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        assignments=history.assignments,
        merges=history.merges,
        costs=history.costs,
        mdl=history.mdl,
        meta=np.array(json.dumps(meta)),
    )
    return atomic_write_bytes(path, buf.getvalue())


def load_merge_history(path: str | Path) -> MergeHistory:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("assignments", "merges", "costs", "mdl")}
    except (OSError, KeyError, ValueError) as exc:
        raise MoescopeError(f"{path}: not a merge history ({exc})") from exc
    return MergeHistory(
        labels=meta["labels"],
        dropped=meta["dropped"],
        n_tokens=int(meta["n_tokens"]),
        config=from_dict(MergeConfig, meta["config"], where=f"{path} config"),
        **arrays,
    )


def save_ensemble(
    out_dir: str | Path,
    normalized: NormalizedHistories,
    distances: dict[str, np.ndarray],
    members: list[str],
    summary: dict | None = None,
    prefix: str = "ensemble",
) -> tuple[Path, Path]:
    """<prefix>.npz (assignments, distances_<method>) and <prefix>.json (labels, members, summary)."""
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    np.savez_compressed(buf, assignments=normalized.assignments, **{f"distances_{m}": d for m, d in distances.items()})
    npz = atomic_write_bytes(out_dir / f"{prefix}.npz", buf.getvalue())
    doc = {"labels": normalized.labels, "members": members, "metadata": normalized.metadata,
           "methods": sorted(distances), "summary": summary or {}}
    js = atomic_write_json(out_dir / f"{prefix}.json", doc)
    return npz, js


def load_ensemble(out_dir: str | Path, prefix: str = "ensemble") -> tuple[NormalizedHistories, dict[str, np.ndarray], dict]:
    out_dir = Path(out_dir)
    try:
        doc = json.loads((out_dir / f"{prefix}.json").read_text(encoding="utf-8"))
        with np.load(out_dir / f"{prefix}.npz", allow_pickle=False) as z:
            assignments = z["assignments"]
            distances = {m: z[f"distances_{m}"] for m in doc["methods"]}
    except (OSError, KeyError, ValueError) as exc:
        raise MoescopeError(f"{out_dir}: no readable {prefix}.npz/.json ({exc})") from exc
    return NormalizedHistories(assignments=assignments, labels=doc["labels"], metadata=doc["metadata"]), distances, doc


# ---------------------------------------------------------------- what the final clusters serve


def describe_clusters(history: MergeHistory, batch_dir: str | Path, step: int | None = None) -> dict:
    """Groups at `step` (default: the MDL-optimal step) with the share of each domain's / token type's tokens they serve."""
    acts, arrays, meta = read_batch(batch_dir)
    step = history.best_step if step is None else step
    col = {lab: i for i, lab in enumerate(meta["labels"])}
    masks = np.asarray(acts)[:, [col[lab] for lab in history.labels]] > history.config.activation_threshold
    served = group_masks(masks, history.assignments[step])
    domains = meta["domains"]
    by_domain = served_fraction(served, arrays["domain"].astype(np.int64), len(domains))
    types = meta.get("token_types", list(TOKEN_TYPES))
    tt = arrays["token_type"].astype(np.int64)
    by_type = served_fraction(served[tt >= 0], tt[tt >= 0], len(types)) if (tt >= 0).any() else None
    groups = history.groups_at(step)
    row = history.assignments[step]
    # cohesion: tokens on which every member fires / tokens on which any fires (1 = always together)
    together = [float(masks[:, row == g].all(axis=1).sum() / max(served[:, g].sum(), 1)) for g in range(len(groups))]
    return {
        "step": int(step),
        "n_groups": len(groups),
        "mdl_bits_per_token": round(float(history.mdl[step]), 5),
        "groups": [
            {
                "components": groups[g],
                "token_fraction": float(served[:, g].mean()),
                "cohesion": round(together[g], 4),
                "domains": {d: _nan_to_none(by_domain[g, i]) for i, d in enumerate(domains)},
                "token_types": None if by_type is None else {t: _nan_to_none(by_type[g, i]) for i, t in enumerate(types)},
            }
            for g in range(len(groups))
        ],
    }


def _nan_to_none(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cluster_sizes(histories: dict[str, MergeHistory], path: str | Path, top: int = 8) -> Path:
    """Sizes (components) of the largest groups against the number of groups, one panel per member."""
    plt = _pyplot()
    names = list(histories)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        h = histories[name]
        sizes = np.stack([np.sort(np.bincount(row))[::-1][:top].tolist() + [0] * max(0, top - len(np.bincount(row)))
                          for row in h.assignments])
        k = h.n_groups
        for r in range(sizes.shape[1]):
            ax.plot(k, sizes[:, r], lw=1.2, label=f"#{r + 1}")
        ax.invert_xaxis()
        ax.set_xlabel("groups (k)")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("components in group")
    axes[0][-1].legend(fontsize=7, title="largest", loc="upper left")
    fig.suptitle("Cluster sizes as merging proceeds")
    fig.tight_layout()
    return _save(fig, path)


def plot_distance_vs_k(
    normalized: NormalizedHistories,
    distances: np.ndarray,
    path: str | Path,
    null_normalized: NormalizedHistories | None = None,
    null_distances: np.ndarray | None = None,
    method: str = "perm_invariant_hamming",
) -> Path:
    """Mean distance between members (fraction of components) against k, with the token-shuffled null band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for norm, dist, color, name in (
        (normalized, distances, "C0", "data batches"),
        (null_normalized, null_distances, "0.5", "token-shuffled null"),
    ):
        if norm is None or dist is None or norm.n_members < 2:
            continue
        iu = np.triu_indices(norm.n_members, 1)
        pair = dist[:, iu[0], iu[1]] / _distance_scale(len(norm.labels), method)
        k = norm.n_groups.mean(axis=0)[: len(pair)]
        ax.fill_between(k, pair.min(axis=1), pair.max(axis=1), color=color, alpha=0.25, lw=0)
        ax.plot(k, pair.mean(axis=1), color=color, lw=1.5, label=f"{name} (mean, min-max band)")
    ax.invert_xaxis()
    ax.set_xlabel("groups (k)")
    ax.set_ylabel("distance (fraction of components)" if method == "perm_invariant_hamming" else "distance (fraction of pairs)")
    ax.set_title(f"Stability across batches: {method.replace('_', ' ')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _distance_scale(n_labels: int, method: str) -> float:
    return float(n_labels) if method == "perm_invariant_hamming" else max(1.0, n_labels * (n_labels - 1) / 2)


def plot_final_clusters(description: dict, path: str | Path, title: str = "") -> Path:
    """Heatmaps: share of each domain's (and token type's) tokens served by each final cluster."""
    plt = _pyplot()
    groups = description["groups"]
    panels = [("domains", "domain")]
    if groups and groups[0]["token_types"] is not None:
        panels.append(("token_types", "token type"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 + 3 * len(panels), 0.5 * len(groups) + 2), squeeze=False)
    ylabels = [_short(g["components"]) for g in groups]
    for ax, (key, xlabel) in zip(axes[0], panels):
        cols = list(groups[0][key]) if groups else []
        mat = np.array([[np.nan if g[key][c] is None else g[key][c] for c in cols] for g in groups], dtype=float)
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(groups)), ylabels if key == "domains" else [""] * len(groups), fontsize=7)
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of tokens served")
    fig.suptitle(title or f"Final clusters (k = {description['n_groups']})")
    return _save(fig, path)


def _short(components: list[str], limit: int = 4) -> str:
    head = ", ".join(components[:limit])
    return head + (f" +{len(components) - limit}" if len(components) > limit else "")


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
