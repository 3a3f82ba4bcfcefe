"""Hostile input through the real CLI: every refusal is exit code 2 and one line naming the file or
value, before anything is written (the tiny run and data of test_analysis_pipeline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_analysis_pipeline import write_data, write_run
from train_fixtures import one_thread  # noqa: F401

from moescope.cli import main
from moescope.io.manifest import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--no-progress", "--resamples", "20", "--permutations", "9"]


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A finished run whose final/ models carry the sha256 manifest training writes."""
    tokenizer = write_data(tmp_path / "data")
    write_run(tmp_path / "run", tmp_path / "data", len(tokenizer))
    for arm in ("dense", "moe"):
        write_manifest(tmp_path / "run" / "arms" / arm / "final", 8)
    return tmp_path / "run"


def error_line(capsys) -> str:
    """The one line the CLI printed for a refusal (no traceback, nothing else on stderr)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("moescope: error: "), err
    return err[0]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_analyze_refuses_a_final_model_changed_since_training_before_writing(run_dir: Path, capsys) -> None:
    weights = run_dir / "arms" / "moe" / "final" / "model.safetensors"
    flip_a_byte(weights)
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert str(weights) in line and "sha256" in line
    assert not (run_dir / "analysis").exists()  # the intact dense arm was not analysed either


def test_analyze_refuses_a_final_model_whose_manifest_was_deleted(run_dir: Path, capsys) -> None:
    """A stage's summary.json records its final/ manifest's digest, as training writes it: deleting the
    manifest does not turn the changed weights into an 'older run' that is trusted unchecked."""
    from moescope.io.provenance import sha256_file

    final = run_dir / "arms" / "moe" / "final"
    (final.parent / "summary.json").write_text(json.dumps({"steps": 8,
                                                           "final_manifest_sha256": sha256_file(final / "manifest.json")}))
    (final / "manifest.json").unlink()
    flip_a_byte(final / "model.safetensors")
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert str(final / "manifest.json") in line and "summary.json recorded" in line
    assert not (run_dir / "analysis").exists()

@pytest.mark.parametrize("summary, says", [("{not json", "not valid JSON"), ('{"final_manifest_sha256": 7}', "sha256 hex digest")])
def test_analyze_refuses_a_final_model_whose_summary_is_damaged_and_manifest_deleted(
        run_dir: Path, capsys, summary: str, says: str) -> None:
    """A damaged summary.json is not read as 'no digest recorded' (an older run, trusted unchecked)."""
    final = run_dir / "arms" / "moe" / "final"
    (final.parent / "summary.json").write_text(summary)
    (final / "manifest.json").unlink()
    flip_a_byte(final / "model.safetensors")
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert str(final.parent / "summary.json") in line and says in line
    assert not (run_dir / "analysis").exists()



def test_cluster_refuses_a_final_model_whose_manifest_was_deleted(run_dir: Path, capsys) -> None:
    """Every loader of a stage's final/ (here cluster's, through io/saved_model) reads the digest its
    summary.json recorded."""
    from moescope.io.provenance import sha256_file

    final = run_dir / "arms" / "moe" / "final"
    (final.parent / "summary.json").write_text(json.dumps({"final_manifest_sha256": sha256_file(final / "manifest.json")}))
    (final / "manifest.json").unlink()
    out = run_dir.parent / "cluster"
    assert main(["cluster", str(run_dir), "--out", str(out), "--batches", "2", "--no-null"]) == 2
    assert str(final / "manifest.json") in error_line(capsys)
    assert not out.exists()


def test_cluster_refuses_a_final_model_changed_since_training(run_dir: Path, capsys) -> None:
    config = run_dir / "arms" / "moe" / "final" / "config.json"
    config.write_text(config.read_text().replace('"n_embd": 16', '"n_embd": 16 '))
    out = run_dir.parent / "cluster"
    assert main(["cluster", str(run_dir), "--out", str(out), "--batches", "2", "--no-null"]) == 2
    assert str(config) in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("name, content, says", [
    ("experiment.json", "[]", "expected a JSON object, got a list"),
    ("experiment.json", '"run"', "expected a JSON object, got a string"),
    ("experiment.json", '{"experiment": {}, "arms": ["moe"]}', "'arms' must be an object"),
    ("experiment.json", '{"experiment": {}}', "no 'arms' entry"),
    ("experiment.json", '{"experiment": {}, "arms": {"../../escaped": {}}}', "arm '../../escaped' cannot name"),
    ("experiment.json", '{"experiment": {}, "arms": {"/tmp/abs": {}}}', "arm '/tmp/abs' cannot name"),
])
def test_a_run_json_file_of_the_wrong_shape_is_one_line(run_dir: Path, capsys, name: str, content: str,
                                                       says: str) -> None:
    (run_dir / name).write_text(content)
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert str(run_dir / name) in line and says in line
    assert not (run_dir / "analysis").exists()


@pytest.mark.parametrize("content, says", [("[]", "expected a JSON object"), ('{"arms": 3}', "'arms' must be an object"),
                                           ('{"arms": {"../../x": {"kind": "moe"}}}', "arm '../../x' cannot name")])
def test_report_and_compare_refuse_a_metrics_file_of_the_wrong_shape(tmp_path: Path, capsys, content: str,
                                                                    says: str) -> None:
    metrics = tmp_path / "run" / "analysis" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(content)
    assert main(["report", str(tmp_path / "run")]) == 2
    assert str(metrics) in error_line(capsys)
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--out", str(tmp_path / "cmp")]) == 2
    line = error_line(capsys)
    assert str(metrics) in line and says in line
    assert not (tmp_path / "run" / "report").exists() and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("damage, says", [
    (lambda m: m.pop("splits"), "lacks 'splits'"),
    (lambda m: m["splits"].pop("eval"), "no 'eval' split"),
    (lambda m: m["splits"]["eval"].pop("math"), "splits.eval lacks domain 'math'"),
])
def test_a_data_manifest_missing_a_split_or_domain_is_one_line(run_dir: Path, capsys, damage, says: str) -> None:
    manifest = run_dir.parent / "data" / "manifest.json"
    m = json.loads(manifest.read_text())
    damage(m)
    manifest.write_text(json.dumps(m))
    for command in (["analyze", str(run_dir), *FAST], ["data", "inspect", str(manifest.parent)]):
        assert main(command) == 2
        line = error_line(capsys)
        assert str(manifest) in line and says in line
    assert not (run_dir / "analysis").exists() and not (manifest.parent / "inspect").exists()


@pytest.mark.parametrize("arms, says", [(",", "an empty arm name"), ("moe,", "an empty arm name"),
                                        ("", "an empty arm name"), ("moe,nope", "unknown arm 'nope'")])
def test_analyze_arms_empty_or_unknown_is_one_line_listing_the_arms(run_dir: Path, capsys, arms: str,
                                                                   says: str) -> None:
    assert main(["analyze", str(run_dir), f"--arms={arms}", *FAST]) == 2
    line = error_line(capsys)
    assert says in line and line.endswith("are dense, moe")
    assert not (run_dir / "analysis").exists()


@pytest.mark.parametrize("command, says", [
    (["cluster", "RUN", "--alpha", "nan"], "--alpha (merge.alpha) must be a finite number >= 0, got nan"),
    (["cluster", "RUN", "--alpha", "inf"], "--alpha (merge.alpha) must be a finite number >= 0, got inf"),
    (["cluster", "RUN", "--alpha", "-0.5"], "--alpha (merge.alpha) must be >= 0, got -0.5"),
    (["cluster", "RUN", "--set", "merge.alpha=-1"], "merge.alpha must be >= 0, got -1"),
    (["cluster", "RUN", "--tokens-per-batch", "0"], "--tokens-per-batch (capture.tokens_per_batch) must be >= 1"),
    (["partition", "--files", "a=A", "--out", "OUT", "--target-mb", "nan"], "--target-mb (target_mb) must be a finite number > 0"),
    (["partition", "--files", "a=A", "--out", "OUT", "--overlap-ratio", "inf"], "--overlap-ratio (overlap_ratio) must be a finite"),
    (["partition", "--files", "a=A", "--out", "OUT", "--max-texts-per-domain", "-3"], "--max-texts-per-domain (max_texts_per_domain) must be >= 1"),
    (["data", "build", "--out", "OUT", "--files", "a=A", "--target-mb", "inf"], "--target-mb (target_mb) must be a finite number > 0"),
    (["analyze", "RUN", "--set", "statistics.confidence_level=.nan"], "statistics.confidence_level: expected a finite number"),
    (["embed", "encode", "MODEL", "--input", "A", "--top-k", "0"], "--top-k (top_k) must be >= 1, got 0"),
])
def test_a_number_flag_out_of_range_or_not_finite_is_one_line_naming_it(tmp_path: Path, capsys, command: list[str],
                                                                       says: str) -> None:
    """Checked before any model, data or output is touched (RUN, A, MODEL need not even exist)."""
    command = [str(tmp_path / c) if c in ("RUN", "OUT", "A", "MODEL") else c.replace("a=A", f"a={tmp_path / 'A'}")
               for c in command]
    assert main(command) == 2
    assert says in error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("executor, hide_submitit, says", [
    ("slurm", False, "needs SLURM, but sbatch and srun are not on PATH"),
    ("slurm", True, "--executor slurm needs submitit, which is not installed"),
    ("submitit-local", True, "--executor submitit-local needs submitit"),
])
def test_sweep_executor_missing_on_this_machine_is_one_line_before_anything(tmp_path: Path, capsys, monkeypatch,
                                                                            executor: str, hide_submitit: bool,
                                                                            says: str) -> None:
    import sys

    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch / srun here
    if hide_submitit:
        monkeypatch.setitem(sys.modules, "submitit", None)  # import raises ImportError
    out = tmp_path / "sweep"
    assert main(["sweep", "demo", "--out", str(out), "--executor", executor]) == 2
    assert says in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("value", ["four", [2], None])
def test_a_model_config_value_of_the_wrong_type_is_one_line_naming_the_file(tmp_path: Path, capsys, value) -> None:
    """As analyze RUN, analyze --model and train --base load it (final/ without a manifest: an older run)."""
    tokenizer = write_data(tmp_path / "data")
    write_run(tmp_path / "run", tmp_path / "data", len(tokenizer))
    final = tmp_path / "run" / "arms" / "dense" / "final"
    config = json.loads((final / "config.json").read_text())
    config["n_layer"] = value
    (final / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    for command in (["analyze", str(tmp_path / "run"), "--arms", "dense", *FAST],
                    ["analyze", "--model", str(final), "--data", str(tmp_path / "data"), "--out", str(out),
                     "--no-progress"]):
        assert main(command) == 2
        line = error_line(capsys)
        assert str(final / "config.json") in line and "n_layer" in line
    assert not out.exists() and not (tmp_path / "run" / "analysis").exists()
    from moescope.errors import MoescopeError
    from moescope.train.model import load_init_model

    with pytest.raises(MoescopeError, match="config.json: unusable model config .*n_layer"):
        load_init_model(final)


@pytest.mark.parametrize("damage", ["remove", "empty"])
def test_a_data_directory_without_its_tokenizer_is_one_line_naming_it(run_dir: Path, capsys, damage: str) -> None:
    import shutil

    data = run_dir.parent / "data"
    shutil.rmtree(data / "tokenizer")
    if damage == "empty":
        (data / "tokenizer").mkdir()
    for command in (["analyze", str(run_dir), *FAST], ["data", "inspect", str(data)]):
        assert main(command) == 2
        line = error_line(capsys)
        assert f"{data}: the data directory has no tokenizer" in line
    assert not (run_dir / "analysis").exists() and not (data / "inspect").exists()


def test_a_tokenizer_path_that_does_not_exist_is_named_not_taken_for_a_hub_id(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no" / "such" / "tokenizer"
    assert main(["data", "build", "--out", str(tmp_path / "data"), "--tokenizer", "gpt2",
                 "--tokenizer-path", str(missing)]) == 2
    assert f"cannot load tokenizer {str(missing)!r}: no such directory" in error_line(capsys)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("damage", ["token", "text"])
def test_analyze_refuses_bad_blocks_or_texts_before_writing(run_dir: Path, capsys, damage: str) -> None:
    """A token id past the vocabulary (an IndexError in the forward pass) or an eval text line that is
    not {"text": str} (read after the first routing tables were written) is one line before anything."""
    import numpy as np

    data = run_dir.parent / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    if damage == "token":
        bad = data / "blocks" / "eval" / "prose.bin"
        tokens = np.fromfile(bad, dtype=manifest["dtype"])
        tokens[3] = manifest["vocab_size"]
        tokens.tofile(bad)
    else:
        bad = data / "texts" / "eval" / "code.jsonl"
        bad.write_text('{"text": 5}\n')
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert str(bad) in line and (f"token id {manifest['vocab_size']}" in line if damage == "token" else ":1:" in line)
    assert not (run_dir / "analysis").exists()


def _save_tiny_moe(directory: Path, vocab: int, n_experts: int) -> None:
    """A model of write_run's shape with `n_experts` experts (one from another run)."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.moe.config import MoEConfig
    from moescope.moe.hf_model import save_moe_model
    from moescope.moe.install import install_moe

    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=vocab))
    install_moe(model, MoEConfig(n_experts=n_experts, top_k=1, layers=[0, 1]))
    shutil.rmtree(directory)
    save_moe_model(model, directory)


@pytest.mark.parametrize("damage", ["truncated", "empty", "other_run", "other_weights"])
def test_analyze_refuses_a_damaged_or_foreign_snapshot_before_writing(run_dir: Path, capsys, damage: str) -> None:
    """A snapshot is checked with the final model, before anything is written: a truncated weights file
    is named (safetensors' message names none), one from a run with another expert count is refused."""
    snapshot = run_dir / "arms" / "moe" / "snapshots" / "step_000004"
    weights = snapshot / "model.safetensors"
    vocab = json.loads((run_dir / "arms" / "moe" / "final" / "config.json").read_text())["vocab_size"]
    if damage in ("truncated", "empty"):
        weights.write_bytes(weights.read_bytes()[:500] if damage == "truncated" else b"")
        says, named = "unreadable safetensors file", weights
    elif damage == "other_run":
        _save_tiny_moe(snapshot, vocab, n_experts=8)
        says, named = "'n_experts': 8", snapshot
    else:  # the weights alone swapped: the snapshot's moe_config.json still says 4 experts
        other = run_dir.parent / "other"
        other.mkdir()
        _save_tiny_moe(other, vocab, n_experts=8)
        weights.write_bytes((other / "model.safetensors").read_bytes())
        says, named = "the snapshot comes from another run", weights
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert f"{named}:" in line and says in line
    assert not (run_dir / "analysis").exists()


def test_analyze_refuses_a_final_model_other_than_experiment_json_records(run_dir: Path, capsys) -> None:
    """experiment.json records each arm's resolved config: a final/ (with its summary) of another
    expert count, swapped in from another run, is refused naming it."""
    from moescope.analysis.pipeline import check_arm_models, read_experiment

    moe = {"arch": "moe", "moe": {"n_experts": 4, "top_k": 1, "layers": [1, 0]}}
    record = {"experiment": {"data_dir": str(run_dir.parent / "data")},
              "arms": {"dense": {"config": {"arch": "dense"}}, "moe": {"config": moe}}}
    (run_dir / "experiment.json").write_text(json.dumps(record))
    for arm in ("dense", "moe"):  # as recorded: accepted
        check_arm_models(run_dir, arm, read_experiment(run_dir))
    moe["moe"]["n_experts"] = 8
    (run_dir / "experiment.json").write_text(json.dumps(record))
    assert main(["analyze", str(run_dir), *FAST]) == 2
    line = error_line(capsys)
    assert f"{run_dir / 'arms' / 'moe' / 'final'}: MoE settings" in line and "'n_experts': 8" in line
    assert not (run_dir / "analysis").exists()
    record["arms"]["dense"]["config"] = moe  # a dense final/ where the record says MoE
    moe["moe"]["n_experts"] = 4
    (run_dir / "experiment.json").write_text(json.dumps(record))
    assert main(["analyze", str(run_dir), *FAST]) == 2
    assert f"{run_dir / 'arms' / 'dense' / 'final'}: MoE settings dense differ" in error_line(capsys)


def test_analyze_on_a_run_directory_another_process_holds_is_one_line_and_writes_nothing(run_dir: Path,
                                                                                         capsys) -> None:
    """Two analyses (or an analysis and a `train --resume`) on one run would race over RUN/analysis: the
    second is refused naming the holder, as a second training process is."""
    from moescope.io.lock import run_directory_lock

    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with run_directory_lock(run_dir):
        assert main(["analyze", str(run_dir), *FAST]) == 2
        line = error_line(capsys)
        assert f"{run_dir} is in use by process {os.getpid()}" in line, line
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert main(["analyze", str(run_dir), *FAST]) == 0  # released: the run analyses, and the lock is gone after
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".moescope.lock")]
