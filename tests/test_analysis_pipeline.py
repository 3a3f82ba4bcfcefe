"""`moescope analyze` end to end on a hand-built run directory (tiny models, tiny corpus)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from train_fixtures import one_thread  # noqa: F401
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from moescope.analysis import capture
from moescope.analysis.pipeline import AnalyzeConfig, analyze_run, route_texts
from moescope.analysis.summary import SummaryConfig
from moescope.cli import main
from moescope.data.blocks import FORMAT_VERSION, block_path, dtype_for_vocab, texts_path, tokenizer_dir
from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig
from moescope.moe.hf_model import save_moe_model
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is much faster here

BLOCK = 32


def corpus(rng: np.random.Generator) -> dict[str, list[str]]:
    code = [
        f"def f{i}(x):\n    \"\"\"Add {i}.\"\"\"\n    return x + {i}  # add\n\n\nclass C{i}:\n    pass\n" for i in range(12)
    ]
    math = [f"What is {a} plus {b}?\n\n{a} + {b} = {a + b}, so the answer is {a + b}."
            for a, b in rng.integers(1, 99, size=(12, 2))]
    prose = [f"The {w} walked to the river and saw {n} birds in the morning light.\n\nIt was calm."
             for w, n in zip(["cat", "dog", "fox", "man"] * 3, range(12))]
    return {"code": code, "math": math, "prose": prose}


def write_data(root: Path) -> PreTrainedTokenizerFast:
    texts = corpus(np.random.default_rng(0))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([t for ts in texts.values() for t in ts], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(str(tokenizer_dir(root)))
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    dtype = dtype_for_vocab(vocab)
    splits: dict = {"train": {}, "eval": {}}
    for name, docs in texts.items():
        for split, part in (("train", docs[:6]), ("eval", docs[6:])):
            path = texts_path(root, split, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"text": t, "id": f"{name}-{i}"}) + "\n" for i, t in enumerate(part)))
            stream = [t for doc in part for t in tokenizer(doc)["input_ids"] + [eos]]
            n = len(stream) // BLOCK
            bp = block_path(root, split, name)
            bp.parent.mkdir(parents=True, exist_ok=True)
            np.array(stream[: n * BLOCK], dtype=dtype).tofile(bp)
            splits[split][name] = {"n_blocks": n}
    manifest = {"format_version": FORMAT_VERSION, "block_size": BLOCK, "vocab_size": vocab, "eos_token_id": eos,
                "dtype": dtype.name, "domains": list(texts), "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tokenizer


def write_run(run: Path, data: Path, vocab: int) -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=vocab)
    dense = GPT2LMHeadModel(cfg)
    save_moe_model(dense, run / "arms" / "dense" / "final")
    moe = GPT2LMHeadModel(cfg)
    install_moe(moe, MoEConfig(n_experts=4, top_k=1, layers=[0, 1]))
    for layer in moe_layers(moe).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    save_moe_model(moe, run / "arms" / "moe" / "snapshots" / "step_000004")
    with torch.no_grad():  # the "final" model: router of layer 1 moved a little since the snapshot
        moe_layers(moe)[1].router.weight.add_(torch.randn_like(moe_layers(moe)[1].router.weight) * 0.5)
    save_moe_model(moe, run / "arms" / "moe" / "snapshots" / "step_000008")
    save_moe_model(moe, run / "arms" / "moe" / "final")
    (run / "experiment.json").write_text(json.dumps({
        "experiment": {"data_dir": str(data)}, "arms": {"dense": {}, "moe": {}},
    }))


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    tokenizer = write_data(tmp_path / "data")
    write_run(tmp_path / "run", tmp_path / "data", len(tokenizer))
    return tmp_path / "run"


FAST = AnalyzeConfig(statistics=SummaryConfig(n_resamples=200, n_permutations=99, vocab_min_count=3),
                     viewer_samples_per_domain=2, format_test_max_texts=4)


def test_analyze_run_writes_metrics_and_viewer(run_dir: Path) -> None:
    result = analyze_run(run_dir, FAST, progress=False)
    out = run_dir / "analysis"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["arms"].keys() == {"dense", "moe"}
    assert on_disk["domains"] == ["code", "math", "prose"]
    dense, moe = on_disk["arms"]["dense"], on_disk["arms"]["moe"]
    assert dense["kind"] == "dense" and "layers" not in dense
    for arm in (dense, moe):
        loss = arm["eval_loss"]["token_weighted"]
        assert loss["low"] <= loss["estimate"] <= loss["high"]
        assert set(arm["eval_loss"]["domains"]) == {"code", "math", "prose"}
    assert set(moe["layers"]) == {"0", "1"}
    layer = moe["layers"]["1"]
    assert 0 <= layer["specialization"]["nmi"]["estimate"] <= 1
    assert 0 < layer["specialization"]["nmi_pvalue"] <= 1
    assert np.array(layer["specialization"]["expert_given_domain"]).shape == (3, 4)
    assert moe["headline"]["best_layer"] in (0, 1)
    # token types were found in the code blocks
    types = moe["token_types"]["1"]
    assert "keyword" in types["top_expert"]
    # every code token is typed, also in blocks cut mid-document (located in the re-tokenized texts)
    from moescope.data.blocks import BlockStore

    store = BlockStore.open(run_dir.parent / "data")
    code_blocks = store.blocks("eval", "code")
    assert types["n_tokens"] == int((code_blocks != store.eos_token_id).sum())
    # format test: math texts split at the blank line, content tokens aligned
    ft = moe["format_test"]
    assert ft["n_texts"]["math"] == 4 and ft["n_texts"]["code"] == 4
    assert 0 <= ft["layers"]["1"]["js_divergence_of_means"] <= 1
    assert set(ft["layers"]["1"]["reference_token_js_divergence"]) == {"same domain", "different domains"}
    assert "math vs code" in ft["layers"]["1"]["reference_domain_js_divergence"] or \
        "code vs math" in ft["layers"]["1"]["reference_domain_js_divergence"]
    # saturation: layer 0 never changed, layer 1 did; the last snapshot equals the final model
    sat = moe["saturation"]
    assert sat["steps"] == [4, 8]
    assert sat["layers"]["0"] == [1.0, 1.0]
    assert sat["layers"]["1"][1] == 1.0 and sat["layers"]["1"][0] < 1.0
    assert sat["baseline"] == pytest.approx(0.25)
    assert result["arms"]["moe"]["headline"] == on_disk["arms"]["moe"]["headline"]
    assert "NaN" not in (out / "metrics.json").read_text()
    # data written without blocks/eval/*.sources.npy: every block its own unit, and the header says why
    header = on_disk["statistics"]
    assert header["unit"] == "eval block" and "sources.npy missing" in header["unit_note"]
    assert header["n_units"] == {d: store.n_blocks("eval", d) for d in store.domains}
    assert layer["n_units"] == layer["n_blocks"] == on_disk["n_eval_blocks"]
    assert moe["eval_loss_vs_dense"]["n_units"] == moe["eval_loss_vs_dense"]["n_blocks"]

    viewer = json.loads((out / "viewer.json").read_text())
    assert set(viewer["arms"]) == {"moe"}
    arm = viewer["arms"]["moe"]
    assert arm["layers"] == [0, 1] and arm["n_experts"] == 4
    assert len(arm["samples"]) == 6
    sample = arm["samples"][0]
    assert sample["domain"] == "code"
    assert len(sample["tokens"]) == len(sample["experts"]["1"]) == len(sample["probs"]["0"]) == BLOCK
    assert all(0 <= e < 4 for e in sample["experts"]["0"])
    assert (out / "routing" / "moe" / "1.npz").is_file()


def test_analyze_cli_and_errors(run_dir: Path, capsys) -> None:
    code = main(["analyze", str(run_dir), "--arms", "moe", "--resamples", "100", "--permutations", "49",
                 "--set", "format_test_max_texts=2", "--set", "saturation_max_blocks_per_domain=2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "moe" in printed and "NMI" in printed and "metrics.json" in printed
    assert json.loads((run_dir / "analysis" / "metrics.json").read_text())["statistics"]["n_resamples"] == 100
    with pytest.raises(MoescopeError, match="nolb"):
        analyze_run(run_dir, FAST, arms=["moe-nolb"], progress=False)
    with pytest.raises(MoescopeError, match="experiment.json"):
        analyze_run(run_dir / "arms", FAST, progress=False)
    assert main(["analyze", str(run_dir), "--set", "statistics.n_resample=5"]) == 2  # typo: one-line error


def test_route_texts_batched_equals_alone(tmp_path: Path) -> None:
    tokenizer = write_data(tmp_path / "data")
    write_run(tmp_path / "run", tmp_path / "data", len(tokenizer))
    from moescope.moe.hf_model import load_moe_model

    model = load_moe_model(tmp_path / "run" / "arms" / "moe" / "final")
    for layer in moe_layers(model).values():
        layer.capture = True
    texts = ["def f(x):\n    return x", "What is 3 plus 4?\n\n3 + 4 = 7", "The cat."]
    together = route_texts(model, tokenizer, texts, 64, batch_texts=3)
    for text, (offsets, routed) in zip(texts, together):
        (alone_offsets, alone), = route_texts(model, tokenizer, [text], 64)
        assert list(offsets) == list(alone_offsets) and len(offsets) == len(tokenizer(text)["input_ids"])
        for i in routed:
            np.testing.assert_allclose(routed[i][0], alone[i][0], atol=1e-5)
            np.testing.assert_array_equal(routed[i][1], alone[i][1])


def test_shared_experts_of_a_moescope_arm_are_named_not_counted(run_dir: Path) -> None:
    """A moe-shared arm: metrics name its always-on experts per layer and count only routed ones."""
    torch.manual_seed(1)
    vocab = json.loads((run_dir.parent / "data" / "manifest.json").read_text())["vocab_size"]
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=vocab))
    install_moe(model, MoEConfig(n_experts=4, top_k=2, layers=[0, 1], n_shared_experts=1, expert_granularity=2))
    save_moe_model(model, run_dir / "arms" / "moe-shared" / "final")
    exp = json.loads((run_dir / "experiment.json").read_text())
    exp["arms"]["moe-shared"] = {}
    (run_dir / "experiment.json").write_text(json.dumps(exp))
    result = analyze_run(run_dir, FAST, arms=["moe-shared"], progress=False)
    for layer in result["arms"]["moe-shared"]["layers"].values():
        # 4 experts x granularity 2 = 8 slices, 1 of them shared: 7 routed experts, top-(2x2 - 1)
        assert layer["n_shared_experts"] == 1 and layer["n_experts"] == 7 and layer["top_k"] == 3
        assert len(layer["load"]["token_fraction"]) == 7
        # slice 0 of coarse expert 0 is the shared one; routed r is slice r + 1 of coarse (r + 1) // 2
        assert layer["expert_granularity"] == 2 and layer["expert_parent"] == [0, 1, 1, 2, 2, 3, 3]
    from moescope.report.figures import plot_expert_given_domain_compact

    path = plot_expert_given_domain_compact(result, ["moe-shared"], run_dir / "fig.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("flags, key", [(["--permutations", "0"], "statistics.n_permutations"),
                                        (["--resamples", "-5"], "statistics.n_resamples"),
                                        (["--seed", "-1"], "statistics.seed"),
                                        (["--max-blocks-per-domain", "-3"], "max_blocks_per_domain"),
                                        (["--set", "statistics.confidence_level=1.5"], "confidence_level")])
def test_unusable_analysis_settings_are_refused_before_any_capture(tmp_path: Path, capsys, flags, key) -> None:
    run = tmp_path / "run"
    run.mkdir()
    capsys.readouterr()
    assert main(["analyze", str(run), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not any(run.iterdir())


def test_start_nmi_from_the_step_0_snapshot_leaves_every_other_number_unchanged(run_dir: Path) -> None:
    """The step-0 snapshot's NMI and the paired change are added per layer; nothing else moves."""
    import shutil

    without = analyze_run(run_dir, FAST, progress=False)
    # a step-0 snapshot whose layer-0 router equals the final model's and whose layer-1 router differs
    shutil.copytree(run_dir / "arms" / "moe" / "snapshots" / "step_000004",
                    run_dir / "arms" / "moe" / "snapshots" / "step_000000")
    with_start = analyze_run(run_dir, FAST, progress=False)
    a, b = without["arms"]["moe"], with_start["arms"]["moe"]
    for layer in ("0", "1"):
        spec = dict(b["layers"][layer]["specialization"])
        new = {key: spec.pop(key) for key in ("nmi_start", "nmi_change", "nmi_start_step")}
        assert {**b["layers"][layer], "specialization": spec} == a["layers"][layer]  # existing numbers bit for bit
        assert new["nmi_start_step"] == 0
        change = new["nmi_change"]
        assert change["low"] <= change["estimate"] <= change["high"]
        if layer == "0":  # router unchanged: the start is the final model's NMI, the change 0
            assert new["nmi_start"] == spec["nmi"] and change == {"estimate": 0.0, "low": 0.0, "high": 0.0}
        else:
            assert change["estimate"] == pytest.approx(spec["nmi"]["estimate"] - new["nmi_start"]["estimate"])
            assert change["estimate"] != 0.0
    best = b["headline"]
    assert best["nmi_start"] == b["layers"][str(best["best_layer"])]["specialization"]["nmi_start"]
    assert {k: v for k, v in best.items() if k not in ("nmi_start", "nmi_change")} == a["headline"]
    assert "nmi_start" not in with_start["arms"]["dense"] and a["eval_loss"] == b["eval_loss"]
    assert b["eval_loss_vs_dense"] == a["eval_loss_vs_dense"] and b["format_test"] == a["format_test"]
    assert b["saturation"]["steps"] == [0, 4, 8]


def test_with_block_sources_the_intervals_resample_the_documents(run_dir: Path) -> None:
    """A data directory that records each block's texts: one unit per source document of a block's first
    token, in the header, every layer, the paired loss test and the report's wording."""
    from transformers import AutoTokenizer

    from moescope.data.blocks import BlockStore, block_sources_path
    from moescope.data.packing import block_sources
    from moescope.data.units import UNIT_DOCUMENT
    from moescope.report.build import build_report

    data = run_dir.parent / "data"
    store = BlockStore.open(data)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(data)))
    first_texts = {}
    for d in store.domains:  # what `moescope data` writes: each text's end in the EOS-joined stream
        ends = np.cumsum([len(tok(r["text"])["input_ids"]) + 1 for r in store.texts("eval", d)])
        sources = block_sources(ends, store.n_blocks("eval", d), BLOCK)
        np.save(block_sources_path(data, "eval", d), sources)
        first_texts[d] = len(set(sources[:, 1].tolist()))
    metrics = analyze_run(run_dir, FAST, arms=["dense", "moe"], progress=False)
    header = metrics["statistics"]
    assert header["unit"] == UNIT_DOCUMENT and "unit_note" not in header
    assert header["n_units"] == first_texts  # each text is its own document here
    moe = metrics["arms"]["moe"]
    n_units = sum(first_texts.values())
    assert n_units < metrics["n_eval_blocks"]
    assert all(layer["n_units"] == n_units for layer in moe["layers"].values())
    assert moe["eval_loss_vs_dense"]["n_units"] == n_units
    assert "units" in moe["eval_loss_vs_dense"]["test"]
    build_report(run_dir, run_dir / "report")
    html = (run_dir / "report" / "report.html").read_text()
    assert "shuffling domain labels between source documents" in html
    assert "between blocks" not in html


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".analysis"))


@pytest.mark.parametrize("fail_at", ["viewer.json", "routing"])
def test_a_reanalysis_that_dies_late_leaves_the_old_analysis_whole(run_dir: Path, monkeypatch, fail_at: str) -> None:
    """An analysis that fails after its first writes (here: the last JSON write, or the last routing table)
    leaves RUN/analysis exactly as the previous analysis wrote it; the next analysis succeeds, keeps what
    other commands added (the seeds table of `demo --seeds`) and leaves no staging or trash behind."""
    import moescope.analysis.pipeline as pipeline

    analyze_run(run_dir, FAST, arms=["dense", "moe"], progress=False)
    seeds = b'{"title": "t", "caption": "c", "columns": ["arm"], "rows": [["moe"]]}\n'
    (run_dir / "analysis" / "seeds.json").write_bytes(seeds)
    before = _tree(run_dir / "analysis")
    smaller = dataclasses.replace(FAST, max_blocks_per_domain=2)  # a new analysis that differs in every file

    if fail_at == "viewer.json":
        real = pipeline.atomic_write_json

        def dies(path, obj, **kwargs):
            if Path(path).name == "viewer.json":
                raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch it on the way
            return real(path, obj, **kwargs)

        monkeypatch.setattr(pipeline, "atomic_write_json", dies)
    else:
        real_save = capture.save_table

        def dies(table, path):
            if Path(path).name == "1.npz":
                raise KeyboardInterrupt("killed")
            return real_save(table, path)

        monkeypatch.setattr(capture, "save_table", dies)
    with pytest.raises(KeyboardInterrupt):
        analyze_run(run_dir, smaller, progress=False)
    assert _tree(run_dir / "analysis") == before

    monkeypatch.undo()
    metrics = analyze_run(run_dir, smaller, progress=False)
    after = _tree(run_dir / "analysis")
    assert metrics["n_eval_blocks"] == 6 and json.loads(after["metrics.json"])["n_eval_blocks"] == 6
    assert after["seeds.json"] == seeds  # carried over byte for byte
    assert after["routing/moe/1.npz"] != before["routing/moe/1.npz"]
    assert _leftovers(run_dir) == []


def test_what_a_killed_analysis_left_is_removed_by_the_next_and_never_read(run_dir: Path) -> None:
    """A SIGKILL runs no cleanup: its staging directory (named by its dead PID) and the trash of a swap cut
    short stay beside RUN/analysis. Readers only open RUN/analysis; the next analyze removes both, but not
    the staging directory of a writer that is still alive."""
    import subprocess

    from moescope.io.atomic import temporary_prefix
    from moescope.report.compare import read_entries

    analyze_run(run_dir, FAST, arms=["dense", "moe"], progress=False)
    proc = subprocess.Popen(["true"])
    proc.wait()
    ours = temporary_prefix(run_dir / "analysis")  # .analysis.PID-HOST.
    stale = run_dir / (ours.replace(f".{os.getpid()}-", f".{proc.pid}-") + "deadbeef.tmp")
    live = run_dir / (ours.replace(f".{os.getpid()}-", ".1-") + "alive000.tmp")  # PID 1 never dies
    trash = run_dir / ".analysis.old"
    for d in (stale, live, trash):
        (d / "routing" / "moe").mkdir(parents=True)
        (d / "metrics.json").write_text('{"arms": {"stale": {"kind": "moe", "layers": {}}}}')
    entries = read_entries([run_dir])
    assert [e.arm for e in entries] == ["moe"]  # the analysis, not a leftover

    analyze_run(run_dir, FAST, arms=["moe"], progress=False)
    assert _leftovers(run_dir) == [live.name]
    assert set(json.loads((run_dir / "analysis" / "metrics.json").read_text())["arms"]) == {"moe"}
    assert not (run_dir / "analysis" / "routing" / "dense").exists()  # nothing of the old analysis mixed in


def test_report_and_compare_refuse_an_analysis_without_metrics_in_one_line(run_dir: Path, capsys) -> None:
    """An analysis directory without metrics.json (a swap cut short, or one written by an older moescope
    that was killed) is refused by report and compare with one line naming the fix, exit 2."""
    (run_dir / "analysis" / "routing" / "moe").mkdir(parents=True)
    (run_dir / "analysis" / "viewer.json").write_text('{"arms": {}}')
    capsys.readouterr()
    compare = ["compare", str(run_dir), str(run_dir), "--label", "a", "--label", "b",
               "--out", str(run_dir.parent / "cmp")]
    for argv in (["report", str(run_dir)], compare):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "metrics.json not found" in err[0] and "moescope analyze" in err[0], err
    assert not (run_dir / "report").exists() and not (run_dir.parent / "cmp").exists()
