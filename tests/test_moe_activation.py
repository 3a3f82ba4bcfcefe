"""Fused GELU everywhere moescope builds a model: same function as GPT-2's gelu_new, mapped on load."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from moescope.moe.activation import fuse_config_activation, fused_activation
from moescope.moe.experts import GeluExpert
from moescope.moe.hf_model import load_moe_model, save_moe_model
from moescope.train.config import ModelConfig
from moescope.train.model import build_scratch_model, load_init_model


def test_fused_tanh_gelu_is_gpt2_gelu_new_to_float_precision() -> None:
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.randn(100_000) * 4]).requires_grad_()
    y_new, y_fused = ACT2FN["gelu_new"](x), ACT2FN[fused_activation("gelu_new")](x)
    assert (y_new - y_fused).abs().max() < 2e-6  # values up to 12: ~1 ulp
    g_new, = torch.autograd.grad(y_new.sum(), x)
    g_fused, = torch.autograd.grad(y_fused.sum(), x)
    assert (g_new - g_fused).abs().max() < 1e-5
    assert fused_activation("relu") == "relu" and fused_activation("gelu") == "gelu"


def test_gelu_expert_is_transformers_gpt2_mlp_with_gelu_pytorch_tanh() -> None:
    torch.manual_seed(0)
    mlp = GPT2MLP(256, GPT2Config(n_embd=64, activation_function="gelu_pytorch_tanh", resid_pdrop=0.0)).eval()
    expert = GeluExpert(64, 256)  # default activation: the fused one
    expert.load_state_dict(mlp.state_dict())
    x = torch.randn(300, 64) * 3
    assert torch.equal(expert(x), mlp(x))


def _gpt2(activation: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                       activation_function=activation))
    with torch.no_grad():  # trained-model-sized weights, so the activation sees inputs of a few units
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.15)
    return model.eval()


def test_pretrained_gpt2_is_mapped_to_the_fused_op_within_1e_5(tmp_path: Path) -> None:
    ids = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(1))
    original = _gpt2("gelu_new")
    original.save_pretrained(tmp_path / "hf")
    save_moe_model(original, tmp_path / "moescope")  # a checkpoint written before the switch
    with torch.no_grad():
        reference = original(ids).logits
        fused_reference = _gpt2("gelu_pytorch_tanh")(ids).logits
    for loaded in (load_init_model(tmp_path / "hf"), load_moe_model(tmp_path / "moescope")):
        assert loaded.config.activation_function == "gelu_pytorch_tanh"
        assert all(type(b.mlp.act) is type(ACT2FN["gelu_pytorch_tanh"]) for b in loaded.transformer.h)
        with torch.no_grad():
            logits = loaded(ids).logits
        assert reference.abs().max() > 1.0 and (logits - reference).abs().max() < 1e-5
        assert torch.equal(logits, fused_reference)  # exactly transformers' gelu_pytorch_tanh GPT-2


def test_scratch_models_and_configs_use_the_fused_op() -> None:
    class Store:
        vocab_size, block_size, eos_token_id, root = 50, 16, 49, Path(".")

    for name in ("gelu_new", "gelu_pytorch_tanh"):
        model = build_scratch_model(ModelConfig(activation=name), Store(), seed=0)
        assert model.config.activation_function == "gelu_pytorch_tanh"
    assert ModelConfig().activation == "gelu_pytorch_tanh"
    cfg = GPT2Config()
    assert fuse_config_activation(cfg) and cfg.activation_function == "gelu_pytorch_tanh"
    assert not fuse_config_activation(cfg)
