"""End to end on the real built-in corpus (small): data build -> base stage -> dense / moe / moe-nolb."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moescope.data.build import build_dataset
from moescope.data.config import DataBuildConfig, TokenizerConfig, default_domains
from moescope.cli import main
from moescope.train.metrics_log import read_metrics
from train_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_experiment_on_the_builtin_corpus_through_the_cli(tmp_path: Path) -> None:
    """The issue's "done when": `moescope train --experiment` (a YAML config) on the built-in corpus
    runs dense / moe / moe-nolb at matched compute, each learns, writes metrics, checkpoints and its
    final model; `--resume` of the finished run changes nothing."""
    domains = [replace(d, target_mb=0.03) for d in default_domains()]
    store = build_dataset(DataBuildConfig(domains=domains, block_size_tokens=32, eval_min_texts=4,
                                          tokenizer=TokenizerConfig(vocab_size=512)), tmp_path / "data")
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(
        "arms: [dense, moe, moe-nolb]\n"
        "base: {steps: 4}\n"
        "model: {n_layers: 2, d_model: 32, n_heads: 2, context_tokens: 32}\n"
        "moe: {n_experts: 4, layers: [1]}\n"
        "optim: {learning_rate: 0.01, warmup_fraction: 0.2}\n"
        "train: {steps: 6, batch_sequences: 4, eval_every_steps: 3, checkpoint_every_steps: 3,\n"
        "        eval_max_blocks_per_domain: 4, log_every_steps: 1}\n"
        "tracking: {progress_bar: false}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--experiment", "--data", str(store.root), "--out", str(run)]) == 0
    rows = {}
    for arm in ("dense", "moe", "moe-nolb"):
        adir = run / "arms" / arm
        ev = read_metrics(adir / "metrics.jsonl", "eval")
        assert [e["step"] for e in ev] == [0, 3, 6]
        assert set(ev[-1]["domains"]) == set(store.domains) == {"code", "math", "prose"}
        assert ev[-1]["loss"]["domain_weighted"] < ev[0]["loss"]["domain_weighted"]  # it learned
        rows[arm] = [(r["step"], r["tokens_seen"], r["learning_rate"]) for r in read_metrics(adir / "metrics.jsonl", "train")]
        assert (adir / "checkpoints" / "latest").read_text().strip() == "step_000006"
        assert (adir / "final").is_dir() and (adir / "config.json").is_file()
    assert rows["dense"] == rows["moe"] == rows["moe-nolb"] and len(rows["dense"]) == 6  # matched compute
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert manifest["vocab_size"] == 512 and manifest["block_size"] == 32
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", str(cfg), "--experiment", "--data", str(store.root), "--out", str(run), "--resume"]) == 0
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing trained again
