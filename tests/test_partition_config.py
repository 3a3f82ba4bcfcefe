"""`moescope partition` settings: --config / --set like every command, one error type, a forced tf-idf
backend, --tokenizer for a curriculum model, and the default balance unit that keeps clusters intact."""

import json
import subprocess
import sys

import pytest

from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.partition.config import PartitionConfig

from test_partition_command import files_args, write_domain_files


@pytest.fixture(scope="module")
def minilm_cache(tmp_path_factory):
    """One embedding cache for this module's MiniLM runs."""
    return tmp_path_factory.mktemp("minilm-cache")


def test_invalid_settings_raise_the_user_error_type():
    with pytest.raises(MoescopeError, match="overlap_ratio"):
        PartitionConfig(overlap_ratio=2.0)
    with pytest.raises(MoescopeError, match="embedding_backend"):
        PartitionConfig(embedding_backend="bert")


def test_config_file_then_set_then_flags(tmp_path):
    paths = write_domain_files(tmp_path)
    cfg_file = tmp_path / "partition.toml"
    cfg_file.write_text('strategy = "random"\nn_partitions = 2\nseed = 3\noverlap_ratio = 0.0\n')
    out = tmp_path / "parts"
    rc = main(["partition", *files_args(paths), "--out", str(out), "--config", str(cfg_file),
               "--set", "n_partitions=4", "--set", "balance_tolerance=0.3", "--seed", "9"])
    assert rc == 0
    got = json.loads((out / "report.json").read_text())["config"]
    # file < --set < dedicated flag
    assert (got["strategy"], got["n_partitions"], got["balance_tolerance"], got["seed"]) == ("random", 4, 0.3, 9)
    assert got["overlap_ratio"] == 0.0


def test_unknown_key_names_the_closest_one(tmp_path, capsys):
    paths = write_domain_files(tmp_path)
    rc = main(["partition", *files_args(paths), "--out", str(tmp_path / "p"), "--set", "overlap_ration=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "overlap_ratio" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_tfidf_backend_is_forced_without_loading_a_model(tmp_path, monkeypatch, recwarn):
    # Any attempt to load sentence-transformers would fail: the forced backend must not try.
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    paths = write_domain_files(tmp_path)
    out = tmp_path / "parts"
    rc = main(["partition", *files_args(paths), "--out", str(out), "--embedding-backend", "tfidf", "--no-embedding-cache"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["embedding"]["backend"] == "tfidf-svd" and report["embedding"]["fallback_reason"] is None
    assert report["config"]["embedding_backend"] == "tfidf"
    assert not [w for w in recwarn if "tf-idf" in str(w.message)]  # chosen, so no fallback warning


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "moescope", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("moescope ")


def test_curriculum_model_without_a_tokenizer_takes_tokenizer_flag(tmp_path, capsys):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.data.tokenizer import train_bpe
    from moescope.moe.hf_model import save_moe_model

    from test_partition_texts import three_domains

    paths = write_domain_files(tmp_path)
    texts, _ = three_domains(n_each=4)
    tok = train_bpe(texts, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_moe_model(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)),
                   model_dir)
    tok.save_pretrained(tmp_path / "tok")
    args = ["partition", *files_args(paths), "--strategy", "curriculum", "--curriculum-model", str(model_dir)]
    rc = main([*args, "--out", str(tmp_path / "a")])
    assert rc == 2 and "no tokenizer" in capsys.readouterr().err
    rc = main([*args, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "b")])
    assert rc == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["config"]["curriculum_score"] == "perplexity"


@pytest.mark.parametrize("per_domain", [100, 200, pytest.param(None, marks=pytest.mark.slow)])
def test_default_balance_keeps_domains_together_on_the_builtin_corpus(per_domain, minilm_cache):
    """Clustered ARI >= 0.8 against the domains on the full built-in corpus (balanced in characters)
    and on per-domain subsamples (balanced in texts), where each fixed unit fails one of them."""
    from moescope.data.config import DataBuildConfig
    from moescope.partition.io import read_source_corpus
    from moescope.partition.partitioner import EmbeddingOptions, partition_texts, summarize_outcome

    corpus = read_source_corpus(DataBuildConfig()).subsample(per_domain, 0)
    outcome = partition_texts(corpus.texts, PartitionConfig(), domains=corpus.domains,
                              embedding=EmbeddingOptions(cache_dir=minilm_cache, show_progress=False))
    report = summarize_outcome(outcome)
    assert report["adjusted_rand_index"] >= 0.8, report["silhouette_by_unit"]
    # the unit auto chose is the one whose clustering alone recovers the domains
    fixed = "texts" if per_domain else "chars"
    assert report["balance_unit_chosen"] == fixed
