"""The report's headline sentences state the numbers, intervals and nulls they rest on; the report builds for
a released-model analysis (no training run, 24 layers, 64 experts, top-8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moescope.report.build import (
    BALANCED_LOAD_CV, SIGNIFICANCE_LEVEL, STRONG_NMI, build_report, headline_sentences,
    loss_table, read_jsonl, routing_table, specialization_sentence,
)


def iv(estimate: float, low: float, high: float) -> dict:
    return {"estimate": estimate, "low": low, "high": high}


def layer(nmi: dict, p: float, cv: dict, *, k: int = 1, n_exp: int = 4, first: dict | None = None) -> dict:
    spec = {"nmi": nmi, "nmi_pvalue": p, "max_expert_given_domain": iv(0.8, 0.7, 0.9),
            "nmi_permutation": {"statistic": nmi["estimate"], "pvalue": p, "n_permutations": 999,
                                "null_mean": 0.01, "null_q95": 0.02},
            "domain_specialization_baseline": k / n_exp, "domain_specialization_top": iv(0.5, 0.4, 0.6)}
    if first is not None:
        spec["nmi_first_choice"], spec["nmi_first_choice_pvalue"] = first, 0.001
    return {"n_experts": n_exp, "top_k": k, "specialization": spec,
            "load": {"load_cv": cv, "max_fraction": iv(0.4, 0.35, 0.45), "effective_experts": iv(3.0, 2.9, 3.1)},
            "entropy": {"router_entropy_token": iv(1.0, 0.9, 1.1), "router_entropy_max": 1.386},
            "repetition": {"same_first_choice": iv(0.3, 0.25, 0.35), "baseline_uniform": 0.25}}


def metrics_with(layers: dict) -> dict:
    return {"domains": ["a", "b"], "arms": {"moe": {"kind": "moe", "layers": layers}}}


def test_thresholds_are_named() -> None:
    assert (SIGNIFICANCE_LEVEL, STRONG_NMI, BALANCED_LOAD_CV) == (0.01, 0.1, 0.3)


def test_strong_specialization_states_interval_p_and_null() -> None:
    m = metrics_with({"1": layer(iv(0.05, 0.04, 0.06), 0.001, iv(0.1, 0.05, 0.2)),
                      "2": layer(iv(0.31, 0.28, 0.35), 0.001, iv(0.2, 0.1, 0.25))})
    spec, load = headline_sentences(m, {}, {})
    assert spec.startswith("moe: experts specialize by domain. Best of 2 layers, layer 2")
    assert "0.310 [0.280, 0.350]" in spec and "p = 0.001, 0.002 after Bonferroni over the 2 layers" in spec
    assert "3.00 [2.90, 3.10] effective experts of 4" in spec
    assert "95% of 999 permutations stay at or below 0.020" in spec
    assert "against 0.250 for uniform routing" in spec
    assert load.startswith("moe: load is balanced") and "worst layer 2" in load and "0.20 [0.10, 0.25]" in load


def test_an_undefined_nmi_claims_nothing() -> None:
    """One domain (or nothing to resample): NMI and p read back from JSON as null; no crash, no claim."""
    one = layer({"estimate": None, "low": None, "high": None}, None, iv(0.2, 0.1, 0.25))
    spec, _ = headline_sentences(metrics_with({"0": one, "1": one}), {}, {})
    assert "specialize" not in spec.split(".")[0].replace("no significant specialization", "")
    assert "p = n/a" in spec


def test_a_load_cv_without_interval_gets_no_verdict() -> None:
    """A CV whose interval could not be resampled (null ends) is not called balanced on its estimate alone."""
    m = metrics_with({"0": layer(iv(0.3, 0.2, 0.4), 0.001, {"estimate": 0.05, "low": None, "high": None})})
    _, load = headline_sentences(m, {}, {})
    assert "load is near the balance threshold" in load and "0.05 [n/a]" in load


def test_weak_and_null_specialization_and_load_verdicts() -> None:
    weak = headline_sentences(metrics_with({"0": layer(iv(0.12, 0.09, 0.15), 0.001, iv(0.5, 0.4, 0.6))}), {}, {})
    assert "only weakly" in weak[0] and f"not above {STRONG_NMI}" in weak[0]
    assert "load is imbalanced" in weak[1]
    none = headline_sentences(metrics_with({"0": layer(iv(0.02, 0.0, 0.04), 0.2, iv(0.3, 0.25, 0.35))}), {}, {})
    assert "no significant specialization" in none[0] and "p = 0.2 >= 0.01" in none[0]
    assert "cannot go below" not in none[0]
    few = layer(iv(0.5, 0.4, 0.6), 0.02, iv(0.3, 0.25, 0.35))
    few["specialization"]["nmi_permutation"]["n_permutations"] = 49
    assert "with 49 permutations p cannot go below 0.02" in headline_sentences(metrics_with({"0": few}), {}, {})[0]
    # an interval straddling the threshold is not called balanced or imbalanced
    assert "near the balance threshold" in none[1]


def test_topk_sentence_and_table_carry_first_choice_nmi() -> None:
    m = metrics_with({"0": layer(iv(0.2, 0.15, 0.25), 0.001, iv(0.2, 0.1, 0.25), k=8, n_exp=64,
                                 first=iv(0.6, 0.55, 0.65))})
    spec = headline_sentences(m, {}, {})[0]
    assert "NMI(domain; expert) over all top-8 assignments = 0.200" in spec
    assert "first choice: NMI = 0.600 [0.550, 0.650], p = 0.001" in spec
    table = routing_table(m)
    assert "NMI first choice" in table.columns and table.rows[0][3] == "0.600 [0.550, 0.650]"
    # top-1 tables keep their columns
    assert "NMI first choice" not in routing_table(metrics_with({"0": layer(iv(0.2, 0.1, 0.3), 0.001,
                                                                            iv(0.2, 0.1, 0.25))})).columns


def test_report_for_a_released_model_analysis(tmp_path: Path) -> None:
    """OUT/analysis/{metrics,viewer}.json only (no experiment.json, no training records)."""
    from report_fixtures import DOMAINS, planted_table

    from moescope.analysis.summary import SummaryConfig, summarize_layer
    from moescope.analysis.viewer import viewer_arm

    cfg = SummaryConfig(n_resamples=50, n_permutations=199, vocab_min_count=3)
    tables = {i: planted_table(i, strength=0.15 * i) for i in range(24)}
    layers = {str(i): summarize_layer(t, DOMAINS, cfg) for i, t in tables.items()}
    out = tmp_path / "out"
    (out / "analysis").mkdir(parents=True)
    (out / "analysis" / "metrics.json").write_text(json.dumps(
        {"domains": DOMAINS, "n_eval_blocks": 10, "arms": {"olmoe": {"kind": "moe", "layers": layers}}}))
    pieces = {row: [f"<t{j}>" for j in range(48)] for row in range(10)}
    viewer = {"arms": {"olmoe": viewer_arm(tables, list(range(5)), DOMAINS, pieces)}}
    (out / "analysis" / "viewer.json").write_text(json.dumps(viewer))
    page = build_report(out).read_text()
    assert "Routing per layer" in page and "NMI first choice" in page and "Loss curves" not in page
    assert (out / "report" / "figures" / "layer_curves.png").is_file()
    # the best of 24 layers with 199 permutations: p >= 24 / 200 after Bonferroni, which the sentence says
    assert "no significant specialization by domain (best of 24 layers, layer 23" in page
    assert "0.12 after Bonferroni over 24 layers, so this test cannot show significance" in page


def test_shared_experts_are_named_and_not_counted() -> None:
    from report_fixtures import DOMAINS, planted_table

    from moescope.analysis.summary import SummaryConfig, summarize_layer

    cfg = SummaryConfig(n_resamples=30, n_permutations=19, vocab_min_count=3)
    t = planted_table(0)
    plain, shared = summarize_layer(t, DOMAINS, cfg), summarize_layer(t, DOMAINS, cfg, n_shared_experts=2)
    assert "n_shared_experts" not in plain and shared.pop("n_shared_experts") == 2
    assert shared == plain  # routed-expert statistics are untouched
    m = metrics_with({"0": {**layer(iv(0.2, 0.15, 0.25), 0.001, iv(0.2, 0.1, 0.25), k=8, n_exp=64),
                            "n_shared_experts": 2}})
    assert "64 routed experts the layer has 2 shared expert(s)" in headline_sentences(m, {}, {})[1]
    table = routing_table(m)
    assert table.columns[-1] == "shared experts (not counted)" and table.rows[0][-1] == 2


def test_overlapping_unpaired_losses_defer_to_the_paired_test() -> None:
    """Overlapping unpaired intervals must not be read as 'no arm is better' when a paired
    difference over the same blocks exists (it can separate arms the unpaired intervals cannot)."""
    arms = {"dense": {"kind": "dense", "eval_loss": {"domain_weighted": iv(3.78, 3.74, 3.82)}},
            "moe": {"kind": "dense", "eval_loss": {"domain_weighted": iv(3.81, 3.77, 3.85)}}}
    plain = " ".join(headline_sentences({"domains": ["a"], "arms": arms}, {}, {}))
    assert "no arm is clearly better" in plain
    arms["moe"]["eval_loss_vs_dense"] = {"domain_weighted": iv(0.031, 0.028, 0.034), "pvalue": 0.002}
    paired = " ".join(headline_sentences({"domains": ["a"], "arms": arms}, {}, {}))
    assert "no arm is clearly better" not in paired and "paired differences" in paired


def test_expert_choice_unrouted_share_per_layer_in_text_and_table(tmp_path: Path) -> None:
    """An expert-choice arm's sentence quotes metrics.json's load.unrouted_fraction per layer (and the
    training's last evaluation when there is one); token-choice arms get neither sentence nor column."""
    from moescope.report.content import ReportContent
    from moescope.report.html import render_html

    ec = {k: layer(iv(0.03, 0.01, 0.05), 0.5, iv(0.2, 0.1, 0.25)) for k in ("3", "2")}
    ec["2"]["load"]["unrouted_fraction"] = iv(0.412, 0.398, 0.431)
    ec["3"]["load"]["unrouted_fraction"] = iv(0.29, 0.27, 0.31)
    metrics = {"domains": ["a", "b"], "arms": {"moe-ec": {"kind": "moe", "layers": ec},
                                               "moe": {"kind": "moe", "layers": {"2": layer(iv(0.2, 0.15, 0.25), 0.001,
                                                                                        iv(0.2, 0.1, 0.25))}}}}
    records = {"moe-ec": [{"kind": "eval", "step": 10, "routing": {"2": {"unrouted_fraction": 0.5}}},
                          {"kind": "eval", "step": 20, "routing": {"2": {"unrouted_fraction": 0.43},
                                                                   "3": {"unrouted_fraction": 0.3}}}]}
    sentences = headline_sentences(metrics, {}, records)
    (sentence,) = [s for s in sentences if "no expert took" in s]
    assert sentence.startswith("moe-ec (expert choice")
    assert "no expert took, layer 2 41.2% [39.8, 43.1], layer 3 29.0% [27.0, 31.0] (95% CI)" in sentence
    assert "last training evaluation (step 20, by_domain batches): layer 2 43.0%, layer 3 30.0%" in sentence
    # its load is not judged from the stored expert per token: experts take equal numbers by construction
    assert any(s.startswith("moe-ec: load is balanced by construction") for s in sentences)
    ec["3"]["load"]["tokens_per_expert"] = [640, 640, 640, 640]
    (load,) = [s for s in headline_sentences(metrics, {}, records) if s.startswith("moe-ec: load")]
    assert "layer 3: 640 held-out tokens per expert" in load and "stored expert" not in load
    del ec["3"]["load"]["tokens_per_expert"]
    assert any(s.startswith("moe: load is balanced (") for s in sentences)
    assert not any(s.startswith("moe:") and "no expert took" in s for s in sentences)
    table = routing_table(metrics)
    assert table.columns[-1] == "unrouted share (expert choice)"
    assert "NMI, P(expert | domain) and load count every (token, expert) assignment" in table.caption
    assert "NMI and load count each token's stored expert" not in table.caption
    # domain-grouped held-out batches give every expert the same share of each domain: the text says so
    assert "set by that batching" in table.caption and "cannot show a domain preference" in sentence
    # an analysis that mixed the domains in expert choice's batches (arms.ARM.batch_order) says so instead
    metrics["arms"]["moe-ec"]["batch_order"] = "mixed"
    (sentence,) = [s for s in headline_sentences(metrics, {}, records) if "no expert took" in s]
    assert "batches that mix the domains evenly (batch_order = mixed)" in sentence
    assert "cannot show a domain preference" not in sentence
    records["moe-ec"][-1]["batch_order"] = "mixed"
    (sentence,) = [s for s in headline_sentences(metrics, {}, records) if "no expert took" in s]
    assert "last training evaluation (step 20, mixed batches)" in sentence
    caption = routing_table(metrics).caption
    assert "batch_order = mixed" in caption and "set by that batching" not in caption
    loss = {"domains": {"a": iv(3.7, 3.6, 3.8)}, "token_weighted": iv(3.7, 3.6, 3.8), "domain_weighted": iv(3.7, 3.6, 3.8)}
    assert "moe-ec: forwarded in batches that mix the domains" in loss_table(
        {"domains": ["a"], "arms": {"moe-ec": {"batch_order": "mixed", "eval_loss": loss}}}).caption
    assert "batch_order" not in loss_table({"domains": ["a"], "arms": {"moe": {"eval_loss": loss}}}).caption
    del metrics["arms"]["moe-ec"]["batch_order"]
    column = {row[0]: row[-1] for row in table.rows}
    assert column == {"moe-ec · 2": "0.412 [0.398, 0.431]", "moe-ec · 3": "0.290 [0.270, 0.310]", "moe · 2": "-"}
    assert "unrouted share" not in routing_table(metrics_with({"2": layer(iv(0.2, 0.15, 0.25), 0.001,
                                                                          iv(0.2, 0.1, 0.25))})).columns
    # the viewer's note appears only with an expert-choice arm
    ec_viewer = {"arms": {"moe-ec": {"routing": "expert_choice", "layers": [2], "n_experts": 4, "samples": []}}}
    assert 'id="viewer-expert-choice"' in render_html(ReportContent(title="t", viewer=ec_viewer))
    tc_viewer = {"arms": {"moe": {"layers": [2], "n_experts": 4, "samples": []}}}
    assert 'id="viewer-expert-choice"' not in render_html(ReportContent(title="t", viewer=tc_viewer))


def test_an_interval_without_bounds_is_written_not_crashed_on() -> None:
    """Too few held-out blocks to resample leave low/high None; the report says n/a."""
    from moescope.report.fmt import fmt_interval

    assert fmt_interval({"estimate": 0.5, "low": None, "high": None}) == "0.500 [n/a]"
    assert fmt_interval({"estimate": None, "low": None, "high": None}) == "n/a"
    assert fmt_interval({"estimate": 0.5, "low": 0.25, "high": 0.75}) == "0.500 [0.250, 0.750]"


def test_expert_token_tables_list_experts_by_load_with_their_tokens() -> None:
    from moescope.report.build import expert_token_tables

    layer = {
        "domains": ["code", "prose"],
        "specialization": {"nmi": {"estimate": 0.4}, "domain_given_expert": [[0.9, None, 0.2], [0.1, None, 0.8]]},
        "load": {"token_fraction": [0.3, 0.0, 0.7]},
        "vocabulary": {"min_count": 10, "by_expert": [
            [{"token_id": 5, "token": " def", "count": 40, "occurrences": 50}], [],
            [{"token_id": 9, "token": " the", "count": 30, "occurrences": 40}]]},
    }
    metrics = {"arms": {"dense": {"kind": "dense"}, "moe": {"kind": "moe", "layers": {"2": layer}}}}
    (table,) = expert_token_tables(metrics)
    assert table.title.startswith("moe · layer 2")
    assert [r[0] for r in table.rows] == [2, 0, 1]  # by share of tokens
    assert table.rows[0][2] == "prose 80%" and table.rows[1][2] == "code 90%" and table.rows[2][2] == "-"
    assert table.rows[1][3] == "' def' 80% (40/50)" and table.rows[2][3] == "-"


GOOD_TRAIN = {"kind": "train", "step": 1, "ce": 5.0}
GOOD_EVAL = {"kind": "eval", "step": 2, "loss": {"domain_weighted": 4.5},
             "routing": {"0": {"token_fraction": [0.5, 0.5], "load_cv": 0.0, "router_entropy_token": 0.6,
                               "router_entropy_max": 0.69}}}


@pytest.mark.parametrize("line, says", [
    ("null", "not a JSON record (not a JSON object)"),
    ("[1]", "not a JSON record (not a JSON object)"),
    ('{"kind": "eval", "step": 3, "loss": "bad"}', "'loss.domain_weighted' must be a number"),
    ('{"kind": "eval", "step": 3}', "'loss.domain_weighted' must be a number, got null"),
    ('{"kind": "train", "step": "3", "ce": 1.0}', "'step' must be an integer >= 0"),
    ('{"kind": "train", "step": 1.5, "ce": 1.0}', "'step' must be an integer >= 0"),
    ('{"kind": 3, "step": 1, "ce": 1.0}', "'kind' a string"),
    ('{"kind": "collapse", "step": 3, "layer": 0, "expert": 1}', "'share' must be a number"),
    (json.dumps({**GOOD_EVAL, "routing": {"0": {"load_cv": 0.1}}}), "routing.0.router_entropy_token is missing"),
    (json.dumps({**GOOD_EVAL, "routing": {"x": {}}}), "routing entry 'x'"),
    ('{"kind": "train", "st', "not a JSON record"),
])
def test_report_refuses_a_metrics_jsonl_record_it_cannot_read_naming_file_and_line(
        tmp_path: Path, capsys, line: str, says: str) -> None:
    from moescope.cli import main

    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    (run / "analysis" / "metrics.json").write_text(json.dumps(metrics_with(
        {"0": layer(iv(0.2, 0.15, 0.25), 0.001, iv(0.2, 0.1, 0.25))})))
    records = run / "arms" / "moe" / "metrics.jsonl"
    records.parent.mkdir(parents=True)
    records.write_text(json.dumps(GOOD_TRAIN) + "\n" + line + "\n" + json.dumps(GOOD_EVAL) + "\n")
    assert main(["report", str(run)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"{records}:2: " in err[0] and says in err[0], err
    assert not (run / "report").exists()
    records.write_text(json.dumps(GOOD_TRAIN) + "\n" + json.dumps(GOOD_EVAL) + "\n")  # the shape training writes
    assert read_jsonl(records) == [GOOD_TRAIN, GOOD_EVAL]
    # a run still writing: its torn last line is left out, as training's own reader does
    records.write_text(json.dumps(GOOD_TRAIN) + "\n" + json.dumps(GOOD_EVAL) + "\n" + '{"kind": "tra')
    assert read_jsonl(records) == [GOOD_TRAIN, GOOD_EVAL]


def test_the_best_of_many_layers_is_judged_after_bonferroni() -> None:
    """p = 0.003 passes alone, but picked as the best of 48 layers it is 0.144 after Bonferroni: no claim."""
    alone = specialization_sentence("moe", "moe", {"5": layer(iv(0.3, 0.25, 0.35), 0.003, iv(0.1, 0.05, 0.2))})
    assert alone.startswith("moe: experts specialize by domain. Layer 5:") and "Bonferroni" not in alone
    many = {str(i): layer(iv(0.05, 0.04, 0.06), 0.5, iv(0.1, 0.05, 0.2)) for i in range(48)}
    many["5"] = layer(iv(0.3, 0.25, 0.35), 0.003, iv(0.1, 0.05, 0.2))
    verdict = specialization_sentence("moe", "moe", many)
    assert verdict.startswith("moe: no significant specialization by domain (best of 48 layers, layer 5")
    assert "permutation p = 0.003, 0.144 after Bonferroni over the 48 layers >= 0.01" in verdict
    # 999 permutations cannot reach 0.01 once multiplied by 48 layers: said, with the way out
    assert "p cannot go below 0.001, 0.048 after Bonferroni over 48 layers" in verdict
    # with the max-over-layers test the metrics carry, the same layer keeps the floor of one test
    best_of = {"layer": "5", "pvalue": 0.001, "n_layers": 48}
    verdict = specialization_sentence("moe", "moe", many, (), best_of)
    assert verdict.startswith("moe: experts specialize by domain. Best of 48 layers, layer 5")
    assert "permutation p = 0.003, 0.001 against the largest NMI of the 48 layers under the same shuffles" in verdict


def test_effective_experts_are_judged_against_top_k_and_the_domains() -> None:
    """Top-2 routing always spreads over >= 2 experts, so a layer on 2.3 of them is near collapse; with
    two domains of 90% / 10% of the tokens, one expert per domain is perfect specialization at 1.38."""
    top2 = layer(iv(0.3, 0.25, 0.35), 0.001, iv(0.1, 0.05, 0.2))
    top2["top_k"] = 2
    top2["load"]["effective_experts"] = iv(2.3, 2.2, 2.4)
    assert "not said to specialize" in specialization_sentence("moe", "moe", {"3": top2})
    two = layer(iv(0.9, 0.85, 0.95), 0.001, iv(0.1, 0.05, 0.2))
    two["specialization"]["domain_given_expert"] = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    two["load"]["token_fraction"] = [0.9, 0.1, 0.0, 0.0]
    two["load"]["effective_experts"] = iv(1.38, 1.36, 1.40)
    assert specialization_sentence("moe", "moe", {"3": two}).startswith("moe: experts specialize by domain.")


def test_a_layer_carried_by_one_expert_or_collapsed_is_not_called_specialized() -> None:
    one = layer(iv(0.3, 0.25, 0.35), 0.001, iv(3.8, 3.7, 3.9))
    one["load"]["effective_experts"] = iv(1.2, 1.1, 1.3)
    text = specialization_sentence("nolb", "nolb", {"3": one})
    assert "experts specialize" not in text and "not said to specialize" in text
    assert text.startswith("nolb: routing depends on the domain, but only 1.20 [1.10, 1.30] effective experts of 4")
    assert "NMI(domain; expert) = 0.300 [0.250, 0.350]" in text and "at or below 0.020" in text
    healthy = layer(iv(0.3, 0.25, 0.35), 0.001, iv(0.1, 0.05, 0.2))
    collapse = [{"kind": "collapse", "step": 200, "layer": 3, "expert": 1, "share": 0.93}]
    text = specialization_sentence("nolb", "nolb", {"3": healthy}, collapse)
    assert "experts specialize" not in text and "collapse was detected in layer 3 during training (step 200" in text
    # a collapse in another layer does not speak to this one
    assert "experts specialize by domain" in specialization_sentence("nolb", "nolb", {"2": healthy}, collapse)


def test_nmi_at_the_upcycled_start_and_the_paired_change_with_a_direction_only_past_0() -> None:
    lay = layer(iv(0.476, 0.467, 0.488), 0.001, iv(0.1, 0.05, 0.2))
    spec = lay["specialization"]
    spec.update(nmi_start=iv(0.432, 0.42, 0.44), nmi_change=iv(0.044, 0.035, 0.052), nmi_start_step=0)
    text = specialization_sentence("moe", "moe", {"2": lay})
    assert ("At the upcycled start (step 0, router not yet trained) the NMI was 0.432 [0.420, 0.440]; training "
            "increased it by +0.044 [+0.035, +0.052] (paired over the same resampled blocks).") in text
    spec["nmi_change"] = iv(0.004, -0.002, 0.01)
    text = specialization_sentence("moe", "moe", {"2": lay})
    assert ("training changed it by +0.004 [-0.002, +0.010] (paired over the same resampled blocks), an interval "
            "that covers 0: no change by training is shown.") in text
    assert "increased" not in text and "decreased" not in text
    spec["nmi_change"] = iv(-0.05, -0.07, -0.03)
    assert "training decreased it by -0.050 [-0.070, -0.030]" in specialization_sentence("moe", "moe", {"2": lay})
    del spec["nmi_start"], spec["nmi_change"]  # dense-initialized or released: no start value, no sentence
    assert "upcycled start" not in specialization_sentence("moe", "moe", {"2": lay})


def test_a_paired_loss_direction_needs_the_interval_past_0_and_the_sign_flip_p_below_0_05() -> None:
    """Opposite per-domain effects: the bootstrap interval (around the estimate) excludes 0 while the
    sign-flip null (blocks' differences symmetric about 0) does not reject; no direction is then stated."""
    import numpy as np

    from moescope.analysis.stats import paired_loss_difference
    from moescope.report.build import PAIRED_SIGNIFICANCE, paired_loss_sentences

    rng = np.random.default_rng(1)
    n = 60
    dom = np.repeat([0, 1, 2], n)
    tok = np.full(3 * n, 127.0)
    diff = np.array([0.05, -0.05, -0.015])[dom] + rng.normal(0, 0.005, 3 * n)
    b = rng.normal(4, 0.5, 3 * n) * tok
    res = paired_loss_difference(b + diff * tok, b, tok, dom, 3).to_dict(["code", "math", "prose"])
    interval = res["domain_weighted"]
    assert interval["high"] < 0 and PAIRED_SIGNIFICANCE <= res["pvalue"] < 0.2  # the case itself

    def sentence(interval: dict, p: float) -> str:
        arms = {"moe": {"eval_loss_vs_dense": {"reference": "dense", "n_blocks": 180, "domain_weighted": interval,
                                               "pvalue": p}}}
        (text,) = paired_loss_sentences({"arms": arms})
        return text

    text = sentence(interval, res["pvalue"])
    assert "below" not in text and "above" not in text and "not separated" in text
    assert f"sign-flip p = {res['pvalue']:.3g}" in text and f"{interval['high']:+.4f}]" in text
    assert "is above dense" not in sentence(iv(0.03, 0.02, 0.04), 0.1)
    assert sentence(iv(0.03, 0.02, 0.04), 0.002).endswith(": moe is above dense.")
    assert sentence(iv(-0.03, -0.04, -0.02), 0.002).endswith(": moe is below dense.")
    assert "interval covers 0" in sentence(iv(0.01, -0.001, 0.02), 0.03)
    assert "does not separate moe from dense" in sentence(iv(0.01, -0.001, 0.02), 0.3)


def test_format_test_sentence_states_the_interval_not_a_bound_and_the_changed_first_choices() -> None:
    ft = {"layers": {
        "2": {"mean_token_js_divergence": iv(0.0097, 0.0069, 0.0134), "top1_changed_fraction": iv(0.2485, 0.222, 0.28),
              "reference_token_js_divergence": {"same domain": 0.112}},
        "3": {"mean_token_js_divergence": iv(0.0162, 0.0113, 0.0223), "top1_changed_fraction": iv(0.2489, 0.2223, 0.2823),
              "reference_token_js_divergence": {"same domain": 0.0953}}}}
    m = metrics_with({"2": layer(iv(0.3, 0.25, 0.35), 0.001, iv(0.1, 0.05, 0.2))})
    m["arms"]["moe"]["format_test"] = ft
    text = headline_sentences(m, {}, {})[-1]
    assert "at most" not in text  # its interval reaches above the estimate: not a bound
    assert text == ("moe: adding 'Problem:'/'Solution:' markers moves the routing of the same content tokens by "
                    "0.016 [0.011, 0.022] bits per token (mean JS divergence, 95% CI; layer 3, the largest of 2 "
                    "layers), against 0.095 bits between two random tokens of the same domain, and changes the "
                    "first-choice expert of 24.9% [22.2, 28.2] of those tokens.")
