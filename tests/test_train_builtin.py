"""End to end on the real built-in corpus (small): data build -> base stage -> dense / moe / moe-nolb."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moescope.data.build import build_dataset
from moescope.data.config import DataBuildConfig, TokenizerConfig, default_domains
from moescope.train.experiment import run_experiment
from moescope.train.metrics_log import read_metrics
from train_fixtures import one_thread, tiny_experiment  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_experiment_on_the_builtin_corpus(tmp_path: Path) -> None:
    domains = [replace(d, target_mb=0.03) for d in default_domains()]
    store = build_dataset(DataBuildConfig(domains=domains, block_size_tokens=32, eval_min_texts=4,
                                          tokenizer=TokenizerConfig(vocab_size=512)), tmp_path / "data")
    cfg = tiny_experiment(store.root, base__steps=3, train__steps=3, train__eval_every_steps=3)
    summary = run_experiment(cfg, tmp_path / "run")
    assert set(summary) == {"base", "dense", "moe", "moe-nolb"}
    for arm in ("dense", "moe", "moe-nolb"):
        ev = read_metrics(tmp_path / "run" / "arms" / arm / "metrics.jsonl", "eval")[-1]
        assert set(ev["domains"]) == set(store.domains) == {"code", "math", "prose"}
        assert ev["loss"]["token_weighted"] < 7.0  # below ln(512) = 6.24 + slack: it learned something
    manifest = json.loads((tmp_path / "run" / "data_manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["block_size"] == 32
