"""Assemble the study's report from a finished, analysed run directory.

Reads RUN/experiment.json, RUN/arms/*/metrics.jsonl, RUN/analysis/metrics.json and
RUN/analysis/viewer.json; writes RUN/report/{report.html, summary.md, figures/}.
The headline sentences are computed from the numbers (including "no significant
specialization" when that is the truth), never written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.report import figures
from moescope.report.content import Figure, ReportContent, Section, Table
from moescope.report.write import write_report

SIGNIFICANCE_LEVEL = 0.01
# Below this NMI a significant dependence is reported as weak: with many tokens a tiny
# effect is "significant" but says little about what experts learned.
STRONG_NMI = 0.1


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MoescopeError(f"{path} not found (run `moescope analyze` on the run first)")
    return json.loads(path.read_text(encoding="utf-8"))


def fmt_interval(iv: Any, digits: int = 3) -> str:
    if isinstance(iv, dict) and "estimate" in iv:
        return f"{iv['estimate']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"
    if isinstance(iv, (int, float)):
        return f"{iv:.{digits}f}"
    return "n/a"


def _estimate(iv: Any) -> float:
    return float(iv["estimate"]) if isinstance(iv, dict) else float(iv)


def moe_arms(metrics: dict) -> list[str]:
    return [a for a, v in metrics["arms"].items() if v.get("kind") == "moe"]


def arm_balancing(experiment: dict, arm: str) -> str | None:
    """How an arm balances its experts, in words: aux loss, selection bias, both or neither."""
    cfg = experiment.get("arms", {}).get(arm, {}).get("config", {})
    if not cfg:
        return None
    loss = cfg.get("loss", {})
    lb, rate = loss.get("lb_coef") or 0.0, loss.get("bias_update_rate") or 0.0
    parts = ([f"load-balancing loss {lb:g}"] if lb else []) + ([f"selection-bias balancing at rate {rate:g}"] if rate else [])
    return " + ".join(parts) if parts else "no load balancing"


# --------------------------------------------------------------------------- headline (pure)


def headline_sentences(metrics: dict, experiment: dict, arm_records: dict[str, list[dict]]) -> list[str]:
    """Plain-language claims, each with its number, interval and test."""
    out: list[str] = []
    arms = metrics["arms"]
    for arm in moe_arms(metrics):
        layers = arms[arm]["layers"]
        best = max(layers, key=lambda k: layers[k]["specialization"]["nmi"]["estimate"])
        spec = layers[best]["specialization"]
        p = spec["nmi_pvalue"]
        nmi = spec["nmi"]
        balancing = arm_balancing(experiment, arm)
        tag = f"{arm}" + (f" ({balancing})" if balancing else "")
        if p < SIGNIFICANCE_LEVEL and nmi["low"] >= STRONG_NMI:
            top = spec["max_expert_given_domain"]
            out.append(
                f"{tag}: experts specialize by domain. Best layer {best}: NMI(domain; expert) = {fmt_interval(nmi)} "
                f"(95% CI), permutation p = {p:.3g}; the largest P(expert | domain) is {fmt_interval(top, 2)} "
                f"against {1 / layers[best]['n_experts']:.3f} for uniform routing."
            )
        elif p < SIGNIFICANCE_LEVEL:
            out.append(
                f"{tag}: routing depends on the domain only weakly: best layer {best} NMI = {fmt_interval(nmi)} "
                f"(permutation p = {p:.3g}: detectable, but below {STRONG_NMI} with its whole interval)."
            )
        else:
            out.append(
                f"{tag}: no significant specialization by domain (best layer {best}: NMI = {fmt_interval(nmi)}, "
                f"permutation p = {p:.3g} >= {SIGNIFICANCE_LEVEL})."
            )
        cvs = {k: layers[k]["load"]["load_cv"] for k in layers}
        worst = max(cvs, key=lambda k: _estimate(cvs[k]))
        maxf = layers[worst]["load"]["max_fraction"]
        events = [r for r in arm_records.get(arm, []) if r.get("kind") == "collapse"]
        balance = "balanced" if _estimate(cvs[worst]) <= 0.3 else "imbalanced"
        sentence = (f"{arm}: load is {balance}: worst layer {worst} has load CV {fmt_interval(cvs[worst], 2)} and its "
                    f"busiest expert takes {fmt_interval(maxf, 2)} of tokens (uniform {1 / layers[worst]['n_experts']:.3f}).")
        if events:
            e = events[0]
            sentence += (f" Collapse detected at step {e['step']} in layer {e['layer']}: expert {e['expert']} held "
                         f"{100 * e['share']:.0f}% of tokens.")
        out.append(sentence)
    losses = {a: v["eval_loss"]["domain_weighted"] for a, v in arms.items() if "eval_loss" in v}
    if losses:
        ordered = sorted(losses, key=lambda a: _estimate(losses[a]))
        parts = ", ".join(f"{a} {fmt_interval(losses[a])}" for a in ordered)
        best, rest = ordered[0], ordered[1:]
        clear = [a for a in rest if losses[a]["low"] > losses[best]["high"]] if isinstance(losses[best], dict) else []
        verdict = (f"{best} is lowest, with non-overlapping intervals against {', '.join(clear)}" if clear
                   else "the intervals overlap, so no arm is clearly better at this budget")
        out.append(f"Held-out loss (nats/token, domain-weighted, 95% CI): {parts}; {verdict}.")
    for arm in moe_arms(metrics):
        ft = arms[arm].get("format_test", {}).get("layers", {})
        vals = {k: v["mean_token_js_divergence"] for k, v in ft.items() if isinstance(v.get("mean_token_js_divergence"), dict)}
        if vals:
            worst = max(vals, key=lambda k: vals[k]["estimate"])
            ref = (ft[worst].get("reference_token_js_divergence") or {}).get("same domain")
            ref_txt = f", against {ref:.3f} bits between two random tokens of the same domain" if ref is not None else ""
            out.append(f"{arm}: adding 'Problem:'/'Solution:' markers moves the routing of the same content tokens by "
                       f"at most {fmt_interval(vals[worst])} bits per token (JS divergence, layer {worst}){ref_txt}.")
            break
    return out


# --------------------------------------------------------------------------- tables (pure)


def loss_table(metrics: dict) -> Table:
    domains = metrics["domains"]
    rows = []
    for arm, v in metrics["arms"].items():
        ev = v.get("eval_loss")
        if not ev:
            continue
        rows.append([arm] + [fmt_interval(ev["domains"].get(d)) for d in domains]
                    + [fmt_interval(ev["token_weighted"]), fmt_interval(ev["domain_weighted"])])
    return Table("Held-out loss per domain (nats/token, 95% block-bootstrap CI)",
                 ["arm", *domains, "token-weighted", "domain-weighted"], rows,
                 "Every arm is evaluated on the same held-out blocks; domain-weighted = mean over domains, so "
                 "unequal domain sizes cannot skew it.")


def routing_table(metrics: dict) -> Table:
    rows = []
    for arm in moe_arms(metrics):
        for layer, v in sorted(metrics["arms"][arm]["layers"].items(), key=lambda kv: int(kv[0])):
            s, ld, en, rep = v["specialization"], v["load"], v["entropy"], v["repetition"]
            rows.append([
                f"{arm} · {layer}", fmt_interval(s["nmi"]), f"{s['nmi_pvalue']:.3g}",
                fmt_interval(s["max_expert_given_domain"], 2), fmt_interval(ld["load_cv"], 2),
                fmt_interval(ld["max_fraction"], 2), fmt_interval(ld["effective_experts"], 2),
                f"{_estimate(en['router_entropy_token']) / en['router_entropy_max']:.3f}",
                (f"{fmt_interval(rep['same_first_choice'], 2)} vs {rep['baseline_uniform']:.3f}"
                 if rep.get("same_first_choice") else "n/a"),
            ])
    return Table("Routing on held-out data, per MoE arm and layer",
                 ["arm · layer", "NMI (95% CI)", "perm. p", "max P(e|d)", "load CV", "max share",
                  "effective experts", "entropy / ln E", "same expert as previous token vs 1/E"], rows,
                 "NMI = I(domain; expert) / H(domain) with equal domain weights; p from shuffling domain labels "
                 "between blocks. Balance is judged from the token shares themselves, not from the aux loss.")


# --------------------------------------------------------------------------- assembly (I/O)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write RUN/report/ from an analysed run; returns the path of report.html."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "analysis" / "metrics.json")
    experiment = _read_json(run_dir / "experiment.json")
    viewer_path = run_dir / "analysis" / "viewer.json"
    viewer = json.loads(viewer_path.read_text(encoding="utf-8")) if viewer_path.is_file() else None
    arm_names = list(metrics["arms"])
    arm_records = {a: read_jsonl(run_dir / "arms" / a / "metrics.jsonl") for a in arm_names}
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    fig_dir = out_dir / "figures"
    moe = moe_arms(metrics)

    sections: list[Section] = []
    manifest_path = run_dir / "data_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    sections.append(Section("Set-up", setup_paragraphs(metrics, experiment, manifest), anchor="setup"))
    sections.append(Section(
        "Loss", ["All arms start from the same dense base and see the same batches in the same order under the same "
                 "schedule; only the arm's own difference changes."],
        figures=[Figure("Loss curves", figures.plot_loss_curves(arm_records, fig_dir / "loss_curves.png"))],
        tables=[loss_table(metrics)], anchor="loss"))
    if moe:
        sections.append(Section(
            "Do experts specialize by domain?", [],
            figures=[Figure("P(expert | domain)", figures.plot_expert_given_domain(metrics, moe, fig_dir / "expert_given_domain.png"),
                            "Rows: domains; columns: experts. Each row sums to 1.")],
            tables=[routing_table(metrics)], anchor="specialization"))
        figs = [Figure("Expert load over training", figures.plot_load_over_training(arm_records, moe, fig_dir / "load_over_training.png"),
                       "With and without load balancing."),
                Figure("Router entropy", figures.plot_router_entropy(arm_records, moe, fig_dir / "router_entropy.png"))]
        sections.append(Section("Load balance and collapse", [], figures=figs, anchor="balance"))
        extra = []
        tt = figures.plot_token_types(metrics, moe[0], fig_dir / "token_types.png")
        if tt:
            extra.append(Figure("Token types in code", tt, "Python tokenize types aligned to model tokens by character offsets."))
        sat = figures.plot_saturation(metrics, moe, fig_dir / "saturation.png")
        if sat:
            extra.append(Figure("Router saturation", sat))
        fmt = figures.plot_format_test(metrics, moe, fig_dir / "format_test.png")
        if fmt:
            extra.append(Figure("Format test", fmt, "Same math/code content with and without fixed markers (seed 002)."))
        if extra:
            sections.append(Section("What the routers key on", [], figures=extra, anchor="keys"))

    cluster_section = clustering_section(run_dir / "cluster")
    if cluster_section is not None:
        sections.append(cluster_section)

    content = ReportContent(
        title="moescope: what do the experts learn?",
        subtitle=f"run {run_dir.name} · arms {', '.join(arm_names)} · {metrics.get('n_eval_blocks', '?')} held-out blocks",
        headline=headline_sentences(metrics, experiment, arm_records),
        sections=sections,
        viewer=viewer if viewer and viewer.get("arms") else None,
        provenance={"experiment": experiment.get("experiment"), "statistics": metrics.get("statistics"),
                    "environment": metrics.get("environment"), "data_manifest_sha256": experiment.get("data_manifest_sha256")},
    )
    return write_report(content, out_dir)


def setup_paragraphs(metrics: dict, experiment: dict, manifest: dict) -> list[str]:
    exp = experiment.get("experiment", {})
    out = []
    splits = manifest.get("splits", {})
    if splits:
        parts = []
        for d in metrics["domains"]:
            tr, ev = splits.get("train", {}).get(d, {}), splits.get("eval", {}).get(d, {})
            parts.append(f"{d}: {tr.get('n_blocks', '?')} train / {ev.get('n_blocks', '?')} held-out blocks")
        out.append(f"Data: {', '.join(parts)} of {metrics.get('block_size')} tokens; split by text before packing, "
                   "with a leakage check on every build.")
    model, moe, train = exp.get("model", {}), exp.get("moe", {}), exp.get("train", {})
    if model:
        out.append(f"Model: GPT-2 with {model.get('n_layers')} layers, d={model.get('d_model')}, "
                   f"{model.get('n_heads')} heads, context {model.get('context_tokens')}. MoE arms: {moe.get('n_experts')} "
                   f"experts in layers {moe.get('layers')}, upcycled from the dense base.")
    if train:
        out.append(f"Each arm: {train.get('steps')} steps of {train.get('batch_sequences')} sequences, seed {train.get('seed')}.")
    diffs = {a: v.get("diff") for a, v in experiment.get("arms", {}).items()}
    if diffs:
        out.append("Arms differ only by: " + "; ".join(f"{a}: {json.dumps(d) if d else 'the dense model'}" for a, d in diffs.items()) + ".")
    return out


def clustering_section(cluster_dir: Path) -> Section | None:
    """Expert pathways from `moescope cluster` (RUN/cluster), when it was run."""
    path = cluster_dir / "cluster_summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    members = summary["members"]
    ks = summary["mdl_optimal_k"]
    paragraphs = [
        f"Components are (layer, expert) pairs; each token's gate weights are its activations. A greedy MDL merge "
        f"groups components that fire together, on {len(members)} disjoint batches of held-out tokens "
        f"({', '.join(f'{m}: k={ks[m]}' for m in members)} at the MDL optimum; token-shuffled null: "
        f"{', '.join(str(v) for v in summary.get('null_mdl_optimal_k', {}).values())})."
    ]
    stab = summary.get("stability", {}).get("perm_invariant_hamming")
    if summary.get("evidence"):  # the cluster summary's own sentence: only numbers measured against the null
        paragraphs.append(summary["evidence"]["sentence"])
    elif stab:
        k = ks[members[0]]
        if k in stab["n_groups"]:
            i = stab["n_groups"].index(k)
            paragraphs.append(
                f"Stability at k={k}: batches disagree on {stab['mean_distance'][i]:.2f} of "
                f"{summary['n_components']} components (permutation-invariant Hamming distance), against "
                f"{stab['null_mean_distance'][i]:.2f} for token-shuffled batches. With top-1 routing in several layers "
                f"the MDL favours some pairing across layers regardless of the data, so the signal is which pairs "
                f"are chosen and how stable they are, not k itself.")
    rows = []
    first = summary["final_clusters"].get(members[0], {})
    for g in first.get("groups", []):
        doms = g.get("domains", {})
        top = max(doms, key=doms.get) if doms else "-"
        rows.append([" + ".join(g["components"]), round(g["token_fraction"], 3), round(g.get("cohesion", 0.0), 3),
                     f"{top} ({doms.get(top, 0):.2f})" if doms else "-"])
    tables = [Table(f"Groups at the MDL optimum ({members[0]})", ["components", "token share", "cohesion", "top domain"],
                    rows)] if rows else []
    if summary.get("alpha_sensitivity"):
        tables.append(Table("Sensitivity to alpha (fraction of components changing group between batches)",
                            ["alpha", "k per batch", "null k", "changed", "null changed", "pathway claim"],
                            [[r["alpha"], ",".join(map(str, r["k"])), ",".join(map(str, r["null_k"])),
                              r["stability_changed_fraction"], r["null_stability_changed_fraction"],
                              "yes" if r["pathway_claim"] else "no"] for r in summary["alpha_sensitivity"]]))
    figs = [Figure(title, cluster_dir / name) for title, name in (
        ("Stability against k", "distance_vs_k.png"), ("Group sizes over merge steps", "cluster_sizes.png"),
        (f"Final groups ({members[0]})", f"final_clusters_{members[0]}.png")) if (cluster_dir / name).is_file()]
    return Section("Expert pathways: clustering by co-activation", paragraphs, figures=figs, tables=tables,
                   anchor="clusters")
