"""Expert-choice routing statistics count the (token, expert) assignments the layer made; token choice is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moescope.analysis.summary import SummaryConfig, summarize_layer, summarize_token_types
from moescope.analysis.table import RoutingTable

FIXTURE = Path(__file__).parent / "fixtures" / "token_choice_summary.json"
DOMAINS = ["code", "math", "prose"]
TC_CFG = SummaryConfig(n_resamples=200, n_permutations=99, vocab_min_count=5)


def token_choice_table(k: int) -> RoutingTable:
    """A fixed top-k token-choice table: 3 domains x 6 blocks of 48 tokens, 6 experts, a few dropped assignments."""
    rng = np.random.default_rng(20 + k)
    n_blocks, block_len, n_exp = 18, 48, 6
    block = np.repeat(np.arange(n_blocks), block_len)
    domain = np.repeat(np.arange(3), n_blocks // 3)[block]
    logits = rng.normal(size=(block.size, n_exp))
    logits[np.arange(block.size), 2 * domain] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :k]
    gate = np.take_along_axis(probs, top, axis=1)
    gate[::37, -1] = 0.0
    return RoutingTable(rng.integers(0, 30, block.size), block, np.tile(np.arange(block_len), n_blocks), domain,
                        top, gate, probs.astype(np.float16))


def token_choice_summaries() -> dict:
    """What metrics.json holds per layer and per token type for top-1 and top-2 token-choice tables."""
    from moescope.analysis.pipeline import json_ready

    out = {}
    for k in (1, 2):
        table = token_choice_table(k)
        types = np.where(table.domain == 0, table.token_id % 4, -1)
        out[f"top{k}"] = json_ready({"layer": summarize_layer(table, DOMAINS, TC_CFG),
                                     "token_types": summarize_token_types(types, table, list("abcd"), TC_CFG)})
    return out


def test_token_choice_summaries_equal_the_fixture_computed_before_expert_choice_counting() -> None:
    """Top-1 and top-2 token-choice layers and token types give the numbers the code gave before expert-choice
    arms were counted by assignment (tests/fixtures/token_choice_summary.json, written by the previous code)."""
    expected = json.loads(FIXTURE.read_text())
    got = json.loads(json.dumps(token_choice_summaries(), sort_keys=True))
    assert got.keys() == expected.keys()

    def same(a, b, where):
        if isinstance(a, dict):
            # every number the fixture holds is still there and equal; entries added since (e.g.
            # vocabulary.by_expert) are new numbers, not changed ones
            assert a.keys() >= b.keys(), where
            for key in b:
                same(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and isinstance(b, float):
            # bit for bit on one machine; 1e-12 allows another BLAS's summation order
            assert a == pytest.approx(b, rel=1e-12, abs=1e-15), where
        else:
            assert a == b, where

    same(got, expected, "summary")


EC_CFG = SummaryConfig(n_resamples=200, n_permutations=99)


def expert_choice_table(mask: np.ndarray, domain: np.ndarray, block: np.ndarray, stored: np.ndarray) -> RoutingTable:
    """An expert-choice table from a selection mask [N, E]; ``stored`` [N] is expert_index (what the viewer shows)."""
    n, n_exp = mask.shape
    probs = np.full((n, n_exp), 1.0 / n_exp)
    gate = mask[np.arange(n), stored].astype(float)[:, None]
    position = np.concatenate([np.arange(c) for c in np.bincount(block)])
    return RoutingTable(np.zeros(n, np.int64), block, position, domain, stored[:, None], gate, probs,
                        experts_per_token=mask.sum(1), expert_mask=mask)


def separated_selection(rng: np.random.Generator):
    """2 domains x 6 blocks of 20 tokens, 4 experts: domain 0 is taken only by experts 0-1, domain 1 only by 2-3,
    some tokens by both of their domain's experts, some by none."""
    block = np.repeat(np.arange(12), 20)
    domain = (block >= 6).astype(np.int64)
    n = block.size
    mask = np.zeros((n, 4), dtype=bool)
    pick = rng.integers(0, 4, n)  # 0, 1: one expert; 2: both; 3: unrouted
    base = 2 * domain
    mask[np.arange(n), base + (pick % 2)] = pick < 2
    mask[pick == 2, base[pick == 2]] = True
    mask[pick == 2, base[pick == 2] + 1] = True
    return mask, domain, block


def test_domain_separated_assignments_give_nmi_one_whatever_the_stored_expert() -> None:
    """Experts that take only one domain's tokens determine the domain: NMI 1 over the assignments, even when each
    unrouted token's stored expert (its router's first choice) lies in the other domain's experts, which made the
    one-stored-expert count read less."""
    mask, domain, block = separated_selection(np.random.default_rng(1))
    unrouted = ~mask.any(1)
    stored = np.where(mask.any(1), mask.argmax(1), 3 - 2 * domain)  # unrouted: an expert of the other domain
    table = expert_choice_table(mask, domain, block, stored)
    spec = summarize_layer(table, ["a", "b"], EC_CFG)["specialization"]
    assert unrouted.any() and (mask.sum(1) == 2).any()
    assert spec["nmi"]["estimate"] == pytest.approx(1.0)
    assert spec["nmi"]["low"] == pytest.approx(1.0) and spec["nmi"]["high"] == pytest.approx(1.0)
    assert spec["nmi_pvalue"] == pytest.approx(1 / 100)
    # the stored expert alone would not say 1
    from moescope.analysis import metrics
    stored_counts = metrics.count_domain_expert(stored, domain, 4, 2)
    assert metrics.normalized_mutual_information(stored_counts, equal_domain_weights=True) < 0.9


def test_independent_assignments_give_nmi_zero() -> None:
    """Every block's tokens are taken by the same experts in the same numbers in both domains: NMI exactly 0."""
    block = np.repeat(np.arange(8), 12)
    domain = (block >= 4).astype(np.int64)
    pattern = np.zeros((12, 3), dtype=bool)
    pattern[np.arange(12), np.arange(12) % 3] = True
    pattern[:4, 1] = True  # tokens taken by two experts
    pattern[10:] = False  # unrouted tokens
    mask = np.tile(pattern, (8, 1))
    table = expert_choice_table(mask, domain, block, np.zeros(block.size, np.int64))
    s = summarize_layer(table, ["a", "b"], EC_CFG)
    assert s["specialization"]["nmi"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    assert s["specialization"]["nmi_pvalue"] == pytest.approx(1.0)


def test_assignment_statistics_equal_the_existing_functions_on_the_expanded_assignment_list() -> None:
    """NMI, its block-bootstrap interval and permutation null of an expert-choice layer are those of the
    assignment-level (domain, expert, block) list fed to the token-choice functions (one row per assignment)."""
    from moescope.analysis import metrics, stats

    rng = np.random.default_rng(3)
    block = np.repeat(np.arange(15), 16)
    domain = block // 5
    mask = rng.random((block.size, 5)) < np.array([0.1, 0.3, 0.2, 0.25, 0.15])[None] * (1 + domain[:, None] % 2)
    table = expert_choice_table(mask, domain, block, mask.argmax(1))
    s = summarize_layer(table, ["a", "b", "c"], EC_CFG)
    rows, experts = np.nonzero(mask)
    counts = metrics.count_domain_expert(experts, domain[rows], 5, 3)
    assert s["specialization"]["nmi"]["estimate"] == pytest.approx(
        float(metrics.normalized_mutual_information(counts, equal_domain_weights=True)), rel=1e-12)
    np.testing.assert_allclose(s["specialization"]["expert_given_domain"], metrics.expert_given_domain(counts),
                               atol=1e-6)
    _, block_domain, block_counts = stats.block_expert_counts(experts, block[rows], domain[rows], 5)
    tables = stats.domain_tables(block_counts, block_domain, 3)
    iv = stats.bootstrap_interval(tables, stats.nmi_statistic(3, 5), strata=block_domain, n_resamples=200)
    assert (s["specialization"]["nmi"]["low"], s["specialization"]["nmi"]["high"]) == pytest.approx((iv.low, iv.high))
    perm = stats.permutation_test_nmi(block_counts, block_domain, 3, n_permutations=99)
    assert s["specialization"]["nmi_permutation"] == pytest.approx(perm.to_dict())
    load = s["load"]
    assert load["tokens_per_expert"] == mask.sum(0).tolist()
    assert load["load_cv"]["estimate"] == pytest.approx(float(metrics.load_cv(mask.sum(0))))
    assert load["dropped_fraction"] == 0.0
    assert load["unrouted_fraction"]["estimate"] == pytest.approx((~mask.any(1)).mean())
    # OLMoE domain specialization over a domain's tokens (unrouted ones included in N_D)
    n_d = np.bincount(domain, minlength=3)
    np.testing.assert_allclose(s["specialization"]["domain_specialization"], counts / n_d[:, None], atol=1e-6)
    assert s["specialization"]["domain_specialization_baseline"] == pytest.approx(mask.sum() / mask.size)
    # coactivation: of the tokens expert i took, the share expert j also took
    both = mask[:, 0] & mask[:, 1]
    assert s["specialization"]["coactivation"][0][1] == pytest.approx(both.sum() / mask[:, 0].sum(), abs=1e-6)


def test_token_types_count_every_assignment_under_expert_choice() -> None:
    from moescope.analysis import metrics

    mask, domain, block = separated_selection(np.random.default_rng(2))
    table = expert_choice_table(mask, domain, block, mask.argmax(1))
    types = np.where(domain == 0, np.arange(domain.size) % 3, -1)
    out = summarize_token_types(types, table, ["x", "y", "z"], EC_CFG)
    keep = types >= 0
    rows, experts = np.nonzero(mask[keep])
    expected = metrics.count_domain_expert(experts, types[keep][rows], 4, 3)
    assert out["counts"] == expected.astype(int).tolist()
    assert out["n_tokens"] == int(keep.sum())
    assert out["top_expert"]["x"]["n_tokens"] == int((types == 0).sum())


def test_expert_mask_survives_the_routing_file_and_token_choice_files_do_not_change(tmp_path) -> None:
    from moescope.analysis.capture import load_table, save_table

    mask, domain, block = separated_selection(np.random.default_rng(4))
    table = expert_choice_table(mask, domain, block, mask.argmax(1))
    back = load_table(save_table(table, tmp_path / "ec.npz"))
    np.testing.assert_array_equal(back.expert_mask, mask)
    assert back.expert_choice
    tc = token_choice_table(2)
    with np.load(save_table(tc, tmp_path / "tc.npz")) as data:
        assert sorted(data.files) == ["block", "domain", "expert_count", "expert_index", "gate_weight", "position",
                                      "router_probs", "token_id"]
    assert not load_table(tmp_path / "tc.npz").expert_choice
    with pytest.raises(ValueError, match="expert_mask"):
        RoutingTable(**{**{n: getattr(table, n) for n in RoutingTable.columns()}, "expert_mask": mask[:, :3]})


def test_tiny_expert_choice_gpt2_counts_the_layers_own_selection(tmp_path) -> None:
    """A tiny expert-choice GPT-2 captured in full batches: the assignment-level domain x expert table equals a
    direct count of each layer's own expert_mask over the same batches, every expert's load is its capacity per
    pass times the passes (load CV 0), and the coarse one-stored-expert count differs."""
    import torch
    from test_analysis_pipeline import write_data
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.analysis import metrics
    from moescope.analysis.capture import capture_routing, select_eval_rows
    from moescope.data.blocks import BlockStore
    from moescope.moe.capture import record_routing
    from moescope.moe.config import MoEConfig
    from moescope.moe.install import install_moe
    from moescope.moe.model import moe_layers

    write_data(tmp_path / "data")
    store = BlockStore.open(tmp_path / "data")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=320))
    install_moe(model, MoEConfig(n_experts=4, top_k=1, layers=[0, 1], routing="expert_choice", capacity_factor=1.0))
    for layer in moe_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    model.eval()
    rows = select_eval_rows(store)
    batch = 2
    rows = rows[: rows.size - rows.size % batch]  # every pass full: the same capacity in each
    res = capture_routing(model, store, rows=rows, batch_blocks=batch, progress=False)

    index = store.index("eval")
    n_dom = len(store.domains)
    direct = {i: np.zeros((n_dom, 4)) for i in res.tables}
    capacity = {}
    with torch.no_grad(), record_routing(model) as rec:
        for s in range(0, rows.size, batch):
            part = rows[s:s + batch]
            model(input_ids=torch.from_numpy(store.gather("eval", index[part])))
            token_domain = np.repeat(index[part, 0], store.block_size)
            for i, record in rec.latest().items():
                np.add.at(direct[i], token_domain, record.expert_mask.numpy().astype(float))
                capacity[i] = record.capacity
    passes = rows.size // batch
    for i, table in res.tables.items():
        s = summarize_layer(table, store.domains, EC_CFG)
        assert s["routing"] == "expert_choice"
        expected = direct[i] / direct[i].sum(1, keepdims=True)
        np.testing.assert_allclose(s["specialization"]["expert_given_domain"], expected, atol=1e-6)
        assert s["specialization"]["nmi"]["estimate"] == pytest.approx(
            float(metrics.normalized_mutual_information(direct[i], equal_domain_weights=True)), rel=1e-12)
        assert s["load"]["tokens_per_expert"] == [capacity[i] * passes] * 4
        assert s["load"]["load_cv"]["estimate"] == pytest.approx(0.0, abs=1e-12)
        assert s["load"]["load_cv"]["high"] < 0.5  # resampled blocks are not whole passes
        assert s["n_assignments"] == 4 * capacity[i] * passes
        stored = metrics.count_domain_expert(table.expert_index[:, :1], table.domain, 4, n_dom)
        assert not np.array_equal(stored, direct[i])


def test_analyze_summary_line_says_balanced_by_construction_for_expert_choice(capsys) -> None:
    from moescope.commands.analyze import _print_summary

    iv = lambda e: {"estimate": e, "low": e - 0.01, "high": e + 0.01}  # noqa: E731
    head = {"nmi": iv(0.2), "nmi_pvalue": 0.001, "best_layer": 3, "load_cv_max": 0.0}
    ec_layers = {"3": {"load": {"unrouted_fraction": iv(0.29)}}, "2": {"load": {"unrouted_fraction": iv(0.412)}}}
    _print_summary({"arms": {
        "moe-ec": {"eval_loss": {"token_weighted": iv(3.8)}, "headline": head, "layers": ec_layers},
        "moe": {"eval_loss": {"token_weighted": iv(3.8)}, "headline": {**head, "load_cv_max": 0.33},
                "layers": {"2": {"load": {}}}},
    }})
    ec_line, tc_line = capsys.readouterr().out.splitlines()
    assert "load balanced by construction (expert choice), unrouted share layer 2 41.2%, layer 3 29.0%" in ec_line
    assert "load CV" not in ec_line
    assert tc_line.endswith("max load CV 0.33")


def test_vocabulary_specialization_counts_the_experts_that_took_each_occurrence() -> None:
    """Expert choice: an id's top expert and its share of the id's occurrences (unrouted ones included) come from
    the selection mask, here counted directly id by id."""
    from moescope.analysis import metrics

    rng = np.random.default_rng(5)
    mask, domain, block = separated_selection(rng)
    token_id = rng.integers(0, 6, mask.shape[0])
    mask[token_id == 4] = False
    mask[token_id == 4, 3] = True  # id 4: always expert 3 (only)
    stored = np.zeros(mask.shape[0], np.int64)
    v = metrics.vocabulary_specialization(token_id, stored[:, None], 4, min_count=5, assignments=np.nonzero(mask))
    for x, top, frac in zip(v.token_ids, v.top_expert, v.top_fraction):
        per_expert = mask[token_id == x].sum(0)
        assert per_expert[top] == per_expert.max()
        assert frac == pytest.approx(per_expert.max() / (token_id == x).sum())
    assert v.top_fraction[list(v.token_ids).index(4)] == 1.0
    table = expert_choice_table(mask, domain, block, stored)
    table = RoutingTable(**{**{n: getattr(table, n) for n in RoutingTable.columns()}, "token_id": token_id})
    assert summarize_layer(table, ["a", "b"], EC_CFG)["vocabulary"]["mean"] == pytest.approx(v.mean)


@pytest.mark.filterwarnings("ignore:The BCa confidence interval")
def test_consecutive_tokens_under_expert_choice_count_the_experts_own_selection() -> None:
    """'Same expert as previous token' for expert choice: the share of consecutive pairs that one expert took
    both of, with chance 1 - prod_e (1 - q_e^2); hand-counted on two blocks of four tokens."""
    from moescope.analysis import metrics

    sets = [{0}, {0, 1}, set(), {1}, {1}, {1}, {1}, {0}]  # block 0: pairs share 0 / -, -; block 1: 1, 1, -
    mask = np.array([[e in s for e in range(2)] for s in sets])
    block = np.repeat([0, 1], 4)
    table = expert_choice_table(mask, block.copy(), block, mask.argmax(1))
    i, j = metrics.consecutive_pairs(table.block, table.position)
    assert metrics.shared_assignment(mask, i, j).tolist() == [True, False, False, True, True, False]
    q = np.array([3 / 8, 5 / 8])  # expert 0 took 3 of 8 tokens, expert 1 took 5
    assert metrics.shared_assignment_baseline(mask) == pytest.approx(1 - np.prod(1 - q * q))
    rep = summarize_layer(table, ["a", "b"], EC_CFG)["repetition"]
    assert rep["shared_assignment"]["estimate"] == pytest.approx(3 / 6)
    assert rep["shared_assignment_baseline"] == pytest.approx(1951 / 4096)
    # token choice has no such entry (its summaries are pinned by the fixture test above)
    assert "shared_assignment" not in summarize_layer(token_choice_table(1), DOMAINS, TC_CFG)["repetition"]


def test_assignment_saturation_is_router_saturation_for_top_k_and_counts_every_assignment() -> None:
    """Router saturation over selection masks: for top-k token choice (k assignments per token) it equals the
    top-k overlap; under expert choice it is the share of the final model's assignments the checkpoint made."""
    from moescope.analysis import metrics

    rng = np.random.default_rng(3)
    n, n_exp, k = 200, 6, 2
    final = np.argsort(rng.random((n, n_exp)), axis=1)[:, :k]
    ckpt = np.argsort(rng.random((n, n_exp)), axis=1)[:, :k]
    ckpt[:120] = final[:120]

    def onehot(idx: np.ndarray) -> np.ndarray:
        mask = np.zeros((n, n_exp), dtype=bool)
        np.put_along_axis(mask, idx, True, axis=1)
        return mask

    assert metrics.assignment_saturation(onehot(ckpt), onehot(final)) == pytest.approx(
        float(metrics.router_saturation([ckpt], final)[0]), rel=1e-12)
    even = np.zeros((300, n_exp), dtype=bool)  # k = 2 assignments per token, each expert takes 1/3 of tokens
    np.put_along_axis(even, np.arange(k) + 2 * (np.arange(300) % 3)[:, None], True, axis=1)
    assert metrics.assignment_saturation_baseline(even) == pytest.approx(k / n_exp)
    # expert choice, hand-counted: the final model made 4 assignments, the checkpoint repeated 3 (and added 1)
    final_ec = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=bool)
    ckpt_ec = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=bool)
    assert metrics.assignment_saturation(ckpt_ec, final_ec) == pytest.approx(3 / 4)
    assert metrics.assignment_saturation_baseline(final_ec) == pytest.approx((0.5 ** 2 * 2) / 1.0)
    with pytest.raises(ValueError, match="not the same tokens"):
        metrics.assignment_saturation(ckpt_ec[:3], final_ec)
