"""Capture on a tiny MoE GPT-2 over a tiny block store: alignment, loss, round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import one_thread  # noqa: F401
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.analysis import capture
from moescope.data.blocks import FORMAT_VERSION, BlockStore, block_path, dtype_for_vocab
from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is much faster here

VOCAB, BLOCK = 64, 12


def write_store(root: Path, n_eval=(3, 4), seed: int = 0) -> BlockStore:
    """Two domains with their own vocabulary bands; only the eval split matters here."""
    rng = np.random.default_rng(seed)
    dtype = dtype_for_vocab(VOCAB)
    splits: dict = {"train": {}, "eval": {}}
    for d, (name, n) in enumerate(zip(("code", "prose"), n_eval)):
        toks = d * 30 + rng.integers(0, 30, size=(n, BLOCK))
        for split in ("train", "eval"):
            path = block_path(root, split, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            toks.astype(dtype).tofile(path)
            splits[split][name] = {"n_blocks": n}
    manifest = {"format_version": FORMAT_VERSION, "block_size": BLOCK, "vocab_size": VOCAB,
                "eos_token_id": VOCAB - 1, "dtype": dtype.name, "domains": ["code", "prose"], "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return BlockStore.open(root)


def tiny_moe(top_k: int = 1, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=VOCAB))
    install_moe(model, MoEConfig(n_experts=4, top_k=top_k, layers=[0, 1]), seed=seed)
    # a router with some spread so the choices are not all the same expert
    for layer in moe_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model.eval()


def test_capture_aligns_tokens_blocks_and_loss(tmp_path: Path) -> None:
    store = write_store(tmp_path)
    model = tiny_moe()
    res = capture.capture_routing(model, store, batch_blocks=3, progress=False)
    assert sorted(res.tables) == [0, 1]
    index = store.index("eval")
    assert res.block_rows.tolist() == list(range(7))
    assert res.block_domain.tolist() == [0, 0, 0, 1, 1, 1, 1]
    table = res.tables[1]
    assert table.n_tokens == 7 * BLOCK and table.top_k == 1 and table.n_experts == 4
    np.testing.assert_array_equal(table.token_id.reshape(7, BLOCK), store.gather("eval", index))
    np.testing.assert_array_equal(table.position.reshape(7, BLOCK), np.tile(np.arange(BLOCK), (7, 1)))
    np.testing.assert_array_equal(table.block.reshape(7, BLOCK)[:, 0], np.arange(7))
    np.testing.assert_array_equal(table.domain.reshape(7, BLOCK)[:, 0], [0, 0, 0, 1, 1, 1, 1])
    # eval mode, no noise: the choice is the router's argmax (up to fp16 ties), weight 1 (STE)
    argmax = table.router_probs.astype(np.float32).argmax(1)
    assert np.mean(argmax == table.expert_index[:, 0]) > 0.95
    assert np.all(table.gate_weight == 1)
    assert len(np.unique(table.expert_index)) > 1
    # block 5 alone gives the same routing and the same loss as inside its batch
    x = torch.from_numpy(store.gather("eval", index[5:6]))
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    rec = moe_layers(model)[1].last_record
    assert rec.expert_index is None  # capture was switched off again afterwards
    assert res.block_loss_sum[5] == pytest.approx(float(out.loss) * (BLOCK - 1), rel=1e-5)
    assert res.block_tokens.tolist() == [BLOCK - 1] * 7
    plain = capture.capture_routing(model, store, capture=False, progress=False)
    assert plain.tables == {}
    np.testing.assert_allclose(plain.block_loss_sum, res.block_loss_sum, rtol=1e-5)
    for layer in moe_layers(model).values():
        layer.capture = True
    with torch.no_grad():
        model(input_ids=x)
    np.testing.assert_array_equal(
        moe_layers(model)[1].last_record.expert_index.numpy()[:, 0], table.expert_index.reshape(7, BLOCK, 1)[5, :, 0]
    )


def test_capture_top2_selected_rows_and_choices(tmp_path: Path) -> None:
    store = write_store(tmp_path, n_eval=(5, 5))
    model = tiny_moe(top_k=2)
    rows = capture.select_eval_rows(store, max_blocks_per_domain=3)
    assert rows.tolist() == [0, 2, 4, 5, 7, 9]
    res = capture.capture_routing(model, store, rows=rows, batch_blocks=4, progress=False)
    table = res.tables[0]
    assert table.expert_index.shape == (6 * BLOCK, 2)
    assert np.all(table.expert_index[:, 0] != table.expert_index[:, 1])
    # renormalized top-2 weights sum to one
    np.testing.assert_allclose(table.gate_weight.astype(np.float32).sum(1), 1.0, atol=2e-3)
    assert sorted(np.unique(table.block).tolist()) == rows.tolist()
    x = torch.from_numpy(store.gather("eval", store.index("eval")[rows]))
    choices = capture.capture_expert_choices(model, [x[:2], x[2:]])
    np.testing.assert_array_equal(choices[0], table.expert_index)


def test_table_file_round_trip(tmp_path: Path) -> None:
    store = write_store(tmp_path / "data")
    res = capture.capture_routing(tiny_moe(), store, progress=False)
    path = capture.save_table(res.tables[1], tmp_path / "routing" / "1.npz")
    back = capture.load_table(path)
    assert back.n_experts == res.tables[1].n_experts
    for name, value in res.tables[1].arrays().items():
        if name == "expert_count":
            continue
        np.testing.assert_array_equal(getattr(back, name), value)
        assert getattr(back, name).dtype == value.dtype
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(MoescopeError, match="bad.npz"):
        capture.load_table(tmp_path / "bad.npz")
