"""Upcycling any dense HF decoder: parity with the dense model, save/load, adapters, errors, CLI.

Tiny random-weight instances of each family, built from transformers' config classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config,
)

from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig
from moescope.moe.decoders import FAMILIES, decoder_family
from moescope.moe.experts import GeluExpert, SwiGLUExpert
from moescope.moe.hf_model import MOE_CONFIG_NAME, load_moe_model, save_moe_model
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers
from moescope.moe.grouped import supports_grouped

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)
CONFIGS = {
    "Llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, head_dim=8),
    "Mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=8),
    "Qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2),
    "Qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8),
    "GPT-NeoX": lambda: GPTNeoXConfig(**_COMMON, hidden_act="gelu"),
}


def _dense(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose weights are large enough (std 0.1) that the MLPs move the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(std=0.1)
    return model.eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 40), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_copies_without_noise_give_the_dense_logits(family: str, top_k: int) -> None:
    model = _dense(family)
    ids = _ids()
    dense = _logits(model, ids)
    layers = install_moe(model, MoEConfig(n_experts=4, top_k=top_k, layers=[0, 1], expert_type="auto",
                                          upcycle_noise_rel=0.0))
    assert decoder_family(model).name == family
    for layer in layers.values():
        assert supports_grouped(layer.experts) and layer.grouped_experts  # the grouped path runs them
    moe = _logits(model, ids)
    for layer in layers.values():  # the router really spread tokens over several experts
        assert (layer.last_record.tokens_per_expert > 0).sum() >= 2
    torch.testing.assert_close(moe, dense, rtol=1e-5, atol=1e-5)
    # control: perturbed copies move the logits well beyond that tolerance
    noisy = _dense(family)
    install_moe(noisy, MoEConfig(n_experts=4, top_k=top_k, layers=[0, 1], expert_type="auto",
                                 upcycle_noise_rel=0.2))
    assert (_logits(noisy, ids) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(CONFIGS))
def test_save_load_round_trip_gives_identical_logits(family: str, tmp_path: Path) -> None:
    model = _dense(family)
    install_moe(model, MoEConfig(n_experts=4, top_k=2, layers=[1], expert_type="auto", upcycle_noise_rel=0.1,
                                 upcycle_reinit_ratio=0.25), seed=3)
    out = save_moe_model(model, tmp_path / "ckpt")
    assert sorted(f.name for f in out.iterdir()) == sorted(["config.json", MOE_CONFIG_NAME, "model.safetensors"])
    loaded = load_moe_model(out)
    assert type(loaded) is type(model) and sorted(moe_layers(loaded)) == [1]
    assert loaded.moe_config == model.moe_config and loaded.moe_config.expert_type in ("gelu", "swiglu")
    ids = _ids(2)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_a_reloaded_model_saves_the_same_bytes_as_the_fresh_one(tmp_path: Path) -> None:
    """A fresh config has no `architectures`, a reloaded one has: the saved config.json must not depend on
    that, or a run resumed from a checkpoint differs byte for byte from an uninterrupted one."""
    model = _dense("Llama")
    assert model.config.architectures is None
    install_moe(model, MoEConfig(n_experts=2, layers=[1], expert_type="auto"), seed=0)
    first = save_moe_model(model, tmp_path / "fresh")
    again = save_moe_model(load_moe_model(first), tmp_path / "reloaded")
    for name in ("config.json", MOE_CONFIG_NAME, "model.safetensors"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_swiglu_drop_upcycling_redraws_whole_hidden_units() -> None:
    model = _dense("Llama")
    mlp = model.model.layers[1].mlp
    gate, up, down = (p.detach().clone() for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    layer = install_moe(model, MoEConfig(n_experts=3, layers=[1], expert_type="swiglu", upcycle_noise_rel=0.0,
                                         upcycle_reinit_ratio=0.25))[1]
    for expert in layer.experts:
        assert isinstance(expert, SwiGLUExpert)
        changed = (expert.gate_proj.weight != gate).any(1)  # unit j = row j of gate/up, column j of down
        assert int(changed.sum()) == 16
        assert torch.equal((expert.up_proj.weight != up).any(1), changed)
        assert torch.equal((expert.down_proj.weight != down).any(0), changed)
        assert torch.equal(expert.down_proj.weight[:, ~changed], down[:, ~changed])


def test_gpt_neox_mlp_is_transposed_into_gelu_experts() -> None:
    model = _dense("GPT-NeoX")
    mlp = model.gpt_neox.layers[0].mlp
    expert = install_moe(model, MoEConfig(n_experts=2, layers=[0], upcycle_noise_rel=0.0))[0].experts[1]
    assert isinstance(expert, GeluExpert) and type(expert.act) is type(mlp.act)
    assert torch.equal(expert.c_fc.weight, mlp.dense_h_to_4h.weight.t())
    assert torch.equal(expert.c_proj.weight, mlp.dense_4h_to_h.weight.t())
    assert torch.equal(expert.c_fc.bias, mlp.dense_h_to_4h.bias)


def test_unsupported_models_and_expert_types_fail_clearly() -> None:
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.raises(MoescopeError, match="OPTForCausalLM is not a supported.*" + ".*".join(
            f.name for f in FAMILIES)):
        install_moe(opt, MoEConfig(n_experts=2))
    with pytest.raises(MoescopeError, match="expert_type='gelu' cannot be built for Llama.*'swiglu' or 'auto'"):
        install_moe(_dense("Llama"), MoEConfig(n_experts=2))
    bias = AutoModelForCausalLM.from_config(LlamaConfig(**_COMMON, head_dim=8, mlp_bias=True))
    with pytest.raises(MoescopeError, match="mlp_bias"):
        install_moe(bias, MoEConfig(n_experts=2, expert_type="auto"))
    gelu_gate = AutoModelForCausalLM.from_config(LlamaConfig(**_COMMON, head_dim=8, hidden_act="gelu"))
    with pytest.raises(MoescopeError, match="hidden_act='gelu'"):
        install_moe(gelu_gate, MoEConfig(n_experts=2, expert_type="auto"))


def test_family_is_found_from_the_class_not_the_name() -> None:
    model = _dense("Qwen2")
    model.config.model_type = "llama"  # names lie; classes do not
    model.config.architectures = ["LlamaForCausalLM"]
    assert decoder_family(model).name == "Qwen2"
    assert decoder_family(model.model).name == "Qwen2"  # the bare decoder too


def test_cli_trains_moe_from_a_tiny_llama_base(tmp_path: Path, capsys) -> None:
    from moescope.cli import main
    from moescope.data.tokenizer import train_bpe
    from train_fixtures import make_block_store

    texts = [f"def f{i}(x): return x * {i}\nThe sum of {i} and {i + 1} is {2 * i + 1}." for i in range(200)]
    tok = train_bpe(texts, vocab_size=300, model_max_length=64)
    vocab = len(tok)
    base = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**{**_COMMON, "vocab_size": vocab}, num_key_value_heads=2,
                                                         head_dim=8))
    llama.save_pretrained(base)
    tok.save_pretrained(base)
    data = make_block_store(tmp_path / "data", vocab=vocab, block=16)
    tok.save_pretrained(data / "tokenizer")  # as `data build` with tokenizer.name_or_path = the base writes it
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        f'data_dir = "{data}"\narms = ["moe"]\n'
        '[moe]\nn_experts = 4\nlayers = [1]\nexpert_type = "auto"\nupcycle_reinit_ratio = 0.5\n'
        '[train]\nsteps = 3\nbatch_sequences = 4\neval_every_steps = 3\neval_max_blocks_per_domain = 2\n'
        '[tracking]\nprogress_bar = false\n'
    )
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--base", str(base), "--out", str(run)]) == 0
    final = run / "arms" / "moe" / "final"
    model = load_moe_model(final)
    assert type(model).__name__ == "LlamaForCausalLM" and model.moe_config.expert_type == "swiglu"
    assert all(isinstance(e, SwiGLUExpert) for e in moe_layers(model)[1].experts)
    assert (final / "tokenizer.json").read_bytes() == (data / "tokenizer" / "tokenizer.json").read_bytes()
    summary = json.loads((run / "summary.json").read_text())["moe"]
    assert summary["steps"] == 3 and summary["final_eval"]["loss"]["token_weighted"] < 20
    assert "moe" in capsys.readouterr().out


def test_sharded_base_loads_exactly_and_a_missing_weight_is_an_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from moescope.train.model import load_init_model

    model = _dense("Qwen2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: transformers' loader, not ours
    assert not (tmp_path / "model.safetensors").exists()
    ids = _ids()
    assert torch.equal(_logits(load_init_model(tmp_path).eval(), ids), _logits(model, ids))
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "lm_head.weight"
    shard = tmp_path / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(MoescopeError, match=r"1 tensor\(s\) missing from the checkpoint \(lm_head.weight\)"):
        load_init_model(tmp_path)
