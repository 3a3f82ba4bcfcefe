"""`moescope compare OUT1 OUT2 ...`: several analyses side by side on one self-contained page.

Reads OUT/analysis/metrics.json of every analysis (a moescope run or a released model
analysed with `moescope analyze --model`) and, for router saturation, the saved routing
tables OUT/analysis/routing/ARM/LAYER.npz. Writes OUT_DIR/{comparison.html, summary.md,
comparison.json, figures/}. Every MoE arm of every analysis is one entry, labelled by
the analysis directory's name (plus ":ARM" when an analysis holds several MoE arms).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.analysis.compare import TokenKeys, router_saturation_layer, same_tokens
from moescope.errors import MoescopeError, first_line
from moescope.io.atomic import atomic_write_json, atomic_write_text
from moescope.report import figures
from moescope.report.build import moe_arms, read_metrics_file, resampled_units, specialization_sentence
from moescope.report.fmt import fmt_interval, fmt_p
from moescope.report.content import Figure, ReportContent, Section, Table
from moescope.report.html import render_html, render_markdown


@dataclass
class Entry:
    """One MoE arm of one analysis."""

    label: str
    out: Path
    arm: str
    metrics: dict  # metrics["arms"][arm]
    domains: tuple[str, ...] = ()
    units: str = "blocks"  # what the analysis's intervals resampled whole (report.build.resampled_units)


def read_entries(outs: list[Path], labels: list[str] | None = None) -> list[Entry]:
    """Every MoE arm of every analysis, in the order given; clear errors for a missing or empty analysis."""
    if labels is not None and len(labels) != len(outs):
        raise MoescopeError(f"{len(labels)} labels for {len(outs)} analyses")
    entries: list[Entry] = []
    for n, out in enumerate(outs):
        path = out / "analysis" / "metrics.json"
        if not path.is_file():
            raise MoescopeError(f"{path} not found (run `moescope analyze` first)")
        try:
            metrics = read_metrics_file(path)
            arms = moe_arms(metrics)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise MoescopeError(f"{path}: not a moescope metrics file ({exc})") from exc
        if not arms:
            raise MoescopeError(f"{path}: no MoE arm to compare")
        base = labels[n] if labels is not None else out.resolve().name
        for arm in arms:
            entries.append(Entry(base if len(arms) == 1 else f"{base}:{arm}", out, arm, metrics["arms"][arm],
                                 tuple(metrics.get("domains", [])), resampled_units(metrics)))
    seen: set[str] = set()
    for e in entries:
        if e.label in seen:
            raise MoescopeError(f"two analyses are both labelled {e.label!r}; pass --label for each")
        seen.add(e.label)
    return entries


# --------------------------------------------------------------------------- router saturation (I/O + computation)


_SATURATION_COLUMNS = ("block", "position", "token_id", "expert_index")


def read_routing_columns(path: Path, n_experts: int | None = None,
                         n_tokens: int | None = None) -> dict[str, np.ndarray]:
    """The columns saturation needs from OUT/analysis/routing/ARM/LAYER.npz (no pickle, nothing else loaded):
    integer columns of one length (`n_tokens`, the layer's count in metrics.json, when given), expert_index
    [N, k] within 0..n_experts-1; anything else one line naming it."""
    if not path.is_file():
        raise MoescopeError(f"{path} not found: router saturation needs the routing tables that "
                            "`moescope analyze` saves")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [c for c in _SATURATION_COLUMNS if c not in data.files]
            if missing:
                raise MoescopeError(f"{path}: not a routing table (no {', '.join(missing)})")
            cols = {c: np.asarray(data[c]) for c in _SATURATION_COLUMNS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # empty, truncated, not an npz
        raise MoescopeError(f"{path}: not a routing table ({first_line(exc)})") from exc
    if cols["expert_index"].ndim != 2:
        raise MoescopeError(f"{path}: expert_index must be [N, k], got {cols['expert_index'].shape}")
    rows = cols["expert_index"].shape[0]
    for name, col in cols.items():
        if not np.issubdtype(col.dtype, np.integer):
            raise MoescopeError(f"{path}: {name} must hold integers, got {col.dtype}")
        if (col.ndim != 1 and name != "expert_index") or col.shape[0] != rows:
            raise MoescopeError(f"{path}: {name} has shape {col.shape}, but expert_index has {rows} rows")
    if isinstance(n_tokens, int) and rows != n_tokens:  # e.g. a table of another analysis (an older moescope,
        # killed mid-analysis, left new tables beside the previous analysis' metrics.json)
        raise MoescopeError(f"{path}: {rows} tokens, but metrics.json counts {n_tokens} for this layer: the "
                            "table is not of this analysis; run `moescope analyze` again")
    index = cols["expert_index"]
    if index.size and index.min() < 0:
        raise MoescopeError(f"{path}: expert_index {index.min()} is negative")
    if index.size and isinstance(n_experts, int) and index.max() >= n_experts:
        raise MoescopeError(f"{path}: expert_index {index.max()} is outside the layer's {n_experts} experts")
    return cols


def saturation_against(entries: list[Entry], reference: Entry) -> dict[str, dict[str, float]]:
    """label -> {layer: |TopK ∩ TopK_reference| / k} for every entry over the layers it shares with the reference."""
    ref_layers = sorted(reference.metrics["layers"], key=int)
    out: dict[str, dict[str, float]] = {}
    for entry in entries:
        common = [k for k in ref_layers if k in entry.metrics["layers"]]
        if not common:
            raise MoescopeError(f"{entry.label} and {reference.label} share no MoE layer "
                                f"({sorted(entry.metrics['layers'], key=int)} against {ref_layers})")
        curve: dict[str, float] = {}
        for layer in common:
            a_path = entry.out / "analysis" / "routing" / entry.arm / f"{layer}.npz"
            b_path = reference.out / "analysis" / "routing" / reference.arm / f"{layer}.npz"
            (n_a, t_a), (n_b, t_b) = ((e.metrics["layers"][layer].get("n_experts"),
                                       e.metrics["layers"][layer].get("n_tokens")) for e in (entry, reference))
            if n_a != n_b:
                raise MoescopeError(f"{entry.out / 'analysis' / 'metrics.json'}: layer {layer} of {entry.label} has "
                                    f"{n_a} experts, of {reference.label} {n_b}: saturation compares the same experts")
            a, b = read_routing_columns(a_path, n_a, t_a), read_routing_columns(b_path, n_b, t_b)
            if a["expert_index"].shape[1] != b["expert_index"].shape[1]:
                raise MoescopeError(f"{a_path} routes top-{a['expert_index'].shape[1]}, {b_path} top-"
                                    f"{b['expert_index'].shape[1]}: saturation needs the same k")
            keys = [TokenKeys(c["block"], c["position"], c["token_id"]) for c in (a, b)]
            try:
                oa, ob = same_tokens(*keys)
            except ValueError as exc:
                raise MoescopeError(f"{a_path} and {b_path} hold different tokens ({exc}); router saturation "
                                    "needs both analyses run on the same data with the same tokenizer and "
                                    "blocks") from exc
            curve[layer] = router_saturation_layer(a["expert_index"][oa], b["expert_index"][ob])
        out[entry.label] = curve
    return out


# --------------------------------------------------------------------------- page


def _layer_value(entry: Entry, layer: str, get) -> str:
    v = entry.metrics["layers"].get(layer)
    return fmt_interval(get(v)) if v is not None else ""


def summary_table(entries: list[Entry]) -> Table:
    rows = []
    for e in entries:
        layers = e.metrics["layers"]
        best = max(layers, key=lambda k: layers[k]["specialization"]["nmi"]["estimate"])
        v = layers[best]
        cvs = [lv["load"]["load_cv"]["estimate"] for lv in layers.values()]
        ent = [lv["entropy"]["router_entropy_token"]["estimate"] / lv["entropy"]["router_entropy_max"]
               for lv in layers.values()]
        rows.append([e.label, len(layers), v["n_experts"], v.get("top_k", 1), best,
                     fmt_interval(v["specialization"]["nmi"]), fmt_p(v['specialization']['nmi_pvalue']),
                     fmt_interval(v["specialization"].get("nmi_first_choice")),
                     f"{np.mean(cvs):.3f} / {np.max(cvs):.3f}", f"{np.mean(ent):.3f}"])
    return Table("Analyses side by side",
                 ["analysis", "MoE layers", "experts", "top-k", "best layer", "NMI at best layer (95% CI)", "perm. p",
                  "first-choice NMI there", "load CV mean / max", "entropy / ln E (mean)"], rows,
                 "NMI = I(domain; expert) / H(domain), equal domain weights, each of a token's top-k experts counted "
                 "once; first choice: only its top expert. Numbers of different models are comparable only on the "
                 "same domains and texts.")


def per_layer_table(entries: list[Entry]) -> Table:
    layers = sorted({k for e in entries for k in e.metrics["layers"]}, key=int)
    rows = [[layer] + [_layer_value(e, layer, lambda v: v["specialization"]["nmi"]) for e in entries]
            for layer in layers]
    return Table("NMI(domain; expert) per layer (95% CI)", ["layer", *[e.label for e in entries]], rows)


def build_comparison(outs: list[str | Path], out_dir: str | Path, *, labels: list[str] | None = None,
                     saturation: bool = False, reference: str | None = None) -> Path:
    """Write the comparison page of several analyses; returns the path of comparison.html."""
    outs = [Path(o) for o in outs]
    if len(outs) < 2:
        raise MoescopeError("compare needs at least two analyses")
    entries = read_entries(outs, labels)
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    domains = {e.domains for e in entries}
    # Everything that can fail on bad input runs before the first file is written.
    sat, ref, baseline = None, None, None
    if saturation:
        ref = entries[-1] if reference is None else next((e for e in entries if e.label == reference), None)
        if ref is None:
            raise MoescopeError(f"--reference {reference!r} is none of {[e.label for e in entries]}")
        sat = saturation_against([e for e in entries if e is not ref], ref)
        first_layer = next(iter(ref.metrics["layers"].values()))
        baseline = first_layer.get("top_k", 1) / first_layer["n_experts"]
    headline = [specialization_sentence(e.label, e.label, e.metrics["layers"], (),
                                        e.metrics.get("nmi_best_of_layers"), e.units) for e in entries]
    if len(domains) > 1:
        headline.append("The analyses were run on different domains, so their NMI values measure different things.")
    figs = []
    curves = figures.plot_layer_curves({e.label: e.metrics for e in entries}, fig_dir / "layer_curves.png")
    if curves:
        resampled = "; ".join(f"{e.label}: {e.units}" for e in entries)
        figs.append(Figure("Routing per layer", curves,
                           f"One line per analysis; bands: 95% bootstrap intervals over whole units ({resampled})."))
    result: dict = {"analyses": [{"label": e.label, "out": str(e.out), "arm": e.arm} for e in entries]}
    sections = [Section("Side by side", [], figures=figs, tables=[summary_table(entries), per_layer_table(entries)],
                        anchor="side-by-side")]
    if sat is not None:
        result["saturation"] = {"reference": ref.label, "baseline": baseline, "layers": sat}
        path = figures.plot_saturation_by_layer(sat, ref.label, baseline, fig_dir / "saturation.png")
        rows = [[label, len(curve), f"{np.mean(list(curve.values())):.3f}", f"{min(curve.values()):.3f}"]
                for label, curve in sat.items()]
        headline += [f"{label}: router saturation against {ref.label} = {np.mean(list(c.values())):.3f} averaged over "
                     f"{len(c)} layers (chance {baseline:.3f}; 1 = the same top-k experts for every token)."
                     for label, c in sat.items()]
        sections.append(Section(
            "Router saturation", [f"Share of each token's top-k experts that are also among its top-k in {ref.label}, "
                                  f"on the same held-out tokens (checked by block, position and token id)."],
            figures=[Figure("Router saturation", path)] if path else [],
            tables=[Table("Router saturation (mean over tokens)", ["analysis", "layers", "mean over layers",
                                                                    "lowest layer"], rows)],
            anchor="saturation"))
    content = ReportContent(
        title="moescope: analyses compared", subtitle=" · ".join(e.label for e in entries),
        headline=headline, sections=sections, provenance=result)
    fig_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "comparison.json", result)
    atomic_write_text(out_dir / "summary.md", render_markdown(content))
    return atomic_write_text(out_dir / "comparison.html", render_html(content))
