"""The report's figures (matplotlib, Agg). Each function takes loaded metrics and writes one PNG.

Inputs are the plain dicts of RUN/analysis/metrics.json and the records of
RUN/arms/*/metrics.jsonl; nothing here reads files, so any figure can be redrawn
from metrics alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moescope.io.figure import save_figure  # noqa: E402
from moescope.report.fmt import fmt_interval, fmt_p, interval_values  # noqa: E402

ARM_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]
DPI = 110


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=DPI)


def _records(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("kind") == kind]


def _ema(values: list[float], alpha: float = 0.2) -> np.ndarray:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return np.asarray(out)


def moe_layer_ids(metrics: dict, arm: str) -> list[str]:
    return sorted(metrics["arms"][arm].get("layers", {}), key=int)


def plot_loss_curves(arm_records: dict[str, list[dict]], path: Path) -> Path:
    """Training loss (smoothed) and held-out loss of every arm on one axis at matched steps."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for n, (arm, recs) in enumerate(arm_records.items()):
        color = ARM_COLORS[n % len(ARM_COLORS)]
        train = _records(recs, "train")
        if train:
            ax.plot([r["step"] for r in train], _ema([r["ce"] for r in train]), color=color, alpha=0.45, lw=1.2)
        ev = _records(recs, "eval")
        if ev:
            ax.plot([r["step"] for r in ev], [r["loss"]["domain_weighted"] for r in ev], "o-", color=color,
                    lw=2, ms=4, label=f"{arm} (eval, domain-weighted)")
    ax.set_xlabel("optimizer step (all arms: same data order, tokens and schedule)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss: thin = train (EMA), dots = held-out eval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# Above these sizes the heatmaps switch to the compact layout (no numbers in cells, experts
# grouped by dominant domain, a few chosen layers): cell labels are unreadable beyond them.
CELL_LABEL_MAX_EXPERTS = 16
HEATMAP_MAX_LAYERS = 6


def heatmap_layers(metrics: dict, arm: str, max_layers: int = HEATMAP_MAX_LAYERS) -> list[str]:
    """At most ``max_layers`` layers to draw: the first, the last, the best-NMI one, and evenly spaced others."""
    ids = moe_layer_ids(metrics, arm)
    if len(ids) <= max_layers:
        return ids
    layers = metrics["arms"][arm]["layers"]
    best = max(ids, key=lambda k: layers[k]["specialization"]["nmi"]["estimate"])
    picked = {ids[0], ids[-1], best}
    for pos in np.linspace(0, len(ids) - 1, max_layers):
        if len(picked) >= max_layers:
            break
        picked.add(ids[int(round(pos))])
    return sorted(picked, key=int)


def expert_order(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of P(expert | domain) [D, E] grouped by dominant domain, strongest first: (order [E], domain [E])."""
    mat = np.nan_to_num(np.asarray(mat, dtype=float))
    dominant = mat.argmax(axis=0)
    used = mat.sum(axis=0) > 0
    dominant = np.where(used, dominant, mat.shape[0])  # unused experts last
    order = np.lexsort((-mat.max(axis=0), dominant))
    return order, dominant[order]


def plot_expert_given_domain(metrics: dict, arms: list[str], path: Path) -> Path:
    """P(expert | domain) heatmaps, one row per MoE arm, one column per MoE layer.

    With many experts or layers: the compact layout of :func:`plot_expert_given_domain_compact`.
    """
    max_exp = max(len(metrics["arms"][a]["layers"][lay]["specialization"]["expert_given_domain"][0])
                  for a in arms for lay in moe_layer_ids(metrics, a))
    if max_exp > CELL_LABEL_MAX_EXPERTS or max(len(moe_layer_ids(metrics, a)) for a in arms) > HEATMAP_MAX_LAYERS:
        return plot_expert_given_domain_compact(metrics, arms, path)
    domains = metrics["domains"]
    layers = {a: moe_layer_ids(metrics, a) for a in arms}
    ncol = max(len(v) for v in layers.values())
    panel_w = max(3.6, 0.32 * max_exp + 0.9)  # room for a readable number in every cell
    fig, axes = plt.subplots(len(arms), ncol, figsize=(panel_w * ncol + 0.6, 0.5 + 0.42 * len(domains) * len(arms) + 0.9 * len(arms)),
                             squeeze=False)
    for r, arm in enumerate(arms):
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(layers[arm]):
                ax.axis("off")
                continue
            layer = layers[arm][c]
            spec = metrics["arms"][arm]["layers"][layer]["specialization"]
            mat = np.asarray(spec["expert_given_domain"], dtype=float)
            n_exp = mat.shape[1]
            # each panel scaled to its own maximum: a balanced arm's 0.2s must not look black next
            # to a collapsed arm's 1.0 (the numbers in the cells carry the absolute values)
            im = ax.imshow(mat, cmap="magma", vmin=0, vmax=max(0.05, float(np.nanmax(mat))), aspect="auto")
            for i in range(mat.shape[0]):
                for j in range(n_exp):
                    label = f"{mat[i, j]:.2f}" if n_exp <= 10 else f"{mat[i, j]:.2f}".lstrip("0")
                    ax.text(j, i, label, ha="center", va="center", fontsize=6.5 if n_exp <= 10 else 6,
                            color="white" if mat[i, j] < 0.6 * im.norm.vmax else "black")
            nmi = spec["nmi"]
            ax.set_title(f"{arm} · layer {layer}\nNMI {fmt_interval(nmi)} p={fmt_p(spec['nmi_pvalue'])}", fontsize=8.5)
            ax.set_yticks(range(len(domains)), domains, fontsize=8)
            ax.set_xticks(range(n_exp), [str(j) for j in range(n_exp)], fontsize=7)
            ax.set_xlabel("expert", fontsize=8)
    fig.suptitle(f"P(expert | domain) on held-out data (uniform = {1 / n_exp:.3f})", fontsize=10)
    return _save(fig, path)


def plot_expert_given_domain_compact(metrics: dict, arms: list[str], path: Path) -> Path:
    """P(expert | domain) for 16-256 experts and 16-80 layers: one full-width strip per chosen layer.

    Experts are reordered by their dominant domain (strongest first), with the domain
    groups marked, so a block structure is visible at a glance; no numbers in cells.
    """
    domains = metrics["domains"]
    panels = [(a, lay) for a in arms for lay in heatmap_layers(metrics, a)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11.0, 0.6 + (0.3 * len(domains) + 0.75) * len(panels)),
                             squeeze=False)
    for ax, (arm, layer) in zip(axes[:, 0], panels):
        v = metrics["arms"][arm]["layers"][layer]
        spec = v["specialization"]
        mat = np.asarray(spec["expert_given_domain"], dtype=float)
        parents = v.get("expert_parent")
        if parents:  # fine-grained experts stay beside their siblings, grouped by the expert they were cut from
            order = np.argsort(np.asarray(parents), kind="stable")
            group = np.asarray(parents)[order]
        else:
            order, group = expert_order(mat)
        shown = mat[:, order]
        im = ax.imshow(shown, cmap="magma", vmin=0, vmax=max(0.05, float(np.nanmax(shown))), aspect="auto",
                       interpolation="nearest")
        n_exp = mat.shape[1]
        for g in np.unique(group):
            cols = np.flatnonzero(group == g)
            if cols.size:
                ax.axvline(cols[0] - 0.5, color="white", lw=0.8)
        step = 1 if n_exp <= 64 else 8
        ax.set_xticks(range(0, n_exp, step), [str(e) for e in order[::step]], fontsize=5 if n_exp > 32 else 6,
                      rotation=90)
        ax.set_yticks(range(len(domains)), domains, fontsize=7)
        nmi, first = spec["nmi"], spec.get("nmi_first_choice", spec["nmi"])
        ax.set_title(f"{arm} · layer {layer}: NMI top-{v['top_k']} {fmt_interval(nmi)}, first choice "
                     f"{fmt_interval(first['estimate'])}, p={fmt_p(spec['nmi_pvalue'])}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    grouped_by_parent = any(metrics["arms"][a]["layers"][lay].get("expert_parent") for a, lay in panels)
    axes[-1, 0].set_xlabel("expert (fine-grained arms: grouped by the coarse expert they were sliced from; others: "
                           "grouped by dominant domain, strongest first; white lines separate groups)"
                           if grouped_by_parent else
                           "expert (grouped by dominant domain, strongest first; white lines separate domains)",
                           fontsize=8)
    fig.suptitle(f"P(expert | domain) on held-out data (uniform = {1 / n_exp:.4f}; top-k assignments)", fontsize=10)
    return _save(fig, path)


# (title, getter(layer dict) -> interval-like, reference line getter or None)
LAYER_CURVES = [
    ("NMI(domain; expert)\nsolid: all top-k, dashed: first choice", lambda v: v["specialization"]["nmi"], None),
    ("domain specialization\n(each domain's top expert, OLMoE)",
     lambda v: v["specialization"].get("domain_specialization_top"),
     lambda v: v["specialization"]["domain_specialization_baseline"]),
    ("load CV (0 = balanced)", lambda v: v["load"]["load_cv"], None),
    ("busiest expert's share", lambda v: v["load"]["max_fraction"], lambda v: 1 / v["n_experts"]),
    ("router entropy / ln E", lambda v: {k: (x / v["entropy"]["router_entropy_max"] if x is not None else None)
                                         for k, x in v["entropy"]["router_entropy_token"].items()}, lambda v: 1.0),
]


def plot_layer_curves(arms: dict[str, dict], path: Path) -> Path | None:
    """Per-layer curves (NMI, specialization, load CV, max share, entropy) for any number of layers.

    arms: label -> an arm's metrics (``metrics["arms"][ARM]``); every label is one line
    with its 95% interval as a band. Dotted grey: the uniform-routing reference.
    None when no arm has two MoE layers or more.
    """
    arms = {label: arm for label, arm in arms.items() if len(arm.get("layers") or {}) >= 1}
    if not arms or max(len(a["layers"]) for a in arms.values()) < 2:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13.0, 6.6), squeeze=False)
    flat = axes.ravel()
    for n, (label, arm) in enumerate(arms.items()):
        color = ARM_COLORS[n % len(ARM_COLORS)]
        ids = sorted(arm["layers"], key=int)
        x = np.array([int(i) for i in ids])
        marker = "o" if len(ids) <= 32 else None
        for ax, (title, get, ref) in zip(flat, LAYER_CURVES):
            vals = np.array([interval_values(get(arm["layers"][i])) for i in ids], dtype=float)
            ax.plot(x, vals[:, 0], "-", color=color, marker=marker, ms=3, lw=1.4, label=label)
            if np.isfinite(vals[:, 1:]).any():
                ax.fill_between(x, vals[:, 1], vals[:, 2], color=color, alpha=0.18, lw=0)
            if ref is not None:
                refs = [ref(arm["layers"][i]) for i in ids]
                ax.plot(x, refs, ":", color="grey", lw=1)
            ax.set_title(title, fontsize=9)
        first = np.array([interval_values(arm["layers"][i]["specialization"].get("nmi_first_choice")) for i in ids])
        if arm["layers"][ids[0]].get("top_k", 1) > 1 and np.isfinite(first[:, 0]).any():
            flat[0].plot(x, first[:, 0], "--", color=color, lw=1.2)
            flat[0].fill_between(x, first[:, 1], first[:, 2], color=color, alpha=0.1, lw=0)
    # last panel: vocabulary specialization against its shuffled-token-id null
    ax = flat[5]
    for n, (label, arm) in enumerate(arms.items()):
        color = ARM_COLORS[n % len(ARM_COLORS)]
        ids = sorted(arm["layers"], key=int)
        x = [int(i) for i in ids]
        voc = [arm["layers"][i].get("vocabulary") or {} for i in ids]
        ax.plot(x, [v.get("weighted_mean", math.nan) for v in voc], "-", color=color, lw=1.4,
                marker="o" if len(ids) <= 32 else None, ms=3)
        ax.plot(x, [v.get("baseline_shuffled") if v.get("baseline_shuffled") is not None else math.nan for v in voc],
                ":", color=color, lw=1)
    ax.set_title("vocabulary specialization (OLMoE)\nsolid: observed, dotted: token ids shuffled", fontsize=9)
    for ax in flat:
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=12))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=7, loc="best")
    fig.suptitle("Routing per layer (bands: 95% bootstrap intervals; grey dotted: uniform routing)", fontsize=10)
    return _save(fig, path)


def plot_load_over_training(arm_records: dict[str, list[dict]], arms: list[str], path: Path) -> Path:
    """Share of tokens per expert at every eval, stacked: load balancing vs its absence."""
    layer_ids = sorted({k for a in arms for r in _records(arm_records[a], "eval") for k in r.get("routing", {})}, key=int)
    fig, axes = plt.subplots(len(layer_ids), len(arms), figsize=(4.2 * len(arms), 2.4 * len(layer_ids)),
                             squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab20")
    for c, arm in enumerate(arms):
        ev = _records(arm_records[arm], "eval")
        steps = [r["step"] for r in ev]
        for r_i, layer in enumerate(layer_ids):
            ax = axes[r_i][c]
            fracs = np.array([r["routing"][layer]["token_fraction"] for r in ev if layer in r.get("routing", {})])
            if fracs.size == 0:
                ax.axis("off")
                continue
            ax.stackplot(steps[: len(fracs)], fracs.T, colors=[cmap(j % 20) for j in range(fracs.shape[1])], lw=0)
            cv = ev[-1]["routing"][layer]["load_cv"]
            ax.set_title(f"{arm} · layer {layer} · final load CV {cv:.2f}", fontsize=8.5)
            ax.set_ylim(0, 1)
            ax.set_xlabel("step", fontsize=8)
            if c == 0:
                ax.set_ylabel("token share", fontsize=8)
    fig.suptitle("Expert load over training (each band is one expert; equal bands = balanced)", fontsize=10)
    return _save(fig, path)


def plot_router_entropy(arm_records: dict[str, list[dict]], arms: list[str], path: Path) -> Path:
    """Mean per-token router entropy against its maximum ln E, per arm and layer."""
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    ln_e = None
    styles = ["-", "--", ":", "-."]
    for n, arm in enumerate(arms):
        ev = _records(arm_records[arm], "eval")
        layer_ids = sorted({k for r in ev for k in r.get("routing", {})}, key=int)
        for m, layer in enumerate(layer_ids):
            pts = [(r["step"], r["routing"][layer]["router_entropy_token"]) for r in ev if layer in r["routing"]]
            ln_e = ev[-1]["routing"][layer]["router_entropy_max"]
            ax.plot(*zip(*pts), styles[m % len(styles)], color=ARM_COLORS[n % len(ARM_COLORS)], marker="o", ms=3,
                    label=f"{arm} · layer {layer}")
    if ln_e is not None:
        ax.axhline(ln_e, color="black", lw=1, ls="--", label=f"ln E = {ln_e:.3f} (uniform router)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean router entropy per token (nats)")
    ax.set_title("Router entropy: how decided the routers are")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_token_types(metrics: dict, arm: str, path: Path) -> Path | None:
    """P(expert | Python token type) inside code, one panel per layer."""
    tt = metrics["arms"][arm].get("token_types")
    if not tt:
        return None
    layers = sorted(tt, key=int)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.4 * len(layers), 3.6), squeeze=False)
    for c, layer in enumerate(layers):
        entry = tt[layer]
        mat = np.asarray(entry["expert_given_type"], dtype=float)
        counts = np.asarray(entry["counts"]).sum(axis=1) if np.ndim(entry["counts"]) == 2 else None
        keep = np.where(counts > 0)[0] if counts is not None else np.arange(mat.shape[0])
        names = [entry["type_names"][i] for i in keep]
        ax = axes[0][c]
        ax.imshow(mat[keep], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(mat[keep]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 else "black")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(mat.shape[1]), [str(j) for j in range(mat.shape[1])], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{arm} · layer {layer}", fontsize=9)
    fig.suptitle("Routing of code tokens by Python token type: P(expert | type)", fontsize=10)
    return _save(fig, path)


def plot_saturation(metrics: dict, arms: list[str], path: Path) -> Path | None:
    """Router saturation: overlap of each snapshot's expert choices with the final model's."""
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    drawn = False
    baseline = None
    for n, arm in enumerate(arms):
        sat = metrics["arms"][arm].get("saturation") or {}
        if not sat.get("steps"):
            continue
        baseline = sat.get("baseline")
        for m, (layer, curve) in enumerate(sorted(sat["layers"].items(), key=lambda kv: int(kv[0]))):
            ax.plot(sat["steps"], curve, ["-", "--", ":", "-."][m % 4], marker="o", ms=3,
                    color=ARM_COLORS[n % len(ARM_COLORS)], label=f"{arm} · layer {layer}")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=1, ls="--", label=f"chance {baseline:.3f}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step of snapshot")
    ax.set_ylabel("overlap with final routing")
    ax.set_title("Router saturation (OLMoE): when routing settles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_format_test(metrics: dict, arms: list[str], path: Path) -> Path | None:
    """How far content tokens' routing moves when 'Problem:'/'Solution:' markers are added.

    Per-token divergences are compared with per-token references: two random content
    tokens of the same domain, and of different domains (same scale, unlike a
    divergence between mean distributions).
    """
    bars = []
    for arm in arms:
        ft = metrics["arms"][arm].get("format_test") or {}
        for layer, entry in sorted((ft.get("layers") or {}).items(), key=lambda kv: int(kv[0])):
            js = entry.get("mean_token_js_divergence")
            if isinstance(js, dict):
                ref = entry.get("reference_token_js_divergence") or {}
                bars.append((f"{arm}\nlayer {layer}", *interval_values(js),
                             ref.get("same domain", math.nan), ref.get("different domains", math.nan)))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(bars)), 3.8))
    x = np.arange(len(bars))
    est = np.array([b[1] for b in bars])
    err = np.array([[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]])
    ax.bar(x, est, yerr=err, capsize=4, color="#2f6fab", label="same token, markers added (mean, 95% CI)")
    for col, color, label in ((4, "#444444", "two random tokens, same domain"),
                              (5, "#d62728", "two random tokens, different domains")):
        ref = np.array([b[col] for b in bars], dtype=float)
        if np.isfinite(ref).any():
            ax.scatter(x, ref, color=color, marker="_", s=600, lw=2.5, label=label)
    ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("JS divergence per token (bits)")
    ax.set_title("Format test: does routing follow content or markers?")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_saturation_by_layer(saturation: dict[str, dict[str, float]], reference: str, baseline: float | None,
                             path: Path) -> Path | None:
    """Router saturation against a reference analysis: per layer (left) and averaged over layers (right).

    saturation: label -> {layer: |TopK ∩ TopK_reference| / k}, labels in the order given
    (e.g. checkpoints over training). None when there is nothing to draw.
    """
    labels = [lab for lab, curve in saturation.items() if curve]
    if not labels:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.0), gridspec_kw={"width_ratios": [2, 1]})
    means = []
    for n, label in enumerate(labels):
        layers = sorted(saturation[label], key=int)
        values = [saturation[label][k] for k in layers]
        left.plot([int(k) for k in layers], values, "-", marker="o" if len(layers) <= 32 else None, ms=3,
                  color=ARM_COLORS[n % len(ARM_COLORS)], label=label)
        means.append(float(np.mean(values)))
    right.plot(range(len(labels)), means, "o-", color="#2f6fab")
    right.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    right.set_title("mean over layers", fontsize=9)
    for ax in (left, right):
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls=":", lw=1, label="chance k/E" if ax is left else None)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel(f"top-k overlap with {reference}", fontsize=8)
    left.set_xlabel("layer", fontsize=8)
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=12))
    left.legend(fontsize=7)
    fig.suptitle(f"Router saturation (OLMoE): |TopK ∩ TopK of {reference}| / k on the same tokens", fontsize=10)
    return _save(fig, path)
