"""GPT-2 with MoE blocks: warm-start parity, save/load, mismatch errors, STE gradient, generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig, default_moe_layers
from moescope.moe.capture import generate_with_routing
from moescope.moe.hf_model import MOE_CONFIG_NAME, load_moe_model, save_moe_model
from moescope.moe.install import install_moe, install_moe_measured
from moescope.moe.model import moe_layers, router_parameters, set_training_progress
from moescope.moe.layer import MoELayer


def _tiny_config() -> GPT2Config:
    # the fused GELU, as every GPT-2 that moescope builds or loads (test_moe_activation.py)
    return GPT2Config(
        n_layer=4, n_embd=32, n_head=4, n_positions=64, vocab_size=101, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, activation_function="gelu_pytorch_tanh",
    )


@pytest.fixture()
def pretrained_dir(tmp_path: Path) -> Path:
    """A tiny 'pretrained' GPT-2 saved with save_pretrained, standing in for the hub model."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_tiny_config())
    with torch.no_grad():  # non-zero biases, like a trained checkpoint
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_(std=0.1)
            block.mlp.c_proj.bias.normal_(std=0.1)
    out = tmp_path / "dense"
    model.save_pretrained(out)
    return out


def _ids(seed: int = 1) -> torch.Tensor:
    # 8 x 48 tokens: every expert gets well over a dozen rows, so BLAS takes the same
    # kernel path for expert slices as for the dense matmul and results are bit-identical
    return torch.randint(1, 101, (8, 48), generator=torch.Generator().manual_seed(seed))


def test_default_layers_are_last_third() -> None:
    assert default_moe_layers(12) == [8, 9, 10, 11]
    assert default_moe_layers(6) == [4, 5]
    assert default_moe_layers(4) == [3]


def test_warm_start_parity_exact_without_noise(pretrained_dir: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir).eval()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    layers = install_moe(model, MoEConfig(n_experts=4, top_k=1, layers=[2, 3], upcycle_noise_rel=0.0))
    assert sorted(layers) == [2, 3] and all(isinstance(m, MoELayer) for m in layers.values())
    with torch.no_grad():
        moe = model(ids).logits
    for layer in layers.values():  # the router really spread tokens over several experts
        assert (layer.last_record.tokens_per_expert > 0).sum() >= 2
    assert torch.equal(moe, dense)


def test_warm_start_with_noise_deviates_slightly(pretrained_dir: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir).eval()
    ids = _ids()
    dense_fc = model.transformer.h[3].mlp.c_fc.weight.detach().clone()
    layers, dev = install_moe_measured(model, MoEConfig(n_experts=4, upcycle_noise_rel=1e-3), ids, seed=5)
    assert 0 < dev < 1e-2
    exact = GPT2LMHeadModel.from_pretrained(pretrained_dir)
    assert install_moe_measured(exact, MoEConfig(n_experts=4, upcycle_noise_rel=0.0), ids)[1] == 0.0
    experts = layers[3].experts
    assert not torch.equal(experts[0].c_fc.weight, experts[1].c_fc.weight)
    rel = (experts[0].c_fc.weight - dense_fc).std() / dense_fc.std()
    assert rel.item() == pytest.approx(1e-3, rel=0.1)


def test_ste_router_gets_gradient_from_lm_loss_alone(pretrained_dir: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir)
    install_moe(model, MoEConfig(n_experts=4, layers=[1, 3]))
    model.train()
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    routers = router_parameters(model)
    assert len(routers) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)


def test_progress_and_layer_lookup(pretrained_dir: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir)
    install_moe(model, MoEConfig(n_experts=4, layers=[0, 2], router_noise_std=0.1))
    assert sorted(moe_layers(model)) == [0, 2]
    set_training_progress(model, 0.1)
    assert all(layer.progress == 0.1 for layer in moe_layers(model).values())
    assert moe_layers(model)[0].current_noise_std() == pytest.approx(0.1 * (1 - 0.1 / 0.25))
    assert model.transformer.h[0].mlp.output_dropout.p == model.config.resid_pdrop


def test_install_rejects_bad_layers_and_reinstall(pretrained_dir: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir)
    with pytest.raises(MoescopeError, match="out of range"):
        install_moe(model, MoEConfig(layers=[7]))
    install_moe(model, MoEConfig(n_experts=2))
    with pytest.raises(MoescopeError, match="already"):
        install_moe(model, MoEConfig(n_experts=2))


def _trained_moe(pretrained_dir: Path, **cfg) -> GPT2LMHeadModel:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir)
    install_moe(model, MoEConfig(n_experts=4, layers=[1, 3], **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(2):
        ids = _ids(step + 10)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_save_load_round_trip_on_logits(pretrained_dir: Path, tmp_path: Path) -> None:
    model = _trained_moe(pretrained_dir, top_k=2, expert_dropout=0.1)
    out = save_moe_model(model, tmp_path / "ckpt")
    meta = json.loads((out / MOE_CONFIG_NAME).read_text())
    assert meta["moe"]["layers"] == [1, 3] and meta["moe"]["expert_ff"] == 128
    loaded = load_moe_model(out)
    assert sorted(moe_layers(loaded)) == [1, 3]
    assert loaded.moe_config == model.moe_config
    ids = _ids(3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_saved_model_carries_its_tokenizer(pretrained_dir: Path, tmp_path: Path) -> None:
    from moescope.data.tokenizer import train_bpe

    tok = train_bpe(["a tiny corpus for a tiny tokenizer"] * 20, vocab_size=260)
    tok.save_pretrained(tmp_path / "tok")
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir)
    by_dir = save_moe_model(model, tmp_path / "a", tokenizer=tmp_path / "tok")
    assert (by_dir / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert json.loads((by_dir / "config.json").read_text())["model_type"] == "gpt2"  # ours, not the tokenizer's
    by_object = save_moe_model(model, tmp_path / "b", tokenizer=tok)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(by_object))
    assert again("tiny corpus")["input_ids"] == tok("tiny corpus")["input_ids"]
    assert not [f for f in by_object.iterdir() if f.name.startswith(".")]  # no staging leftovers
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoescopeError, match="no tokenizer files"):
        save_moe_model(model, tmp_path / "c", tokenizer=tmp_path / "empty")
    assert not (tmp_path / "c").exists()  # nothing written


def test_dense_model_round_trips(pretrained_dir: Path, tmp_path: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(pretrained_dir).eval()
    out = save_moe_model(model, tmp_path / "dense_ckpt")
    assert not (out / MOE_CONFIG_NAME).exists()
    loaded = load_moe_model(out)
    assert not moe_layers(loaded)
    ids = _ids(4)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mismatched_checkpoints_fail_clearly(pretrained_dir: Path, tmp_path: Path) -> None:
    model = _trained_moe(pretrained_dir)
    ckpt = save_moe_model(model, tmp_path / "ckpt")
    moe_json = ckpt / MOE_CONFIG_NAME
    original = moe_json.read_text()

    moe_json.unlink()  # MoE weights, no layout: the experts would be silently ignored
    with pytest.raises(MoescopeError, match=r"model\.safetensors.*unexpected.*experts"):
        load_moe_model(ckpt)

    meta = json.loads(original)
    meta["moe"]["n_experts"] = 2
    moe_json.write_text(json.dumps(meta))
    with pytest.raises(MoescopeError, match="shape mismatch.*router"):
        load_moe_model(ckpt)

    meta = json.loads(original)
    meta["moe"]["layers"] = [2, 3]
    moe_json.write_text(json.dumps(meta))
    with pytest.raises(MoescopeError, match="missing.*unexpected"):
        load_moe_model(ckpt)

    meta = json.loads(original)
    meta["moe"]["n_expert"] = 4
    moe_json.write_text(json.dumps(meta))
    with pytest.raises(MoescopeError, match="n_experts"):
        load_moe_model(ckpt)

    dense_ckpt = save_moe_model(GPT2LMHeadModel.from_pretrained(pretrained_dir), tmp_path / "dense")
    (dense_ckpt / MOE_CONFIG_NAME).write_text(original)  # layout without expert weights
    with pytest.raises(MoescopeError, match="missing"):
        load_moe_model(dense_ckpt)

    with pytest.raises(MoescopeError, match="not found"):
        load_moe_model(tmp_path / "nowhere")


def test_generate_reports_experts_of_each_new_token(pretrained_dir: Path) -> None:
    model = _trained_moe(pretrained_dir)
    prompt = _ids(7)[:3, :10]
    seqs, routing = generate_with_routing(model, prompt, max_new_tokens=6, do_sample=False)
    n_new = seqs.shape[1] - prompt.shape[1]
    assert not any(layer.capture for layer in moe_layers(model).values())  # flag restored
    assert n_new == 6 and sorted(routing) == [1, 3]
    for layer_idx, experts in routing.items():
        assert experts.shape == (3, n_new, 1)
    # the reported expert is the one the full sequence routes at the position that predicted the token
    layers = moe_layers(model)
    for layer in layers.values():
        layer.capture = True
    with torch.no_grad():
        model(seqs)
    for i, layer in layers.items():
        full = layer.last_record.expert_index.view(3, seqs.shape[1], 1)
        positions = torch.arange(prompt.shape[1] - 1, seqs.shape[1] - 1)
        assert torch.equal(full[:, positions], routing[i])
