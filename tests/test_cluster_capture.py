"""Capture from a real (tiny) saved MoE GPT-2 and a block store; the `moescope cluster` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.cluster.io import CaptureConfig, capture_batches, read_batch, resolve_model_dir
from moescope.data.blocks import BlockStore
from moescope.moe.hf_model import load_moe_model, save_moe_model
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers

BLOCK = 16
VOCAB = 300


def make_data_dir(root: Path) -> Path:
    """A data directory in the BlockStore contract: 2 domains x 6 eval blocks, plus a BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = ["def f(x):\n    return x + 1\n", "The river flows north. It is 42 miles long."] * 20
    bpe.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(str(root / "tokenizer"))
    rng = np.random.default_rng(0)
    splits = {"train": {}, "eval": {}}
    for d in ("code", "prose"):
        for split, n in (("train", 0), ("eval", 6)):
            (root / "blocks" / split).mkdir(parents=True, exist_ok=True)
            rng.integers(0, len(tok), size=(n, BLOCK)).astype(np.uint16).tofile(root / "blocks" / split / f"{d}.bin")
            splits[split][d] = {"n_blocks": n}
    manifest = {"format_version": 1, "block_size": BLOCK, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "dtype": "uint16", "domains": ["code", "prose"], "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_model_dir(root: Path, top_k: int = 2) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.moe.config import MoEConfig

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=VOCAB + 1,
                                       bos_token_id=0, eos_token_id=0))
    install_moe(model, MoEConfig(n_experts=4, top_k=top_k, layers=[0, 1], gating="switch"), seed=0)
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.router.weight.normal_(std=0.3)  # a spread of routing decisions, not a tie
    save_moe_model(model, root)
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster_capture")
    return make_model_dir(root / "model"), make_data_dir(root / "data")


def test_capture_by_seed_matches_a_direct_forward(dirs, tmp_path):
    model_dir, data_dir = dirs
    cfg = CaptureConfig(n_batches=2, tokens_per_batch=3 * BLOCK, seed=5)
    paths = capture_batches(model_dir, data_dir, tmp_path, cfg)
    assert [p.name for p in paths] == ["seed5", "seed6"]
    store = BlockStore.open(data_dir)
    index = store.index("eval")
    model = load_moe_model(model_dir)
    layers = moe_layers(model)
    seen_blocks = []
    for path in paths:
        acts, arrays, meta = read_batch(path)
        assert meta["labels"] == [f"L{b}.e{e}" for b in (0, 1) for e in range(4)]
        blocks = np.unique(arrays["block"])
        assert len(blocks) == 3 and np.array_equal(arrays["position"][:BLOCK], np.arange(BLOCK))
        seen_blocks.append(set(blocks.tolist()))
        tokens = store.gather("eval", index[blocks])
        assert np.array_equal(arrays["token_id"], tokens.reshape(-1))
        assert np.array_equal(arrays["domain"], np.repeat(index[blocks, 0], BLOCK))
        # independent: one forward of all blocks at once, gate weights scattered by hand
        for layer in layers.values():
            layer.capture = True
        with torch.no_grad():
            model(input_ids=torch.as_tensor(tokens))
        expected = np.zeros((tokens.size, 8), dtype=np.float32)
        for li, b in enumerate((0, 1)):
            rec = layers[b].last_record
            for t in range(tokens.size):
                for j in range(2):
                    expected[t, li * 4 + int(rec.expert_index[t, j])] += float(rec.gate_weight[t, j])
        np.testing.assert_allclose(np.asarray(acts), expected, atol=1e-3)  # capture keeps fp16 weights
        assert np.all((np.asarray(acts) > 0).sum(axis=1) == 4)  # top-2 in each of 2 layers
        assert set(arrays["token_type"].tolist()) <= set(range(6)) and (arrays["token_type"] >= 0).all()
    assert not (seen_blocks[0] & seen_blocks[1])  # disjoint batches


def test_capture_by_domain_one_batch_per_domain(dirs, tmp_path):
    model_dir, data_dir = dirs
    paths = capture_batches(model_dir, data_dir, tmp_path, CaptureConfig(batch_by="domain", tokens_per_batch=4 * BLOCK))
    assert [p.name for p in paths] == ["code", "prose"]
    for d, path in enumerate(paths):
        _, arrays, _ = read_batch(path)
        assert len(arrays["token_id"]) == 4 * BLOCK and np.all(arrays["domain"] == d)


def test_capture_neurons_of_one_expert(dirs, tmp_path):
    model_dir, data_dir = dirs
    cfg = CaptureConfig(n_batches=1, tokens_per_batch=2 * BLOCK, components="neurons", neuron_layer=1, neuron_expert=2)
    (path,) = capture_batches(model_dir, data_dir, tmp_path, cfg)
    acts, arrays, meta = read_batch(path)
    acts = np.asarray(acts)
    assert acts.shape == (2 * BLOCK, 128) and meta["labels"][5] == "L1.e2.n5"
    # independent of how the layer dispatches: the captured units must rebuild the layer's
    # output, y = sum over the token's experts of weight x expert(x), with expert 2's share
    # computed from the units alone (c_proj of them)
    model = load_moe_model(model_dir)
    layer = moe_layers(model)[1]
    seen = {}
    h_in = layer.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    h_out = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out.detach()))
    layer.capture = True
    with torch.no_grad():
        model(input_ids=torch.as_tensor(arrays["token_id"].reshape(-1, BLOCK)))
        h_in.remove()
        h_out.remove()
        x = seen["x"].reshape(-1, 32)
        y = seen["y"].reshape(-1, 32)
        idx, w = layer.last_record.expert_index, layer.last_record.gate_weight
        routed = (idx == 2).any(dim=1).numpy()
        assert 0 < routed.sum() < len(routed)
        assert np.all(acts[~routed] == 0)
        units = torch.from_numpy(np.array(acts))
        for t in np.flatnonzero(routed):
            total = torch.zeros(32)
            for j in range(2):
                e = int(idx[t, j])
                part = layer.experts[2].c_proj(units[t : t + 1])[0] if e == 2 else layer.experts[e](x[t : t + 1])[0]
                total += w[t, j] * part
            torch.testing.assert_close(total, y[t], atol=1e-5, rtol=1e-4)


def test_resolve_model_dir_from_run_layouts(dirs, tmp_path):
    model_dir, data_dir = dirs
    assert resolve_model_dir(model_dir) == (model_dir, None)
    run = tmp_path / "run"
    (run / "arms" / "moe").mkdir(parents=True)
    (run / "arms" / "moe" / "final").symlink_to(model_dir)
    (run / "experiment.json").write_text(json.dumps({"experiment": {"data_dir": str(data_dir)}}))
    assert resolve_model_dir(run) == (run / "arms" / "moe" / "final", str(data_dir))
    from moescope.errors import MoescopeError

    with pytest.raises(MoescopeError, match="arm 'dense'.*arms: moe"):
        resolve_model_dir(run, arm="dense")


def test_cluster_command_end_to_end(dirs, tmp_path, capsys):
    from moescope.cli import main

    model_dir, data_dir = dirs
    out = tmp_path / "out"
    code = main(["cluster", str(model_dir), "--data", str(data_dir), "--out", str(out), "--batches", "2",
                 "--tokens-per-batch", str(3 * BLOCK), "--alpha", "0.5", "--set", "capture.weight=router_prob"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MDL-optimal clusters of batch seed0" in printed
    summary = json.loads((out / "cluster_summary.json").read_text())
    assert summary["members"] == ["seed0", "seed1"] and summary["config"]["capture"]["weight"] == "router_prob"
    assert summary["config"]["merge"]["alpha"] == 0.5
    for name in ("cluster_sizes.png", "distance_vs_k.png", "final_clusters_seed0.png", "ensemble.npz", "null_ensemble.json"):
        assert (out / name).is_file()
    # a second run into the same directory is refused
    assert main(["cluster", str(model_dir), "--data", str(data_dir), "--out", str(out)]) == 2


def test_a_failed_cluster_run_leaves_nothing_that_blocks_the_rerun(dirs, tmp_path, capsys):
    """A capture that fails (here: a data directory that is not there) removes what it wrote, so the
    corrected command runs into the same --out without --overwrite."""
    from moescope.cli import main

    model_dir, data_dir = dirs
    out = tmp_path / "out"
    args = ["cluster", str(model_dir), "--out", str(out), "--batches", "2", "--tokens-per-batch", str(3 * BLOCK)]
    assert main([*args, "--data", str(tmp_path / "no_such_data")]) == 2
    assert not out.exists()
    assert main([*args, "--data", str(data_dir)]) == 0
