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
            assert a.keys() == b.keys(), where
            for key in a:
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
