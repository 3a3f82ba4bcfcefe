"""`moescope partition` end to end on local files and a data directory; outputs usable as a files source."""

import json
import sys

import numpy as np
import pytest

from moescope.cli import main
from moescope.data.config import DomainConfig, SourceConfig
from moescope.data.sources import load_domain_texts
from moescope.partition.io import partition_dirs, read_partition_texts

from test_partition_texts import three_domains


def write_domain_files(root, n_each=12):
    texts, domains = three_domains(n_each=n_each)
    paths = {}
    for d in ("code", "math", "prose"):
        path = root / f"{d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t, dd in zip(texts, domains) if dd == d))
        paths[f"my_{d}"] = path  # not the built-in names, so no built-in length filter applies
    return paths


def files_args(paths):
    return [a for d, p in paths.items() for a in ("--files", f"{d}={p}")]


def test_random_partition_of_files_writes_usable_partition_dirs(tmp_path, capsys):
    paths = write_domain_files(tmp_path)
    out = tmp_path / "parts"
    rc = main(["partition", *files_args(paths), "--out", str(out), "-n", "3", "--strategy", "random", "--seed", "5"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    n = report["n_texts_kept"]
    assert n == report["n_texts_input"] >= 34 and report["within_band"]  # the source drops exact duplicates
    assert (out / "report.md").is_file() and (out / "partition_domains.png").stat().st_size > 1000
    dirs = partition_dirs(out)
    assert [d.name for d in dirs] == ["partition_00", "partition_01", "partition_02"]
    total_own = 0
    for p, d in enumerate(dirs):
        recs = read_partition_texts(d)
        assert len(recs) == report["sizes"][p]
        total_own += sum(r["copy"] == "own" for r in recs)
        # the directory is a data source of the data pipeline
        src = DomainConfig(name=f"p{p}", source=SourceConfig(backend="files", paths=[str(d)]), min_chars=1)
        loaded = load_domain_texts(src)
        assert sorted(t.text for t in loaded) == sorted({r["text"] for r in recs})
    assert total_own == n
    # same seed -> same partitions
    out2 = tmp_path / "parts2"
    main(["partition", *files_args(paths), "--out", str(out2), "-n", "3", "--strategy", "random", "--seed", "5"])
    for a, b in zip(partition_dirs(out), partition_dirs(out2)):
        assert (a / "texts.jsonl").read_text() == (b / "texts.jsonl").read_text()


def test_clustered_fallback_from_a_data_directory_records_centroids(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    texts, domains = three_domains(n_each=10)
    data = tmp_path / "data"
    splits = {"train": {}, "eval": {}}
    for d in ("code", "math", "prose"):
        path = data / "texts" / "train" / f"{d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = [t for t, dd in zip(texts, domains) if dd == d]
        path.write_text("".join(json.dumps({"text": t, "id": f"{d}-{i}"}) + "\n" for i, t in enumerate(mine)))
        splits["train"][d] = splits["eval"][d] = {"n_blocks": 0}
    (data / "manifest.json").write_text(json.dumps({"format_version": 1, "block_size": 8, "vocab_size": 10,
                                                     "dtype": "uint16", "domains": ["code", "math", "prose"],
                                                     "eos_token_id": 0, "splits": splits}))
    out = tmp_path / "parts"
    with pytest.warns(UserWarning, match="tf-idf"):
        rc = main(["partition", "--data", str(data), "--out", str(out), "--overlap-ratio", "0", "--balance-unit", "texts"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["embedding"]["backend"] == "tfidf-svd" and report["adjusted_rand_index"] == pytest.approx(1.0)
    assert np.load(out / "centroids.npy").shape[0] == 3 and (out / "encoder.npz").is_file()
    ids = {r["id"] for d in partition_dirs(out) for r in read_partition_texts(d)}
    assert ids == {f"{d}-{i}" for d in ("code", "math", "prose") for i in range(10)}


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    paths = write_domain_files(tmp_path, n_each=1)
    out = tmp_path / "parts"
    rc = main(["partition", *files_args(paths), "--out", str(out), "-n", "4", "--strategy", "random"])
    assert rc == 2 and "cannot split 3 text(s) into 4 partitions" in capsys.readouterr().err
    out.mkdir()
    rc = main(["partition", *files_args(paths), "--out", str(out), "-n", "2", "--strategy", "random"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = main(["partition", *files_args(paths), "--out", str(tmp_path / "x"), "--overlap-ratio", "2"])
    assert rc == 2 and "overlap_ratio" in capsys.readouterr().err


def test_curriculum_perplexity_scores_match_a_hand_computed_nll(tmp_path):
    import math

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.data.tokenizer import train_bpe
    from moescope.moe.hf_model import save_moe_model
    from moescope.partition.scoring import score_perplexity

    texts, _ = three_domains(n_each=4)
    tok = train_bpe(texts, vocab_size=300, min_frequency=1)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    save_moe_model(model, model_dir)
    tok.save_pretrained(model_dir / "tokenizer")
    scores = score_perplexity(texts[:3], model_dir, max_tokens=32, show_progress=False)
    model.eval()
    for text, got in zip(texts[:3], scores):
        ids = torch.tensor([tok(text)["input_ids"][:32]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean().item()
        assert got == pytest.approx(math.exp(nll), rel=1e-4)
