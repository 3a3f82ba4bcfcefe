"""The branch / merge / ensemble study end to end on a tiny local corpus (offline, tiny models)."""

import json
import sys

import numpy as np
import pytest

from moescope.btx.config import BTXConfig
from moescope.btx.data import load_eval_set, write_branch_data
from moescope.data.blocks import BlockStore
from moescope.data.build import build_dataset
from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig, TokenizerConfig
from moescope.partition.io import partition_dirs, read_partition_texts
from moescope.train.config import ModelConfig, OptimConfig, TrackingConfig, TrainConfig

from test_partition_texts import three_domains


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("btx")
    texts, domains = three_domains(n_each=60, seed=1)
    doms = []
    for d in ("code", "math", "prose"):
        path = root / f"{d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t, dd in zip(texts, domains) if dd == d))
        doms.append(DomainConfig(name=f"my_{d}", source=SourceConfig(backend="files", paths=[str(path)]),
                                 target_mb=None))
    cfg = DataBuildConfig(domains=doms, block_size_tokens=32, eval_min_texts=6, eval_fraction=0.1,
                          tokenizer=TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1))
    build_dataset(cfg, root / "data")
    return root / "data"


def tiny_btx(data_dir, **kw):
    return BTXConfig(
        data_dir=str(data_dir), base_steps=4, branch_steps=3, finetune_steps=2, n_partitions=2,
        eval_context_tokens=8, eval_max_blocks_per_domain=4,
        model=ModelConfig(n_layers=2, d_model=32, n_heads=2, context_tokens=32),
        optim=OptimConfig(learning_rate=3e-3, warmup_fraction=0.0),
        train=TrainConfig(batch_sequences=4, eval_every_steps=100, checkpoint_every_steps=0,
                          eval_max_blocks_per_domain=2, log_every_steps=1, cpu_threads=1),
        tracking=TrackingConfig(progress_bar=False), **kw,
    )


def test_branch_data_packs_exactly_the_partition_with_the_corpus_eval_split(tiny_data, tmp_path):
    from moescope.partition.config import PartitionConfig
    from moescope.partition.io import read_data_dir_corpus, write_partitions
    from moescope.partition.partitioner import partition_texts, summarize_outcome

    corpus = read_data_dir_corpus(tiny_data)
    outcome = partition_texts(corpus.texts, PartitionConfig(n_partitions=2, strategy="random"), domains=corpus.domains)
    write_partitions(outcome, corpus.ids, tmp_path / "parts", report=summarize_outcome(outcome))
    pdir = partition_dirs(tmp_path / "parts")[0]
    store = write_branch_data(tiny_data, pdir, tmp_path / "branch")
    src = BlockStore.open(tiny_data)
    recs = read_partition_texts(pdir)
    for d in src.domains:
        assert np.array_equal(store.blocks("eval", d), src.blocks("eval", d))
        mine = [r["text"] for r in recs if r["source_domain"] == d]
        assert [t["text"] for t in store.texts("train", d)] == mine
        # the packed tokens are the partition's texts joined by EOS (minus the dropped tail)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
        ids = [i for t in mine for i in tok(t, add_special_tokens=False)["input_ids"] + [src.eos_token_id]]
        flat = store.blocks("train", d).reshape(-1)
        assert flat.tolist() == ids[: len(flat)]
    ev = load_eval_set(tiny_data, max_blocks_per_domain=3)
    assert ev.blocks.shape[1] == 32 and np.bincount(ev.domain_ids).max() <= 3


@pytest.mark.slow  # ~45 s on the shared 2-core machine: five tiny training stages
def test_study_runs_offline_and_writes_the_comparison(tiny_data, tmp_path, monkeypatch):
    from moescope.btx.pipeline import run_study

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # tf-idf fallback keeps the test fast
    cfg = tiny_btx(tiny_data, strategies=["clustered"])
    with pytest.warns(UserWarning, match="tf-idf"):
        result = run_study(cfg, tmp_path / "study")
    names = [r["model"] for r in result["rows"]]
    assert "dense baseline" in names and "BTX merged (clustered)" in names
    assert any(n.startswith("c-BTM ensemble (clustered") for n in names)
    rows = {r["model"]: r for r in result["rows"]}
    # matched training compute: dense = branches + fine-tune
    assert rows["dense baseline"]["train_tokens"] == rows["BTX merged (clustered)"]["train_tokens"] == (2 * 3 + 2) * 4 * 32
    for r in result["rows"]:
        assert set(r["domains"]) == {"my_code", "my_math", "my_prose"}
        assert all(np.isfinite(v["loss"]) for v in r["domains"].values())
    init = json.loads((tmp_path / "study" / "merged" / "clustered" / "init" / "router_init.json").read_text())
    assert set(init["own_expert_share"]) == {"0", "1"}  # every block became an MoE layer
    assert (tmp_path / "study" / "comparison.md").read_text().count("|") > 20
    # a second call resumes: nothing is retrained, the same table comes back
    again = run_study(cfg, tmp_path / "study")
    assert [r["token_weighted"] for r in again["rows"]] == [r["token_weighted"] for r in result["rows"]]


def test_btx_command_rejects_a_missing_data_dir_and_unknown_keys(tmp_path, capsys):
    from moescope.cli import main

    assert main(["btx", "run", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a built data directory" in capsys.readouterr().err
    assert main(["btx", "run", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "branch_step=3"]) == 2
    assert "did you mean 'branch_steps'" in capsys.readouterr().err


@pytest.mark.slow  # five tiny training stages
def test_fitted_router_sends_each_partition_to_its_expert_and_the_fine_tune_does_not_hurt(tiny_data, tmp_path,
                                                                                          monkeypatch):
    from moescope.btx.pipeline import run_study

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    import dataclasses

    cfg = dataclasses.replace(tiny_btx(tiny_data, strategies=["clustered"], router_init="fit"), base_steps=20,
                              branch_steps=10, finetune_steps=4)
    with pytest.warns(UserWarning, match="tf-idf"):
        result = run_study(cfg, tmp_path / "study")
    init = json.loads((tmp_path / "study" / "merged" / "clustered" / "init" / "router_init.json").read_text())
    for block, share in init["routing_shares"].items():
        assert all(row[p] > 0.5 for p, row in enumerate(share)), (block, share)
    rows = {r["model"]: r for r in result["rows"]}
    before = rows["BTX merged (clustered), before fine-tune"]["token_weighted"]
    assert rows["BTX merged (clustered)"]["token_weighted"] <= before + 0.01
