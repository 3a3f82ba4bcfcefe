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

import numpy as np

from moescope.errors import MoescopeError
from moescope.io.config import upgrade_keys
from moescope.io.jsonfile import read_json_object
from moescope.io.names import check_path_name
from moescope.report import figures
from moescope.report.content import Figure, ReportContent, Section, Table
from moescope.report.fmt import fmt_interval, fmt_p, interval_values
from moescope.report.write import write_report

# A permutation p-value below this calls routing dependent on the domain.
SIGNIFICANCE_LEVEL = 0.01
# Below this NMI a significant dependence is reported as weak: with many tokens a tiny
# effect is "significant" but says little about what experts learned.
STRONG_NMI = 0.1
# Load CV (std / mean of the experts' token shares) up to which a layer is called balanced:
# at 0.3 the typical expert is within 30% of the uniform share 1/E. Judged on the interval:
# balanced when its upper end is below, imbalanced when its lower end is above.
BALANCED_LOAD_CV = 0.3
# A paired loss difference gets a direction only when its interval excludes 0 and its sign-flip p is below this.
PAIRED_SIGNIFICANCE = 0.05


# The numbers the report reads from each kind of metrics.jsonl record (dotted paths), and from each
# layer of an eval record's "routing".
RECORD_NUMBERS = {"train": ("step", "ce"), "eval": ("step", "loss.domain_weighted"),
                  "collapse": ("step", "layer", "expert", "share")}
ROUTING_NUMBERS = ("load_cv", "router_entropy_token", "router_entropy_max")


def read_jsonl(path: Path) -> list[dict]:
    """An arm's metrics.jsonl records, each with the fields the report reads of its kind: a damaged line or
    a record of the wrong shape is one error naming file:line, not a traceback in a figure. Read as training
    reads it, so a torn last line (a run still writing) is left out with a warning."""
    from moescope.train.metrics_log import numbered_metrics

    records = []
    for number, record in numbered_metrics(path):
        problem = record_problem(record)
        if problem:
            raise MoescopeError(f"{path}:{number}: {problem}")
        records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: dict) -> str | None:
    """What is wrong with a metrics.jsonl record for the report (None: nothing)."""
    kind = record.get("kind")
    if not isinstance(kind, str):
        return None  # a kind the report does not read
    for name in RECORD_NUMBERS.get(kind, ()):
        value: Any = record
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not _is_number(value):
            return f"{kind} record: {name!r} must be a number, got {json.dumps(value)[:40]}"
    if kind != "eval" or "routing" not in record:
        return None
    routing = record["routing"]
    if not isinstance(routing, dict):
        return "eval record: 'routing' must be an object"
    for layer, entry in routing.items():
        if not layer.isdigit() or not isinstance(entry, dict):
            return f"eval record: routing entry {layer!r} must be a layer number with an object"
        bad = [k for k in ROUTING_NUMBERS if not _is_number(entry.get(k))]
        fractions = entry.get("token_fraction")
        if not isinstance(fractions, list) or not all(_is_number(f) for f in fractions):
            bad.append("token_fraction")
        if "unrouted_fraction" in entry and not _is_number(entry["unrouted_fraction"]):
            bad.append("unrouted_fraction")
        if bad:
            return f"eval record: routing.{layer}.{bad[0]} is missing or not a number"
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MoescopeError(f"{path} not found (run `moescope analyze` on the run first)")
    return read_metrics_file(path)


def read_metrics_file(path: Path) -> dict:
    """An analysis' metrics.json: an object whose arms are named as directories can be (each arm's name is
    joined under the run: arms/NAME/, analysis/routing/NAME/)."""
    metrics = read_json_object(path, {"arms": dict})
    for name in metrics["arms"]:
        check_path_name(name, f"{path}: arm")
    return metrics


def _estimate(iv: Any) -> float:
    return interval_values(iv)[0]  # NaN where there is none (null in JSON)


def moe_arms(metrics: dict) -> list[str]:
    return [a for a, v in metrics["arms"].items() if v.get("kind") == "moe"]


def arm_balancing(experiment: dict, arm: str) -> str | None:
    """How an arm balances its experts, in words: aux loss, selection bias, both or neither."""
    cfg = experiment.get("arms", {}).get(arm, {}).get("config", {})
    if not cfg:
        return None
    loss = upgrade_keys(cfg.get("loss", {}))  # runs written before the renames say load_balance_coef
    lb, rate = loss.get("load_balance_coef") or 0.0, loss.get("bias_update_rate") or 0.0
    parts = ([f"load-balancing loss {lb:g}"] if lb else []) + ([f"selection-bias balancing at rate {rate:g}"] if rate else [])
    return " + ".join(parts) if parts else "no load balancing"


def resampled_units(metrics: dict) -> str:
    """What the intervals and permutation tests of a metrics file moved whole, as a plural noun: the
    statistics header's unit (moescope.data.units); files written before it was recorded resampled blocks."""
    unit = str((metrics.get("statistics") or {}).get("unit") or "")
    # by the description's head noun, so that a reworded description (units.UNIT_*) still reads right
    for head, plural in (("source document", "source documents"), ("held-out text", "held-out texts")):
        if unit.startswith(head):
            return plural
    return "blocks"


def layer_curves_caption(units: str) -> str:
    return (
        f"Per layer, with 95% bootstrap bands (whole {units} resampled). NMI: solid counts all top-k assignments, "
        "dashed only the first choice. Domain specialization: share of a domain's tokens whose top-k includes its "
        "most-used expert, averaged over domains (grey: k/E, uniform routing). Vocabulary specialization: "
        "occurrence-weighted share of a token id's occurrences that include its most-used expert, against the same "
        "with token ids shuffled. Co-activation (in metrics.json) counts every pair within a token's top-k, not "
        "only rank-adjacent pairs.")


def units_sentence(metrics: dict) -> str:
    """How the intervals were made, for the set-up: the unit and how many of them each domain has."""
    stats = metrics.get("statistics") or {}
    units = resampled_units(metrics)
    counts = stats.get("n_units") or {}
    per_domain = f"; {units} per domain: {', '.join(f'{d} {n}' for d, n in counts.items())}" if counts else ""
    if units == "blocks":
        note = f" ({stats['unit_note']})" if stats.get("unit_note") else ""
        return f"Intervals and permutation tests treat every held-out block as independent{note}{per_domain}."
    what = "document" if units == "source documents" else "text"
    return (f"Intervals and permutation tests resample or relabel whole {units} (the {what} of each held-out "
            f"block's first token), so the blocks cut from one {what} move together{per_domain}.")


def _records_of(arm_records: dict[str, list[dict]], arm: str, kind: str) -> list[dict]:
    return [r for r in arm_records.get(arm, []) if r.get("kind") == kind]


# --------------------------------------------------------------------------- headline (pure)


def _low(iv: Any) -> float:
    """An interval's low end; NaN where it has none (no verdict rests on a bare estimate), a plain number itself
    (exact by construction, e.g. expert choice's load)."""
    return interval_values(iv)[1] if isinstance(iv, dict) else _estimate(iv)


def _high(iv: Any) -> float:
    return interval_values(iv)[2] if isinstance(iv, dict) else _estimate(iv)


def _best_layer(layers: dict) -> str:
    """The layer with the highest NMI estimate."""
    return max(layers, key=lambda k: _estimate(layers[k]["specialization"]["nmi"]))


def bonferroni(p: float, n_tests: int) -> float:
    """A p-value corrected for picking the smallest of `n_tests` (the best of n layers): min(1, p n)."""
    corrected = float(p) * max(int(n_tests), 1)
    return corrected if corrected != corrected else min(1.0, corrected)  # NaN (no p) stays NaN


def start_nmi_text(spec: dict, units: str = "blocks") -> str:
    """The layer's NMI at the upcycled start (step-0 snapshot) and what training changed, paired over the
    same resampled `units`; a direction only where the paired interval excludes 0. Empty without a start value."""
    start, change = spec.get("nmi_start"), spec.get("nmi_change")
    if not isinstance(start, dict) or not isinstance(change, dict) or change.get("low") is None:
        return ""
    moved = "increased" if change["low"] > 0 else "decreased" if change["high"] < 0 else "changed"
    covers = ", an interval that covers 0: no change by training is shown" if moved == "changed" else ""
    return (f" At the upcycled start (step {spec.get('nmi_start_step', 0)}, router not yet trained) the NMI was "
            f"{fmt_interval(start)}; training {moved} it by {fmt_interval(change, signed=True)} (paired over the same "
            f"resampled {units}){covers}.")


def _collapses(records: list[dict], layer: str) -> list[dict]:
    return [r for r in records if r.get("kind") == "collapse" and str(r.get("layer")) == layer]


def min_effective_experts(layer: dict) -> float:
    """Effective experts a layer must use before its experts are said to specialize: one more than the
    top-k every token takes (k experts are the floor even for a collapsed router), but never more than
    perfect per-domain routing can show: k x exp(entropy of the domains' token shares)."""
    k = int(layer.get("top_k", 1) or 1)
    spec = layer.get("specialization", {})
    share = np.asarray(spec.get("domain_given_expert", []), dtype=float)
    used = np.asarray(layer.get("load", {}).get("token_fraction", []), dtype=float)
    if share.ndim == 2 and share.shape[1] == used.size and used.size:
        p_d = share @ used
        p_d = p_d[p_d > 0] / p_d.sum()
        return float(min(k + 1, k * np.exp(-(p_d * np.log(p_d)).sum())))
    return float(k + 1)


def specialization_sentence(arm: str, tag: str, layers: dict, records: list[dict] | tuple = (),
                            best_of_layers: dict | None = None, units: str = "blocks") -> str:
    """The domain-specialization verdict of one arm: best layer, NMI with CI, p-value of the best of the
    layers (max-over-layers permutation test when the metrics carry it, else Bonferroni) and the
    permutation null, how many effective experts carry the routing, and the NMI at the upcycled start when
    the arm saved one. units: what the intervals and shuffles moved whole (:func:`resampled_units`). "Experts specialize" needs a strong, significant dependence carried by more experts
    than top-k alone forces (min_effective_experts) in a layer that did not collapse."""
    best = _best_layer(layers)
    n_layers = len(layers)
    spec = layers[best]["specialization"]
    p_layer, nmi = interval_values(spec["nmi_pvalue"])[0], spec["nmi"]  # None (undefined) reads as NaN: no claim
    where = f"best of {n_layers} layers, layer {best}" if n_layers > 1 else f"layer {best}"
    family = best_of_layers if best_of_layers and str(best_of_layers.get("layer")) == best else None
    if n_layers == 1:
        p, p_txt = p_layer, f"permutation p = {fmt_p(p_layer)}"
    elif family is not None:
        p = interval_values(family["pvalue"])[0]
        p_txt = (f"permutation p = {fmt_p(p_layer)}, {fmt_p(p)} against the largest NMI of the {n_layers} layers under "
                 f"the same shuffles")
    else:
        p = bonferroni(p_layer, n_layers)
        p_txt = f"permutation p = {fmt_p(p_layer)}, {fmt_p(p)} after Bonferroni over the {n_layers} layers"
    null = spec.get("nmi_permutation") or {}
    null_txt = (f"; with domain labels shuffled between {units}, 95% of {null['n_permutations']} permutations "
                f"stay at or below {null['null_q95']:.3f}" if null.get("null_q95") is not None else "")
    k = layers[best].get("top_k", 1)
    n_exp = layers[best]["n_experts"]
    first = spec.get("nmi_first_choice")
    first_txt = (f" Counting only each token's first choice: NMI = {fmt_interval(first)}, "
                 f"p = {spec.get('nmi_first_choice_pvalue', float('nan')):.3g}."
                 if k > 1 and isinstance(first, dict) else "")
    start_txt = start_nmi_text(spec, units)
    nmi_name = f"NMI(domain; expert){' over all top-' + str(k) + ' assignments' if k > 1 else ''}"
    eff = layers[best].get("load", {}).get("effective_experts")
    eff_txt = (f"{fmt_interval(eff, 2)} effective experts of {n_exp} (exp of the load entropy) carry the routing"
               if eff is not None else "")
    if p < SIGNIFICANCE_LEVEL and interval_values(nmi)[1] >= STRONG_NMI:
        top = spec["max_expert_given_domain"]
        numbers = (f"{where}: {nmi_name} = {fmt_interval(nmi)} (95% CI), {p_txt}{null_txt}; the largest "
                   f"P(expert | domain) is {fmt_interval(top, 2)} against {1 / n_exp:.3f} for uniform routing")
        problems = []
        if eff is not None and _high(eff) < min_effective_experts(layers[best]):  # its whole interval below
            problems.append(f"only {eff_txt}")
        for e in _collapses(list(records), best)[:1]:
            problems.append(f"collapse was detected in layer {best} during training (step {e['step']}: expert "
                            f"{e['expert']} held {100 * e['share']:.0f}% of tokens)")
        if problems:
            return (f"{tag}: routing depends on the domain, but {' and '.join(problems)}, so the experts are not "
                    f"said to specialize. {numbers[0].upper() + numbers[1:]}.{start_txt}{first_txt}")
        return (f"{tag}: experts specialize by domain. {numbers[0].upper() + numbers[1:]}"
                f"{'; ' + eff_txt if eff_txt else ''}.{start_txt}{first_txt}")
    if p < SIGNIFICANCE_LEVEL:
        return (f"{tag}: routing depends on the domain only weakly: {where} {nmi_name} = {fmt_interval(nmi)} "
                f"({p_txt}{null_txt}: detectable, but not above {STRONG_NMI} with its whole "
                f"interval).{start_txt}{first_txt}")
    n_perm = null.get("n_permutations")
    bonferroni_floor = n_layers > 1 and family is None
    floor = (n_layers if bonferroni_floor else 1) / (1 + n_perm) if n_perm else 0.0
    floor_txt = ((f"; with {n_perm} permutations p cannot go below {1 / (1 + n_perm):.3g}"
                  + (f", {floor:.3g} after Bonferroni over {n_layers} layers" if bonferroni_floor else "")
                  + ", so this test cannot show significance: rerun with more permutations")
                 if floor >= SIGNIFICANCE_LEVEL else "")
    return (f"{tag}: no significant specialization by domain ({where}: {nmi_name} = {fmt_interval(nmi)}, "
            f"{p_txt} >= {SIGNIFICANCE_LEVEL}{null_txt}{floor_txt}).{start_txt}{first_txt}")


def load_sentence(arm: str, layers: dict, records: list[dict]) -> str:
    """The load verdict of one arm: its worst layer's load CV and busiest expert, against uniform routing."""
    cvs = {k: layers[k]["load"]["load_cv"] for k in layers}
    worst = max(cvs, key=lambda k: _estimate(cvs[k]))
    cv = cvs[worst]
    if _high(cv) <= BALANCED_LOAD_CV:
        balance = "balanced"
    elif _low(cv) > BALANCED_LOAD_CV:
        balance = "imbalanced"
    else:
        balance = "near the balance threshold"
    maxf = layers[worst]["load"]["max_fraction"]
    k = layers[worst].get("top_k", 1)
    share = "assignments" if k > 1 else "tokens"
    n_shared = layers[worst].get("n_shared_experts", 0)
    shared_txt = (f" Besides its {layers[worst]['n_experts']} routed experts the layer has {n_shared} shared "
                  f"expert(s) that every token uses; they are not counted in load or NMI." if n_shared else "")
    sentence = (f"{arm}: load is {balance} (load CV threshold {BALANCED_LOAD_CV}; 0 = perfectly balanced): "
                f"worst layer {worst} has load CV {fmt_interval(cv, 2)} and its busiest expert takes "
                f"{fmt_interval(maxf, 2)} of {share} (uniform {1 / layers[worst]['n_experts']:.3f}).{shared_txt}")
    if "unrouted_fraction" in layers[worst]["load"]:
        # expert choice: each expert takes exactly its capacity per forward pass, so there is no load to judge
        taken = layers[worst]["load"].get("tokens_per_expert")
        taken_txt = (f"; layer {worst}: {min(taken)}" + (f" to {max(taken)}" if max(taken) != min(taken) else "")
                     + f" held-out tokens per expert, load CV {fmt_interval(cv, 2)}" if taken else "")
        sentence = (f"{arm}: load is balanced by construction (expert choice: every expert takes the same number "
                    f"of tokens per forward pass{taken_txt}).")
    events = [r for r in records if r.get("kind") == "collapse"]
    if events:
        e = events[0]
        sentence += (f" Collapse detected at step {e['step']} in layer {e['layer']}: expert {e['expert']} held "
                     f"{100 * e['share']:.0f}% of tokens.")
    return sentence


def _percent(iv: Any) -> str:
    estimate, low, high = interval_values(iv)
    if np.isfinite(low) and np.isfinite(high):
        return f"{100 * estimate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{100 * estimate:.1f}%"


def batching_note(batch_order: str | None) -> str:
    """How the held-out batches of an expert-choice arm were composed, and what that does to its NMI
    (arms.ARM.batch_order; older metrics without it were captured domain by domain)."""
    if batch_order == "mixed":
        return ("in held-out batches that mix the domains evenly (batch_order = mixed), as training's batches do: "
                "an expert picks from every domain's tokens at once, so its NMI can show a domain preference, "
                "and its loss is measured in batches composed like training's")
    return ("in held-out batches taken domain by domain, where every expert takes the same share of every domain, "
            "so it cannot show a domain preference")


def unrouted_sentence(arm: str, layers: dict, records: list[dict], batch_order: str | None = None) -> str | None:
    """Expert choice: per layer, the share of held-out tokens that no expert took (None for token choice)."""
    shares = {k: v["load"]["unrouted_fraction"] for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))
              if "unrouted_fraction" in v.get("load", {})}
    if not shares:
        return None
    parts = [f"layer {k} {_percent(iv)}" for k, iv in shares.items()]
    sentence = (f"{arm} (expert choice: experts pick tokens): share of held-out tokens that no expert took, "
                f"{', '.join(parts)} (95% CI); those pass through the residual only (hatched in the token viewer). "
                f"Its NMI counts every (token, expert) pair the experts chose {batching_note(batch_order)}.")
    evals = _records_of({arm: records}, arm, "eval")
    last = evals[-1].get("routing", {}) if evals else {}
    trained = {k: last[k]["unrouted_fraction"] for k in shares if "unrouted_fraction" in last.get(k, {})}
    if trained:
        # evaluations of runs from before batch orders have no "batch_order": they went domain by domain
        order = evals[-1].get("batch_order", "by_domain")
        sentence += (f" At the last training evaluation (step {evals[-1].get('step')}, {order} batches): "
                     + ", ".join(f"layer {k} {100 * v:.1f}%" for k, v in trained.items()) + ".")
    return sentence


def headline_sentences(metrics: dict, experiment: dict, arm_records: dict[str, list[dict]]) -> list[str]:
    """Plain-language claims, each with its number, interval and test or null."""
    out: list[str] = []
    arms = metrics["arms"]
    for arm in moe_arms(metrics):
        layers = arms[arm]["layers"]
        balancing = arm_balancing(experiment, arm)
        tag = f"{arm}" + (f" ({balancing})" if balancing else "")
        out.append(specialization_sentence(arm, tag, layers, arm_records.get(arm, []),
                                           arms[arm].get("nmi_best_of_layers"), resampled_units(metrics)))
        out.append(load_sentence(arm, layers, arm_records.get(arm, [])))
        unrouted = unrouted_sentence(arm, layers, arm_records.get(arm, []), arms[arm].get("batch_order"))
        if unrouted:
            out.append(unrouted)
    losses = {a: v["eval_loss"]["domain_weighted"] for a, v in arms.items() if "eval_loss" in v}
    if len(losses) == 1:
        (arm, loss), = losses.items()
        out.append(f"Held-out loss of {arm} (nats/token, domain-weighted, 95% CI): {fmt_interval(loss)}.")
    elif losses:
        ordered = sorted(losses, key=lambda a: _estimate(losses[a]))
        parts = ", ".join(f"{a} {fmt_interval(losses[a])}" for a in ordered)
        best, rest = ordered[0], ordered[1:]
        clear = [a for a in rest if interval_values(losses[a])[1] > interval_values(losses[best])[2]]
        paired = any("eval_loss_vs_dense" in v for v in arms.values())
        verdict = (f"{best} is lowest, with non-overlapping intervals against {', '.join(clear)}" if clear
                   else "these unpaired intervals overlap; the paired differences over the same blocks below "
                        "are the test" if paired
                   else "the intervals overlap, so no arm is clearly better at this budget")
        out.append(f"Held-out loss (nats/token, domain-weighted, 95% CI): {parts}; {verdict}.")
    for arm in moe_arms(metrics):
        ft = arms[arm].get("format_test", {}).get("layers", {})
        vals = {k: v["mean_token_js_divergence"] for k, v in ft.items() if isinstance(v.get("mean_token_js_divergence"), dict)}
        if vals:
            out.append(format_test_sentence(arm, ft, vals))
            break
    return out


def format_test_sentence(arm: str, ft: dict, vals: dict) -> str:
    """The format test's claim: the layer where the markers move routing most, its mean JS divergence with
    its interval (not a bound: the interval reaches above it), the same-domain scale, and the share of
    content tokens whose first-choice expert changes."""
    worst = max(vals, key=lambda k: vals[k]["estimate"])
    ref = (ft[worst].get("reference_token_js_divergence") or {}).get("same domain")
    ref_txt = f", against {ref:.3f} bits between two random tokens of the same domain" if ref is not None else ""
    which = f"layer {worst}, the largest of {len(vals)} layers" if len(vals) > 1 else f"layer {worst}"
    changed = ft[worst].get("top1_changed_fraction")
    changed_txt = (f", and changes the first-choice expert of {_percent(changed)} of those tokens"
                   if isinstance(changed, dict) else "")
    return (f"{arm}: adding 'Problem:'/'Solution:' markers moves the routing of the same content tokens by "
            f"{fmt_interval(vals[worst])} bits per token (mean JS divergence, 95% CI; {which}){ref_txt}{changed_txt}.")


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
    mixed = [arm for arm, v in metrics["arms"].items() if v.get("batch_order") == "mixed"]
    caption = ("Every arm is evaluated on the same held-out blocks; domain-weighted = mean over domains, so "
               "unequal domain sizes cannot skew it.")
    if mixed:
        caption += (f" {', '.join(mixed)}: forwarded in batches that mix the domains evenly (batch_order = mixed), "
                    "because an expert-choice layer picks tokens from the whole batch; the others domain by domain.")
    return Table(f"Held-out loss per domain (nats/token, 95% CI, bootstrap over {resampled_units(metrics)})",
                 ["arm", *domains, "token-weighted", "domain-weighted"], rows, caption)


def _repetition_cell(rep: dict) -> str:
    """Consecutive tokens on one expert against chance: over the experts' own assignments for expert choice
    (some expert took both), else the first choices against 1/E."""
    if rep.get("shared_assignment"):
        return f"{fmt_interval(rep['shared_assignment'], 2)} vs {rep['shared_assignment_baseline']:.3f} (shared)"
    if rep.get("same_first_choice"):
        return f"{fmt_interval(rep['same_first_choice'], 2)} vs {rep['baseline_uniform']:.3f}"
    return "n/a"


def routing_table(metrics: dict) -> Table:
    """One row per MoE arm and layer; top-k models get the first-choice NMI and OLMoE specialization too."""
    arms = moe_arms(metrics)
    topk = any(v.get("top_k", 1) > 1 for a in arms for v in metrics["arms"][a]["layers"].values())
    rows = []
    for arm in arms:
        for layer, v in sorted(metrics["arms"][arm]["layers"].items(), key=lambda kv: int(kv[0])):
            s, ld, en, rep = v["specialization"], v["load"], v["entropy"], v["repetition"]
            row = [f"{arm} · {layer}", fmt_interval(s["nmi"]), fmt_p(s['nmi_pvalue'])]
            if topk:
                row += [fmt_interval(s.get("nmi_first_choice")),
                        f"{fmt_interval(s.get('domain_specialization_top'), 2)} vs {s['domain_specialization_baseline']:.3f}"]
            rows.append(row + [
                fmt_interval(s["max_expert_given_domain"], 2), fmt_interval(ld["load_cv"], 2),
                fmt_interval(ld["max_fraction"], 2), fmt_interval(ld["effective_experts"], 2),
                f"{_estimate(en['router_entropy_token']) / en['router_entropy_max']:.3f}",
                _repetition_cell(rep),
            ])
    shared = any(v.get("n_shared_experts") for a in arms for v in metrics["arms"][a]["layers"].values())
    if shared:
        for row, (arm, layer) in zip(rows, [(a, k) for a in arms for k in sorted(metrics["arms"][a]["layers"], key=int)]):
            row.append(metrics["arms"][arm]["layers"][layer].get("n_shared_experts", 0))
    unrouted = any("unrouted_fraction" in v["load"] for a in arms for v in metrics["arms"][a]["layers"].values())
    if unrouted:
        for row, (arm, layer) in zip(rows, [(a, k) for a in arms for k in sorted(metrics["arms"][a]["layers"], key=int)]):
            iv = metrics["arms"][arm]["layers"][layer]["load"].get("unrouted_fraction")
            row.append(fmt_interval(iv, 3) if iv is not None else "-")
    columns = ["arm · layer", "NMI (95% CI)", "perm. p"]
    if topk:
        columns += ["NMI first choice", "domain specialization vs k/E"]
    columns += ["max P(e|d)", "load CV", "max share", "effective experts", "entropy / ln E",
                "same expert as previous token vs " + ("chance" if unrouted else "1/E")] \
        + (["shared experts (not counted)"] if shared else []) \
        + (["unrouted share (expert choice)"] if unrouted else [])
    units = resampled_units(metrics)
    caption = (f"NMI = I(domain; expert) / H(domain) with equal domain weights; p from shuffling domain labels "
               f"between {units}. Balance is judged from the token shares themselves, not from the aux loss. "
               f"Intervals are percentile bootstrap intervals over {units} of the plug-in NMI, which is biased "
               f"upward when experts are many and {units} few (resampled {units} repeat): the interval can then lie "
               f"above the estimate. The permutation null carries the same bias, so judge NMI against it.")
    if topk:
        caption += (" With top-k routing, NMI counts each of a token's k experts once; 'first choice' counts only "
                    "the expert with the largest gate. Domain specialization (OLMoE): the share of a domain's tokens "
                    "that have its most-used expert among their top-k, averaged over domains.")
    if unrouted:
        caption += (" Expert choice: experts pick tokens, so a token is taken by 0..E experts; the unrouted share "
                    "counts tokens no expert took (they pass through the residual only). NMI, P(expert | domain) and "
                    "load count every (token, expert) assignment the experts made: a token taken by two experts "
                    "counts once for each, an unrouted token in no expert. 'Same expert as previous token' is, for "
                    "expert choice, the share of consecutive token pairs that one expert took both of (marked "
                    "'shared'), against the chance 1 - prod_e (1 - q_e^2) for two independent tokens when expert e "
                    "takes a q_e share of all tokens.")
        orders = {metrics["arms"][a].get("batch_order", "by_domain") for a in arms
                  if any("unrouted_fraction" in v["load"] for v in metrics["arms"][a]["layers"].values())}
        if "mixed" in orders:
            caption += (" An expert picks its tokens from the whole forward pass, so the analysis forwards "
                        "expert-choice arms' held-out blocks in batches that mix the domains evenly "
                        "(batch_order = mixed; the blocks and their pairing with other arms are unchanged).")
        if orders - {"mixed"}:
            caption += (" Blocks forwarded domain by domain (batch_order = by_domain) give, within nearly every "
                        "forward pass, each expert its fixed share of one domain's tokens: every domain gives every "
                        "expert about the same count, and an expert-choice NMI near 0 is set by that batching, "
                        "not by the router.")
    return Table("Routing on held-out data, per MoE arm and layer", columns, rows, caption)


def expert_token_tables(metrics: dict, per_expert: int = 5) -> list[Table]:
    """Per MoE arm, its best-NMI layer: every expert's share of the tokens, its main domain, and the
    token ids it takes the largest share of (an id's share is at chance when it equals the expert's)."""
    tables = []
    for arm in moe_arms(metrics):
        layers = metrics["arms"][arm]["layers"]
        layer = _best_layer(layers)
        v = layers[layer]
        by_expert = v.get("vocabulary", {}).get("by_expert")
        if not by_expert:
            continue
        share = v["load"]["token_fraction"]
        dge = v["specialization"].get("domain_given_expert")  # [domains][experts]
        domains = v.get("domains", [])
        rows = []
        for e in sorted(range(len(by_expert)), key=lambda e: -share[e]):
            main = ""
            if dge is not None and domains:  # an unused expert's column is NaN, or null in JSON
                col = [x if isinstance(x, (int, float)) and x == x else -1.0 for x in (dge[d][e] for d in range(len(domains)))]
                d = max(range(len(col)), key=col.__getitem__)
                main = f"{domains[d]} {col[d]:.0%}" if col[d] >= 0 else "-"
            tokens = ", ".join(f"{t.get('token', t['token_id'])!r} {t['count'] / t['occurrences']:.0%} "
                               f"({t['count']}/{t['occurrences']})" for t in by_expert[e][:per_expert])
            rows.append([e, f"{share[e]:.1%}", main, tokens or "-"])
        min_count = v["vocabulary"].get("min_count")
        tables.append(Table(
            f"{arm} · layer {layer}: what each expert takes", ["expert", "share of tokens", "main domain", "tokens it takes most of"],
            rows, f"Experts by load. For each token id seen at least {min_count} times: the share of its occurrences "
                  "routed to the expert (among its top-k), then count / occurrences. Routing blind to the id would "
                  "give each id about the expert's share of tokens. Main domain: P(domain | expert)."))
    return tables


def paired_verdict(arm: str, reference: str, iv: dict, p: float) -> str:
    """A direction ("above"/"below") only when the paired interval excludes 0 AND the sign-flip test rejects
    "no difference" at PAIRED_SIGNIFICANCE. Both read the same statistic (the mean over domains of each
    domain's per-token difference) but ask different questions: the interval resamples units (source
    documents, or blocks) around the estimate, the sign flips test units' differences symmetric about 0,
    which opposite per-domain effects make wide; a claim needs both."""
    excludes = _low(iv) > 0 or _high(iv) < 0
    if excludes and p < PAIRED_SIGNIFICANCE:
        return f"{arm} is {'above' if _low(iv) > 0 else 'below'} {reference}"
    if excludes:
        return (f"the arms are not separated: the interval excludes 0, but the sign-flip test does not reject "
                f"'no difference' (p >= {PAIRED_SIGNIFICANCE})")
    if p < PAIRED_SIGNIFICANCE:
        return (f"the arms are not separated: the sign-flip p is below {PAIRED_SIGNIFICANCE}, but the paired "
                f"interval covers 0")
    return f"the paired interval covers 0, so this budget does not separate {arm} from {reference}"


def paired_loss_sentences(metrics: dict) -> list[str]:
    """One claim per non-dense arm: its held-out loss minus dense's, paired over the same blocks."""
    out = []
    for arm, v in metrics["arms"].items():
        diff = v.get("eval_loss_vs_dense")
        if not diff:
            continue
        iv, p = diff["domain_weighted"], diff["pvalue"]
        verdict = paired_verdict(arm, diff["reference"], iv, p)
        grouped = (f" ({diff['n_units']} {resampled_units(metrics)})"
                   if diff.get("n_units") not in (None, diff["n_blocks"]) else "")
        out.append(f"{arm} - {diff['reference']} held-out loss, paired over the same {diff['n_blocks']} blocks"
                   f"{grouped}: "
                   f"{fmt_interval(iv, 4, signed=True)} nats/token (95% CI, sign-flip "
                   f"p = {p:.3g}): {verdict}.")
    return out


def paired_loss_table(metrics: dict) -> list[Table]:
    """Per-domain paired differences (arm - dense); empty when the run has no dense arm."""
    domains = metrics["domains"]
    rows = []
    for arm, v in metrics["arms"].items():
        diff = v.get("eval_loss_vs_dense")
        if diff:
            rows.append([f"{arm} - {diff['reference']}"] + [fmt_interval(diff["domains"].get(d), 4) for d in domains]
                        + [fmt_interval(diff["domain_weighted"], 4), fmt_p(diff['pvalue'])])
    if not rows:
        return []
    units = resampled_units(metrics)
    return [Table("Held-out loss difference to dense, paired over the same blocks (nats/token, 95% CI)",
                  ["arms", *domains, "domain-weighted", "sign-flip p"], rows,
                  f"Whole {units} are resampled within their domain and the same {units} are taken for both arms, "
                  f"so the spread between {units} that both arms share cancels; p from flipping the sign of whole "
                  f"{units}' differences (two-sided).")]


def seeds_section(run_dir: Path) -> Section | None:
    """The study over several seeds (`moescope demo --seeds N` writes RUN/analysis/seeds.json)."""
    path = run_dir / "analysis" / "seeds.json"
    if not path.is_file():
        return None
    seeds = read_json_object(path, {"caption": str, "title": str, "columns": list, "rows": list})
    return Section("Over seeds", [seeds["caption"]],
                   tables=[Table(seeds["title"], seeds["columns"], seeds["rows"])], anchor="seeds")


# --------------------------------------------------------------------------- assembly (I/O)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write RUN/report/ from an analysed run; returns the path of report.html."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "analysis" / "metrics.json")
    # Released models analysed with `moescope analyze --model` have no training run: no experiment.json.
    experiment_path = run_dir / "experiment.json"
    experiment = read_json_object(experiment_path) if experiment_path.is_file() else {}
    viewer_path = run_dir / "analysis" / "viewer.json"
    viewer = read_json_object(viewer_path) if viewer_path.is_file() else None
    arm_names = list(metrics["arms"])
    arm_records = {a: read_jsonl(run_dir / "arms" / a / "metrics.jsonl") for a in arm_names}
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    fig_dir = out_dir / "figures"
    moe = moe_arms(metrics)

    sections: list[Section] = []
    manifest_path = run_dir / "data_manifest.json"
    manifest = read_json_object(manifest_path) if manifest_path.is_file() else {}
    sections.append(Section("Set-up", setup_paragraphs(metrics, experiment, manifest), anchor="setup"))
    trained = any(r.get("kind") in ("train", "eval") for recs in arm_records.values() for r in recs)
    if trained or any("eval_loss" in v for v in metrics["arms"].values()):
        sections.append(Section(
            "Loss", ["All arms start from the same dense base and see the same batches in the same order under the same "
                     "schedule; only the arm's own difference changes."] if trained else [],
            figures=[Figure("Loss curves", figures.plot_loss_curves(arm_records, fig_dir / "loss_curves.png"))]
            if trained else [],
            tables=[loss_table(metrics), *paired_loss_table(metrics)], anchor="loss"))
    seeds = seeds_section(run_dir)
    if seeds is not None:
        sections.append(seeds)
    if moe:
        spec_figs = [Figure("P(expert | domain)", figures.plot_expert_given_domain(metrics, moe, fig_dir / "expert_given_domain.png"),
                            "Rows: domains; columns: experts. Each row sums to 1.")]
        curves = figures.plot_layer_curves({a: metrics["arms"][a] for a in moe}, fig_dir / "layer_curves.png")
        if curves:
            spec_figs.append(Figure("Routing per layer", curves, layer_curves_caption(resampled_units(metrics))))
        sections.append(Section(
            "Do experts specialize by domain?", [],
            figures=spec_figs, tables=[routing_table(metrics)], anchor="specialization"))
        token_tables = expert_token_tables(metrics)
        if token_tables:
            sections.append(Section("What each expert takes", [], tables=token_tables, anchor="experts"))
        if any(_records_of(arm_records, a, "eval") for a in moe):
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
            caption = "Share of the final model's expert choices each snapshot already makes (top-k overlap, OLMoE)."
            ec_arms = [a for a in moe if metrics["arms"][a].get("saturation", {}).get("counts") == "assignments"]
            if ec_arms:
                caption += (f" {', '.join(ec_arms)} (expert choice): the share of the final model's (token, expert) "
                            "assignments the snapshot also made, whose chance level is the experts' token shares, "
                            "not k/E.")
            extra.append(Figure("Router saturation", sat, caption))
        fmt = figures.plot_format_test(metrics, moe, fig_dir / "format_test.png")
        if fmt:
            extra.append(Figure("Format test", fmt, "Same math/code content with and without fixed 'Problem:'/'Solution:' markers."))
        if extra:
            sections.append(Section("What the routers key on", [], figures=extra, anchor="keys"))

    cluster_section = clustering_section(run_dir / "cluster")
    if cluster_section is not None:
        sections.append(cluster_section)

    content = ReportContent(
        title="moescope: what do the experts learn?",
        subtitle=f"run {run_dir.name} · arms {', '.join(arm_names)} · {metrics.get('n_eval_blocks', '?')} held-out blocks",
        headline=headline_sentences(metrics, experiment, arm_records) + paired_loss_sentences(metrics),
        sections=sections,
        viewer=viewer if viewer and viewer.get("arms") else None,
        provenance={"experiment": experiment.get("experiment"), "statistics": metrics.get("statistics"),
                    "environment": metrics.get("environment"), "data_manifest_sha256": experiment.get("data_manifest_sha256")},
    )
    return write_report(content, out_dir)


def released_setup_paragraphs(metrics: dict, info: dict) -> list[str]:
    """Set-up of a released model analysed with `moescope analyze --model` (no training run)."""
    shared = (f", {info['n_shared_experts']} shared expert(s) always on, not counted as routed"
              if info.get("n_shared_experts") else "")
    kind = info.get("router_scores", "softmax")
    scores = "softmax of the router logits" if kind == "softmax" else f"normalized {kind} scores of the router logits"
    return [
        f"Model: {info['source']} ({info['architecture']}, {info['n_layers']} layers, MoE in layers "
        f"{', '.join(map(str, info['moe_layers']))}: {info['n_experts']} routed experts, top-{info['top_k']}{shared}), "
        f"{info['dtype']} on {info['device']}.",
        f"Routing read by the {info['adapter']!r} adapter: {info['selection']}. Router entropy is that of the {scores}.",
        f"Held-out texts: {metrics['n_eval_blocks']} blocks of {metrics['block_size']} tokens of the model's own "
        f"tokenizer over {', '.join(metrics['domains'])}.",
        units_sentence(metrics),
    ]


def moe_arm_shapes(metrics: dict) -> str:
    """Each MoE arm's routed experts as analysed (first MoE layer): count, width, top-k and shared experts,
    e.g. "moe 16 experts, top-1; moe-fine 64 experts of 1/4 width, top-4". Empty without MoE arms."""
    parts = []
    for arm, v in metrics.get("arms", {}).items():
        layers = v.get("layers") or {}
        if v.get("kind") != "moe" or not layers:
            continue
        info = layers[min(layers, key=int)]
        m = int(info.get("expert_granularity", 1) or 1)
        choice = "expert choice" if info.get("routing") == "expert_choice" else f"top-{info['top_k']}"
        text = f"{arm} {info['n_experts']} experts" + (f" of 1/{m} width" if m > 1 else "") + f", {choice}"
        if info.get("n_shared_experts"):
            text += f" + {info['n_shared_experts']} shared"
        parts.append(text)
    return "; ".join(parts)


def setup_paragraphs(metrics: dict, experiment: dict, manifest: dict) -> list[str]:
    exp = experiment.get("experiment", {})
    if "released_model" in exp:
        return released_setup_paragraphs(metrics, exp["released_model"])
    out = []
    splits = manifest.get("splits", {})
    if splits:
        parts = []
        for d in metrics["domains"]:
            tr, ev = splits.get("train", {}).get(d, {}), splits.get("eval", {}).get(d, {})
            parts.append(f"{d}: {tr.get('n_blocks', '?')} train / {ev.get('n_blocks', '?')} held-out blocks")
        out.append(f"Data: {', '.join(parts)} of {metrics.get('block_size')} tokens; split by source document before "
                   "packing, documents with near-duplicate texts kept on one side, with a leakage check on every build.")
    out.append(units_sentence(metrics))
    model, moe, train = exp.get("model", {}), exp.get("moe", {}), exp.get("train", {})
    if model:
        out.append(f"Model: GPT-2 with {model.get('n_layers')} layers, d={model.get('d_model')}, "
                   f"{model.get('n_heads')} heads, context {model.get('context_tokens')}. MoE arms: "
                   f"{moe_arm_shapes(metrics) or str(moe.get('n_experts')) + ' experts'} in layers {moe.get('layers')}, "
                   f"upcycled from the dense base.")
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
    summary = read_json_object(path, {"members": list, "mdl_optimal_k": dict})
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
        # a group that no token of the batch fired has no domain shares (None in the JSON)
        doms = {d: v for d, v in (g.get("domains") or {}).items() if v is not None}
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
