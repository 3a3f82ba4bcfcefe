"""Tiny random-weight Hugging Face MoE models, a tokenizer and held-out texts, all offline.

Every builder returns a transformers config for a model of a few layers, hidden
size 32 and 8 experts (top-2 or top-4), with the architecture's own non-MoE
layers kept (first_k_dense_replace, decoder_sparse_step, mlp_only_layers,
Jamba's expert period) so that layer bookkeeping is tested too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moescope.data.blocks import FORMAT_VERSION, texts_path

HIDDEN, N_EXPERTS = 32, 8
COMMON = dict(hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
              intermediate_size=48)


def corpus(seed: int = 0) -> dict[str, list[str]]:
    """Three domains of short texts with different vocabularies."""
    rng = np.random.default_rng(seed)
    code = [f"def f{i}(x):\n    return x * {i} + {int(rng.integers(9))}\n" for i in range(30)]
    math = [f"What is {a} plus {b}?\n\n{a} + {b} = {a + b}" for a, b in rng.integers(0, 99, size=(30, 2))]
    prose = [f"The {w} walked to the {v} and saw {i} birds." for i, (w, v) in
             enumerate(zip(rng.choice(["cat", "dog", "man", "girl"], 30), rng.choice(["park", "sea", "town"], 30)))]
    return {"code": code, "math": math, "prose": prose}


def make_tokenizer(vocab_size: int = 320):
    from moescope.data.tokenizer import train_bpe

    texts = [t for ts in corpus().values() for t in ts]
    return train_bpe(texts, vocab_size=vocab_size, min_frequency=1)


def write_texts_data_dir(root: Path, texts: dict[str, list[str]] | None = None) -> Path:
    """A data directory holding only what `analyze --model` reads: manifest domains and held-out texts."""
    texts = texts or corpus()
    for domain, items in texts.items():
        path = texts_path(root, "eval", domain)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in items), encoding="utf-8")
    manifest = {"format_version": FORMAT_VERSION, "block_size": 16, "vocab_size": 320, "eos_token_id": 0,
                "dtype": "uint16", "domains": list(texts), "splits": {"eval": {d: {"n_blocks": 0} for d in texts}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _cfg(model_type: str, **kw):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**kw)


def config_for(arch: str, vocab_size: int):
    """A tiny config of one architecture (8 experts), with its dense layers where the family has them."""
    v = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    moe = dict(moe_intermediate_size=24, num_experts_per_tok=2)
    if arch == "mixtral":
        return _cfg("mixtral", **COMMON, **v, num_hidden_layers=2, num_local_experts=N_EXPERTS, num_experts_per_tok=2)
    if arch == "olmoe":
        return _cfg("olmoe", **COMMON, **v, num_hidden_layers=2, num_experts=N_EXPERTS, num_experts_per_tok=4)
    if arch == "qwen2_moe":
        return _cfg("qwen2_moe", **COMMON, **v, **moe, num_hidden_layers=3, num_experts=N_EXPERTS,
                    shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[1],
                    norm_topk_prob=False)
    if arch == "qwen3_moe":
        return _cfg("qwen3_moe", **COMMON, **v, **moe, num_hidden_layers=3, num_experts=N_EXPERTS,
                    decoder_sparse_step=2, norm_topk_prob=True, head_dim=16)
    mla = {**COMMON, "num_key_value_heads": 2}  # multi-head latent attention: as many kv heads as heads
    if arch == "deepseek_v2":
        return _cfg("deepseek_v2", **mla, **v, **moe, num_hidden_layers=3, n_routed_experts=N_EXPERTS,
                    n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, topk_method="group_limited_greedy",
                    n_group=4, topk_group=2, routed_scaling_factor=1.5)
    if arch == "deepseek_v3":
        return _cfg("deepseek_v3", **mla, **v, moe_intermediate_size=24, num_experts_per_tok=4,
                    num_hidden_layers=3, n_routed_experts=N_EXPERTS, n_shared_experts=1, first_k_dense_replace=1,
                    kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    if arch == "glm4_moe":
        return _cfg("glm4_moe", **COMMON, **v, moe_intermediate_size=24, num_experts_per_tok=2, num_hidden_layers=3,
                    n_routed_experts=N_EXPERTS, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                    topk_group=1, head_dim=16)
    if arch == "gpt_oss":
        return _cfg("gpt_oss", **COMMON, **v, num_hidden_layers=2, num_local_experts=N_EXPERTS,
                    num_experts_per_tok=2, head_dim=16, sliding_window=16)
    if arch in ("granitemoe", "granitemoeshared"):
        extra = {"shared_intermediate_size": 24} if arch == "granitemoeshared" else {}
        return _cfg(arch, **COMMON, **v, num_hidden_layers=2, num_local_experts=N_EXPERTS, num_experts_per_tok=2,
                    **extra)
    if arch == "phimoe":
        return _cfg("phimoe", **COMMON, **v, num_hidden_layers=2, num_local_experts=N_EXPERTS, num_experts_per_tok=2)
    if arch == "jamba":
        return _cfg("jamba", **COMMON, **v, num_hidden_layers=4, num_experts=N_EXPERTS, num_experts_per_tok=2,
                    expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0,
                    use_mamba_kernels=False, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4)
    if arch == "dbrx":
        return _cfg("dbrx", **v, d_model=HIDDEN, n_heads=2, n_layers=2, max_seq_len=256,
                    attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
                    ffn_config={"ffn_hidden_size": 24, "moe_num_experts": N_EXPERTS, "moe_top_k": 2})
    # families without an adapter of their own (read through adapters.generic_adapter), and Llama 4
    if arch == "ernie4_5_moe":
        return _cfg("ernie4_5_moe", **COMMON, **v, num_hidden_layers=3, moe_num_experts=N_EXPERTS, moe_k=2,
                    moe_intermediate_size=24, moe_layer_start_index=1, moe_num_shared_experts=1)
    if arch == "hunyuan_v1_moe":  # top-1 with a shared expert
        return _cfg("hunyuan_v1_moe", **COMMON, **v, num_hidden_layers=2, num_experts=N_EXPERTS, moe_topk=1,
                    head_dim=16)
    if arch == "minimax_m2":  # sigmoid scores with a selection bias
        return _cfg("minimax_m2", **COMMON, **v, num_hidden_layers=2, num_local_experts=N_EXPERTS,
                    num_experts_per_tok=2, head_dim=16)
    if arch == "flex_olmo":
        return _cfg("flex_olmo", **COMMON, **v, num_hidden_layers=2, num_experts=N_EXPERTS, num_experts_per_tok=2)
    if arch == "exaone_moe":
        return _cfg("exaone_moe", **COMMON, **v, **moe, num_hidden_layers=3, num_experts=N_EXPERTS,
                    num_shared_experts=1, first_k_dense_replace=1, head_dim=16)
    if arch == "glm4_moe_lite":
        return _cfg("glm4_moe_lite", **mla, **v, **moe, num_hidden_layers=2, n_routed_experts=N_EXPERTS,
                    n_shared_experts=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    if arch == "llama4_text":  # its experts run on every token, weighted by the router's dense scores
        return _cfg("llama4_text", **COMMON, **v, num_hidden_layers=2, num_local_experts=N_EXPERTS,
                    num_experts_per_tok=2, intermediate_size_mlp=48, head_dim=16, interleave_moe_layer_step=2)
    if arch == "deepseek_v4":  # a hash-routed first layer (its own router class), sqrtsoftplus scores
        return _cfg("deepseek_v4", **v, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32, q_lora_rank=16, o_lora_rank=16, moe_intermediate_size=24,
                    n_routed_experts=N_EXPERTS, num_experts_per_tok=2, n_shared_experts=1, index_head_dim=16,
                    index_n_heads=2, index_topk=4, mlp_layer_types=["hash_moe", "moe", "moe"],
                    layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                 "heavily_compressed_attention"])
    if arch == "qwen3_vl_moe":  # a vision-language MoE: no text-only class, read through its text forward
        text = dict(**COMMON, **v, **moe, num_hidden_layers=2, num_experts=N_EXPERTS, head_dim=16,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
        return _cfg("qwen3_vl_moe", text_config=text, vision_config=dict(
            depth=1, hidden_size=HIDDEN, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN,
            deepstack_visual_indexes=[0]))
    if arch == "gemma4_text":  # its router returns softmax probabilities, not logits
        return _cfg("gemma4_text", **COMMON, **v, num_hidden_layers=2, enable_moe_block=True, num_experts=N_EXPERTS,
                    top_k_experts=2, moe_intermediate_size=24, head_dim=16)
    if arch == "inkling_text":  # the router's weight also holds its shared expert's gate (n_routed + 1 rows)
        return _cfg("inkling_text", **COMMON, **v, num_hidden_layers=2, n_routed_experts=N_EXPERTS,
                    num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1, head_dim=16)
    if arch == "ernie4_5_vl_moe":  # one MoE block per modality inside the recorded block; text read on text
        text = dict(**COMMON, **v, num_hidden_layers=3, moe_num_experts=N_EXPERTS, moe_k=2,
                    moe_intermediate_size=[24, 24], moe_layer_start_index=1, moe_num_shared_experts=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]})
        return _cfg("ernie4_5_vl_moe", text_config=text,
                    vision_config=dict(depth=1, hidden_size=HIDDEN, intermediate_size=32, num_heads=2))
    raise KeyError(arch)


ARCHITECTURES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
                 "granitemoe", "granitemoeshared", "phimoe", "jamba", "dbrx", "llama4_text"]
# released families moescope has no adapter for, read by the generic one (adapters.generic_adapter)
GENERIC_ARCHITECTURES = ["ernie4_5_moe", "hunyuan_v1_moe", "minimax_m2", "flex_olmo", "exaone_moe", "glm4_moe_lite",
                         "qwen3_vl_moe", "deepseek_v4", "gemma4_text", "inkling_text", "ernie4_5_vl_moe"]
# the decoder layers that must be MoE in config_for's models
EXPECTED_MOE_LAYERS = {"qwen2_moe": [0, 2], "qwen3_moe": [1], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2],
                       "glm4_moe": [1, 2], "jamba": [1, 3], "ernie4_5_moe": [1, 2], "exaone_moe": [1, 2],
                       "llama4_text": [1], "glm4_moe_lite": [1], "deepseek_v4": [0, 1, 2], "ernie4_5_vl_moe": [1, 2]}


def build_model(arch: str, vocab_size: int, seed: int = 0):
    """A random-weight model with routers scaled up so routing is far from uniform (ties would make parity moot)."""
    import transformers

    from moescope.hf.loading import auto_class_for

    torch.manual_seed(seed)
    config = config_for(arch, vocab_size)
    model = getattr(transformers, auto_class_for(arch, config)).from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "gate.wg.weight", "router.weight", "router.layer.weight", "router.proj.weight")) \
                    and param.dim() == 2:
                param.normal_(0.0, 0.5)
            elif name.endswith("e_score_correction_bias"):
                param.normal_(0.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
            elif name.endswith("tid2eid"):  # DeepSeek-V4's token-hash table: every token to two distinct experts
                first = torch.randint(0, N_EXPERTS, buf.shape[:1])
                buf.copy_(torch.stack([first, (first + 1 + torch.randint(0, N_EXPERTS - 1, first.shape)) % N_EXPERTS],
                                      -1)[:, : buf.shape[1]])
    return model.eval()


def save_model_dir(root: Path, arch: str, seed: int = 0, tokenizer=None) -> Path:
    """model + tokenizer saved with save_pretrained into ROOT (the CLI's local-directory path)."""
    tokenizer = tokenizer or make_tokenizer()
    model = build_model(arch, len(tokenizer), seed)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


class _TouchOnUnpickle:
    """Unpickling this touches `marker`: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def replace_weights_with_pickle(model_dir: Path, marker: Path) -> None:
    """model_dir's model.safetensors becomes a pytorch_model.bin that runs code (touches `marker`)
    if anything unpickles it."""
    import pickle

    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _TouchOnUnpickle(marker)}))
