"""`moescope analyze --model`: end to end on tiny HF MoE models, and every bad input refused cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_fixtures import corpus, make_tokenizer, save_model_dir, write_texts_data_dir
from train_fixtures import one_thread  # noqa: F401

from moescope.analysis.capture import load_table
from moescope.cli import main
from moescope.data.units import UNIT_DOCUMENT, UNIT_TEXT

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--no-progress", "--context", "32", "--max-blocks-per-domain", "6",
        "--set", "statistics.n_resamples=30", "--set", "statistics.n_permutations=30"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer()
    data = write_texts_data_dir(root / "data")
    return root, tok, data


def _analyze(model: Path, out: Path, *extra: str) -> int:
    return main(["analyze", "--model", str(model), "--out", str(out), *extra])


def _refused(capsys, model: Path, out: Path, args: list[str], *needles: str) -> None:
    """analyze exits 2 with one line on stderr naming the problem, and leaves nothing under OUT."""
    capsys.readouterr()  # drop what building the fixture printed
    assert _analyze(model, out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.mark.parametrize("arch, source", [("olmoe", "data"), ("deepseek_v3", "data"), ("gpt_oss", "texts"),
                                          ("minimax_m2", "data"), ("llama4_text", "data"), ("deepseek_v4", "data")])
def test_cli_writes_metrics_viewer_report(arch: str, source: str, shared, tmp_path: Path) -> None:
    root, tok, data = shared
    model = save_model_dir(tmp_path / arch, arch, tokenizer=tok)
    out = tmp_path / "out"
    if source == "data":
        args = ["--data", str(data)]
    else:
        rows = [{"text": t, "domain": d} for d, ts in corpus(seed=1).items() for t in ts]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--texts", str(tmp_path / "t.jsonl")]
    assert _analyze(model, out, *args, "--name", "tiny", *FAST) == 0

    metrics = json.loads((out / "analysis" / "metrics.json").read_text())
    arm = metrics["arms"]["tiny"]
    info = arm["model"]
    assert arm["kind"] == "moe" and metrics["domains"] == ["code", "math", "prose"]
    assert info["n_experts"] == 8 and info["architecture"].lower().startswith(arch.split("_")[0][:4])
    assert sorted(arm["layers"], key=int) == [str(i) for i in info["moe_layers"]]
    assert info["n_shared_experts"] == (1 if arch in ("deepseek_v3", "llama4_text", "deepseek_v4") else 0)
    # minimax_m2 and deepseek_v4 have no adapter of their own: the generic one reads them, and says how it
    # knows the router scores
    assert (info["adapter"] == "generic") == (arch in ("minimax_m2", "deepseek_v4"))
    if arch == "minimax_m2":
        assert info["router_scores"] == "sigmoid"
        assert "the only one of softmax / sigmoid its routing code calls" in info["selection"]
    n_blocks = metrics["n_eval_blocks"]
    assert n_blocks == 18  # 6 blocks of 32 tokens from each domain
    # each block's unit: what its first token comes from (a data directory's document, a texts file's row)
    assert metrics["statistics"]["unit"] == (UNIT_DOCUMENT if source == "data" else UNIT_TEXT)
    assert set(metrics["statistics"]["n_units"]) == {"code", "math", "prose"}
    assert all(1 < n <= 6 for n in metrics["statistics"]["n_units"].values())
    for layer, entry in arm["layers"].items():
        assert entry["n_tokens"] == n_blocks * 32 and entry["top_k"] == info["top_k"]
        assert 0.0 <= entry["specialization"]["nmi"]["estimate"] <= 1.0
        assert abs(sum(entry["load"]["token_fraction"]) - 1.0) < 1e-4  # rounded to 6 places
        table = load_table(out / "analysis" / "routing" / "tiny" / f"{layer}.npz")
        assert table.router_probs is None and table.n_experts == 8 and table.n_tokens == n_blocks * 32
        # token rows follow the blocks: block b holds positions 0..31 of one domain
        assert np.array_equal(table.position.reshape(n_blocks, 32), np.tile(np.arange(32), (n_blocks, 1)))
        assert np.all(table.domain.reshape(n_blocks, 32) == table.domain.reshape(n_blocks, 32)[:, :1])
        # the viewer's first choice equals the table's
    viewer = json.loads((out / "analysis" / "viewer.json").read_text())["arms"]["tiny"]
    assert viewer["layers"] == info["moe_layers"] and viewer["n_experts"] == 8
    assert len(viewer["samples"]) == 9 and all(len(s["tokens"]) == 32 for s in viewer["samples"])
    html = (out / "report" / "report.html").read_text()
    assert "tiny" in html and "NMI" in html
    if arch == "deepseek_v4":  # neither softmax nor sigmoid: the router's own score function, named
        assert info["router_scores"] == "sqrtsoftplus" and "normalized sqrtsoftplus scores" in html
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_one_document_per_domain_gives_no_interval_and_no_crash(shared, tmp_path: Path, capsys) -> None:
    """Every domain's texts name one document: nothing to resample, so the intervals are null, printed
    and drawn as n/a, while the estimates and the permutation test (which relabels the three units) stand."""
    root, tok, _ = shared
    model = save_model_dir(tmp_path / "mixtral", "mixtral", tokenizer=tok)
    rows = [{"text": t, "domain": d, "document": f"all of {d}"} for d, ts in corpus(seed=1).items() for t in ts]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert _analyze(model, out, "--texts", str(tmp_path / "t.jsonl"), "--name", "tiny", *FAST) == 0
    metrics = json.loads((out / "analysis" / "metrics.json").read_text())
    assert metrics["statistics"]["n_units"] == {"code": 1, "math": 1, "prose": 1}
    for entry in metrics["arms"]["tiny"]["layers"].values():
        nmi = entry["specialization"]["nmi"]
        assert 0.0 <= nmi["estimate"] <= 1.0 and nmi["low"] is None and nmi["high"] is None
    assert "[n/a]" in capsys.readouterr().out
    assert (out / "report" / "report.html").is_file()


def test_moescope_model_through_the_same_path(shared, tmp_path: Path) -> None:
    """moescope's own MoE checkpoints go through the same capture (tokenizer taken from the data directory)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.data.blocks import tokenizer_dir
    from moescope.moe.config import MoEConfig
    from moescope.moe.hf_model import load_moe_model, save_moe_model
    from moescope.moe.install import install_moe

    root, tok, data = shared
    tok.save_pretrained(tokenizer_dir(data))
    torch.manual_seed(0)
    net = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok)))
    install_moe(net, MoEConfig(n_experts=4, top_k=2, layers=[1]), seed=0)
    save_moe_model(net, tmp_path / "final")
    out = tmp_path / "out"
    assert _analyze(tmp_path / "final", out, "--data", str(data), "--name", "own", *FAST) == 0
    table = load_table(out / "analysis" / "routing" / "own" / "1.npz")
    # independent: the layer's own record on the same tokens
    model = load_moe_model(tmp_path / "final")
    layer = model.transformer.h[1].mlp
    layer.capture = True
    with torch.no_grad():
        model(input_ids=torch.from_numpy(table.token_id.reshape(-1, 32).astype(np.int64)))
    rec = layer.last_record
    ids = np.sort(rec.expert_index.numpy(), axis=1)
    np.testing.assert_array_equal(np.sort(table.expert_index, axis=1), ids)
    probs = rec.router_probs.double().numpy()
    np.testing.assert_allclose(table.router_entropy, -(probs * np.log(probs)).sum(1), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_dense_model_refused(shared, tmp_path: Path, capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, data = shared
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    _refused(capsys, tmp_path / "dense", out, ["--data", str(data), *FAST], "no MoE layer")


def test_encoder_only_model_refused(shared, tmp_path: Path, capsys) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    _, tok, data = shared
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2,
                                     hidden_dim=32)).save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    _refused(capsys, tmp_path / "enc", tmp_path / "out", ["--data", str(data), *FAST],
             "DistilBertConfig is not a causal or image-text-to-text language model")


@pytest.mark.parametrize("patch", [{"num_local_experts": -2}, {"pad_token_id": 100000}])
def test_config_transformers_cannot_build_refused(shared, tmp_path: Path, capsys, patch: dict) -> None:
    """Values that pass the config class's own checks but not the model's constructor (a RuntimeError, an
    AssertionError inside torch)."""
    _, tok, data = shared
    model = save_model_dir(tmp_path / "neg", "mixtral", tokenizer=tok)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **patch}))
    _refused(capsys, model, tmp_path / "out", ["--data", str(data), *FAST], str(model),
             "transformers cannot build a MixtralConfig model")


def test_checkpoint_a_constructor_asserts_on_is_one_error(shared, tmp_path: Path) -> None:
    """`train --base DIR` and other loads go through load_checkpoint: torch's own assert in a constructor
    (a padding index outside the vocabulary) is one MoescopeError, not a traceback."""
    from moescope.errors import MoescopeError
    from moescope.hf.loading import load_checkpoint

    _, tok, _ = shared
    model = save_model_dir(tmp_path / "pad", "mixtral", tokenizer=tok)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "pad_token_id": 100000}))
    with pytest.raises(MoescopeError, match="cannot load: Padding_idx"):
        load_checkpoint(str(model), "cannot load")


def test_revision_of_a_local_directory_refused(shared, mixtral_dir, tmp_path: Path, capsys) -> None:
    """transformers ignores a revision for a local path: analysing the checkout under another name is refused."""
    _, _, data = shared
    _refused(capsys, mixtral_dir, tmp_path / "out", ["--data", str(data), "--revision", "step1000", *FAST],
             "--revision 'step1000' names a hub revision", str(mixtral_dir))


def test_revision_reaches_config_tokenizer_and_weights(mixtral_dir, monkeypatch) -> None:
    """A hub revision (an OLMoE pretraining checkpoint) is asked for by every transformers load."""
    import transformers

    from moescope.hf import loading

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("revision")))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    plan = loading.plan_model(str(mixtral_dir), "fp32", "cpu", revision="step1000")
    loading.load_tokenizer(str(mixtral_dir), plan.revision)
    loading.load_model(plan)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert {revision for _, revision in seen} == {"step1000"}


def test_unknown_moe_architecture_refused(shared, tmp_path: Path, capsys) -> None:
    from transformers import JetMoeConfig, JetMoeForCausalLM

    _, tok, data = shared
    JetMoeForCausalLM(JetMoeConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_key_value_heads=2,
                                   kv_channels=16, intermediate_size=32, num_local_experts=4,
                                   num_experts_per_tok=2)).save_pretrained(tmp_path / "jet")
    tok.save_pretrained(tmp_path / "jet")
    out = tmp_path / "out"
    _refused(capsys, tmp_path / "jet", out, ["--data", str(data), *FAST],
                    "unknown MoE architecture", "mixtral", "deepseek_v3", "gpt_oss")


def test_model_without_tokenizer_refused(shared, tmp_path: Path, capsys) -> None:
    from hf_fixtures import build_model

    _, tok, data = shared
    build_model("mixtral", len(tok)).save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    _refused(capsys, tmp_path / "m", out, ["--data", str(data), *FAST], "tokenizer")


@pytest.fixture(scope="module")
def mixtral_dir(shared, tmp_path_factory):
    _, tok, _ = shared
    return save_model_dir(tmp_path_factory.mktemp("mixtral"), "mixtral", tokenizer=tok)


def test_data_dir_without_texts_refused(mixtral_dir, tmp_path: Path, capsys) -> None:
    data = write_texts_data_dir(tmp_path / "data")
    for path in (data / "texts" / "eval").iterdir():
        path.unlink()
    out = tmp_path / "out"
    _refused(capsys, mixtral_dir, out, ["--data", str(data), *FAST], "no held-out texts")


@pytest.mark.parametrize("row, why", [('{"text": 3, "domain": "x"}', "string"),
                                      ('{"text": "a \\ud800 b", "domain": "x"}', "unpaired surrogate"),
                                      ('{"text": "a", "domain": "x", "document": 3}', "document")])
def test_bad_texts_row_names_file_and_line(mixtral_dir, tmp_path: Path, capsys, row: str, why: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a \\ud83d\\ude00 paired is fine", "domain": "x"}\n' + row + "\n")
    out = tmp_path / "out"
    _refused(capsys, mixtral_dir, out, ["--texts", str(path), *FAST], f"{path}:2", why)


def test_context_above_model_context_refused(shared, mixtral_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    _refused(capsys, mixtral_dir, out, ["--data", str(shared[2]), "--no-progress", "--context", "257"],
             "--context 257", "256")


def test_too_large_refused_unless_forced(shared, mixtral_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    from moescope.hf import loading

    monkeypatch.setattr(loading, "available_bytes", lambda device: 1000)
    out = tmp_path / "out"
    _refused(capsys, mixtral_dir, out, ["--data", str(shared[2]), *FAST], "GiB", "--force")
    assert _analyze(mixtral_dir, out, "--data", str(shared[2]), "--force", *FAST) == 0
    assert (out / "analysis" / "metrics.json").is_file()


def test_a_forward_the_model_itself_refuses_is_one_line(shared, mixtral_dir, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    """A config transformers builds but whose forward raises (e.g. a hybrid with no attention layer for
    its mask) is one line naming the failure, not a traceback; an out-of-memory stays the CLI's own line."""
    from transformers.models.mixtral import modeling_mixtral

    def broken(self, *args, **kwargs):
        raise ValueError("get_mask_sizes: no attention layer\nsecond line")

    monkeypatch.setattr(modeling_mixtral.MixtralForCausalLM, "forward", broken)
    out = tmp_path / "out"
    _refused(capsys, mixtral_dir, out, ["--data", str(shared[2]), *FAST], "forward pass failed",
             "ValueError: get_mask_sizes: no attention layer")

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(modeling_mixtral.MixtralForCausalLM, "forward", oom)
    _refused(capsys, mixtral_dir, out, ["--data", str(shared[2]), *FAST], "out of memory")


def test_memory_estimate_counts_the_weights(mixtral_dir) -> None:
    from transformers import AutoModelForCausalLM

    from moescope.hf import loading

    plan = loading.plan_model(str(mixtral_dir), "bf16", "cpu")
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(mixtral_dir).parameters())
    assert plan.weight_bytes == 2 * n


def test_remote_code_model_refused(shared, tmp_path: Path, capsys) -> None:
    model = tmp_path / "remote"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my_secret_moe", "architectures": ["MyMoe"],
                                                    "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    out = tmp_path / "out"
    _refused(capsys, model, out, ["--data", str(shared[2]), *FAST], "trust_remote_code")


@pytest.mark.parametrize("flags, text", [(["--out", "OUT"], "--out only applies with --model"),
                                         (["--out", "OUT", "--force"], "--out, --force only apply with --model"),
                                         (["--revision", "step1000"], "--revision only applies with --model")])
def test_released_only_flags_refused_with_a_run(tmp_path: Path, capsys, flags: list[str], text: str) -> None:
    """Flags of the released-model path name themselves when given with a run directory (exit 2, one line)."""
    out = tmp_path / "out"
    argv = ["analyze", str(tmp_path / "run"), *[str(out) if f == "OUT" else f for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err
    assert not out.exists()


def _broken_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _without(path: Path, *suffixes: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not k.endswith(suffixes)}, path, metadata={"format": "pt"})


def test_pickle_weights_are_never_opened(shared, mixtral_dir, tmp_path: Path, capsys) -> None:
    """A pytorch_model.bin holding a payload that would run code when unpickled: refused unopened."""
    from hf_fixtures import replace_weights_with_pickle

    model = _broken_copy(mixtral_dir, tmp_path / "m")
    marker = tmp_path / "ran"
    replace_weights_with_pickle(model, marker)
    _refused(capsys, model, tmp_path / "out", ["--data", str(shared[2]), *FAST], "model.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("case, needles", [
    ("router_missing", ["2 tensor(s) missing from the checkpoint", "layers.0.mlp.gate.weight"]),
    ("experts_mis_shaped", ["of another shape in the checkpoint", "experts"]),
    ("truncated", ["model.safetensors", "unreadable safetensors file"]),
    ("top_k_above_experts", ["12 of 8 experts"]),
    ("config_not_json", ["config.json", "cannot read the model config"]),
])
def test_broken_checkpoints_are_refused_not_filled_in(shared, mixtral_dir, tmp_path: Path, capsys, case: str,
                                                      needles: list[str]) -> None:
    """transformers would fill a missing or mis-shaped tensor with random values and carry on; moescope
    refuses the model with one line naming the tensors (and every other broken file likewise)."""
    model = _broken_copy(mixtral_dir, tmp_path / "m")
    weights, config_path = model / "model.safetensors", model / "config.json"
    config = json.loads(config_path.read_text())
    if case == "router_missing":
        _without(weights, ".gate.weight")  # both layers' routers (stored as block_sparse_moe.gate)
    elif case == "experts_mis_shaped":
        config["num_local_experts"] = 2 * config["num_local_experts"]
        config_path.write_text(json.dumps(config))
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "top_k_above_experts":
        config["num_local_experts"], config["num_experts_per_tok"] = 8, 12
        config_path.write_text(json.dumps(config))
    else:
        config_path.write_text("{ not json")
    _refused(capsys, model, tmp_path / "out", ["--data", str(shared[2]), *FAST], *needles)


def test_out_holding_other_files_refused_before_loading(mixtral_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    """An OUT that holds a training run (or anything analyze --model did not write) is refused before a
    weight is read, and left as it was; a previous analysis' OUT is reused."""
    from moescope.hf import loading

    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for d, ts in corpus(seed=1).items() for t in ts))
    run = tmp_path / "run"
    (run / "arms").mkdir(parents=True)
    (run / "experiment.json").write_text('{"experiment": {"arms": ["dense"]}}')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before OUT was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    capsys.readouterr()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "experiment.json").write_text('{"experiment": 5}')
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, why in ((run, "did not write (experiment.json"), (texts, "not a directory"),
                     (odd, "did not write (experiment.json"), (tmp_path / "dangling", "a symlink to nothing")):
        assert _analyze(mixtral_dir, out, "--texts", str(texts), *FAST) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--out {out}" in err[0] and why in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    for name in (".", "..", "../up", "/abs", ".hidden", "a/b", "x" * 65):
        assert _analyze(mixtral_dir, tmp_path / "new", "--texts", str(texts), "--name", name, *FAST) == 2
        assert "not starting with '.'" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert _analyze(mixtral_dir, tmp_path / "new", "--texts", str(tmp_path), *FAST) == 2
    assert "not a regular file" in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "again"
    assert _analyze(mixtral_dir, out, "--texts", str(texts), *FAST) == 0
    assert _analyze(mixtral_dir, out, "--texts", str(texts), *FAST) == 0  # its own earlier results are replaced


def test_a_domain_without_one_full_block_is_left_out(mixtral_dir, tmp_path: Path, caplog) -> None:
    rows = [{"text": t, "domain": d} for d, ts in corpus(seed=1).items() for t in ts]
    rows.insert(len(rows) // 2, {"text": "short", "domain": "tiny"})  # among the others: the ids after it move
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert _analyze(mixtral_dir, out, "--texts", str(texts), *FAST) == 0
    assert "tiny give no block of 32 tokens: left out" in caplog.text
    metrics = json.loads((out / "analysis" / "metrics.json").read_text())
    assert metrics["domains"] == ["code", "math", "prose"] and metrics["n_eval_blocks"] == 18
    assert set(metrics["statistics"]["n_units"]) == {"code", "math", "prose"}
    for entry in next(iter(metrics["arms"].values()))["layers"].values():
        assert len(entry["specialization"]["expert_given_domain"]) == 3
    one = tmp_path / "one.jsonl"  # one domain left after the drop: nothing to compare routing across
    one.write_text("".join(json.dumps(r) + "\n" for r in rows if r["domain"] in ("tiny", "math")))
    assert _analyze(mixtral_dir, tmp_path / "out1", "--texts", str(one), *FAST) == 2
    assert not (tmp_path / "out1").exists()


@pytest.mark.parametrize("fail_in", ["build_report", "swap"])
def test_a_reanalysis_that_dies_is_the_old_results_or_no_analysis_never_a_mix(
        shared, mixtral_dir, tmp_path: Path, capsys, monkeypatch, fail_in: str) -> None:
    """Killed while building (before the swap), OUT is left exactly as before; killed during the swap, after
    the report is replaced, OUT has no analysis/ (report says to run analyze again) rather than the new
    report and analysis beside the old experiment.json. The next analysis succeeds and leaves no trash."""
    from moescope.analysis import released

    _, _, data = shared
    out = tmp_path / "out"
    assert _analyze(mixtral_dir, out, "--data", str(data), *FAST) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    if fail_in == "build_report":
        def dies(*args, **kwargs):
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(released, "build_report", dies)
    else:
        real = released._replace

        def dies(src: Path, dst: Path) -> None:
            if dst.name == "experiment.json":
                raise KeyboardInterrupt("killed")
            real(src, dst)

        monkeypatch.setattr(released, "_replace", dies)
    assert _analyze(mixtral_dir, out, "--data", str(data), *FAST, "--max-blocks-per-domain", "3") == 130
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    if fail_in == "build_report":
        assert after == before
    else:
        assert not (out / "analysis").exists()
        assert after["experiment.json"] == before["experiment.json"]
        capsys.readouterr()
        assert main(["report", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "metrics.json not found" in err[0] and "moescope analyze" in err[0], err
    monkeypatch.undo()
    assert _analyze(mixtral_dir, out, "--data", str(data), *FAST, "--max-blocks-per-domain", "3") == 0
    assert json.loads((out / "analysis" / "metrics.json").read_text())["n_eval_blocks"] == 9
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
