"""Installing MoE layers into a dense Hugging Face decoder: upcycle its MLPs into experts.

`install_moe` replaces chosen blocks' MLPs of a transformers decoder (GPT-2, Llama,
Mistral, Qwen2, Qwen3, GPT-NeoX: one adapter per family in decoders.py) by `MoELayer`s
whose experts are copies of the dense MLP (plus small relative noise to break symmetry).
Module surgery only (computation): no files, no printing; saving and loading such a model
is moe/hf_model.py.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig, default_moe_layers
from moescope.moe.decoders import DecoderFamily, ExpertTensors, decoder_family
from moescope.moe.designs import refuse_generation_if_noncausal, split_experts
from moescope.moe.experts import build_experts
from moescope.moe.layer import MoELayer
from moescope.moe.model import moe_layers
from moescope.moe.upcycle import add_relative_noise, dropped_units, resample_units


@torch.no_grad()
def _upcycle_into(
    expert: nn.Module, tensors: ExpertTensors, n_units: int, rel_noise: float, reinit_ratio: float,
    gen: torch.Generator,
) -> None:
    """Copy the dense MLP's tensors into `expert`: relative noise, then Drop-Upcycling.

    `tensors` are the dense MLP's tensors in the expert's layout (decoders.py), each with
    the axis indexing its `n_units` hidden units (None for the output bias): dropping unit j
    redraws its input weights, its bias and its output weights together.
    """
    values = {}
    for name, src, _ in tensors:
        dst = expert.get_parameter(name)
        if dst.shape != src.shape:
            raise MoescopeError(f"cannot upcycle {name}: dense shape {tuple(src.shape)} != expert {tuple(dst.shape)}")
        values[name] = add_relative_noise(src.detach().float().cpu(), rel_noise, gen)
    if reinit_ratio > 0:
        units = dropped_units(n_units, reinit_ratio, gen)
        for name, src, axis in tensors:
            if axis is not None:
                values[name] = resample_units(values[name], units, axis, gen, reference=src.detach().float().cpu())
    for name, value in values.items():
        expert.get_parameter(name).copy_(value.to(expert.get_parameter(name).dtype))


@torch.no_grad()
def _init_fresh(experts: nn.ModuleList, std: float, n_blocks: int, gen: torch.Generator) -> None:
    """GPT-2's init for experts that cannot be upcycled: N(0, std), output projections scaled."""
    for expert in experts:
        for name, p in expert.named_parameters():
            if name.endswith("bias"):
                p.zero_()
                continue
            scale = std / (2 * n_blocks) ** 0.5 if name.split(".")[0] in ("c_proj", "down_proj") else std
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _expert_type(family: DecoderFamily, requested: str) -> str:
    """"auto" = the dense MLP's own kind; GELU experts exist only for families with a GELU MLP."""
    if requested == "auto":
        return family.expert_type
    if requested == "gelu" and family.expert_type != "gelu":
        raise MoescopeError(
            f"moe.expert_type='gelu' cannot be built for {family.name}: its MLP is "
            f"{family.expert_type}; set moe.expert_type to '{family.expert_type}' or 'auto'"
        )
    return requested


def install_moe(model: nn.Module, cfg: MoEConfig, *, seed: int = 0, upcycle: bool = True) -> dict[int, MoELayer]:
    """Replace the MLPs of blocks `cfg.layers` (default: last third) by MoE layers.

    Works on every decoder family of decoders.py (GPT-2, Llama, Mistral, Qwen2, Qwen3,
    GPT-NeoX), found from the model's classes. Experts of the dense MLP's kind and width
    are upcycled: each is a copy of the dense MLP (SwiGLU for the Llama-style families)
    plus Gaussian noise of std cfg.upcycle_noise_rel x that parameter's own std (0 = exact
    copies), then a random cfg.upcycle_reinit_ratio of its hidden units re-initialized
    (Drop-Upcycling; 0 = off). Other expert types or widths start from GPT-2's init. The
    router always starts fresh, N(0, initializer_range). `upcycle=False` skips the copy
    (used when weights are loaded right after). Returns {block_index: layer}; the resolved
    config (concrete expert type and width) is kept as `model.moe_config`.
    """
    family = decoder_family(model)
    blocks = family.blocks(model)
    if moe_layers(model):
        raise MoescopeError("model already has MoE layers; install_moe runs once per model")
    hf_cfg = model.config
    n_blocks = len(blocks)
    layers = list(cfg.layers) if cfg.layers is not None else default_moe_layers(n_blocks)
    bad = [i for i in layers if not 0 <= i < n_blocks]
    if bad:
        raise MoescopeError(f"moe.layers {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    for i in layers:
        family.check_mlp(blocks[i].mlp, hf_cfg)
    dense_ff = family.dense_ff(blocks[layers[0]].mlp)
    resolved = replace(cfg, layers=sorted(layers), expert_ff=cfg.expert_ff or dense_ff,
                       expert_type=_expert_type(family, cfg.expert_type))
    d_model = hf_cfg.hidden_size
    std = getattr(hf_cfg, "initializer_range", 0.02)
    installed: dict[int, MoELayer] = {}
    for i in resolved.layers:
        dense = blocks[i].mlp
        ref = next(dense.parameters())
        gen = torch.Generator().manual_seed(seed * 1009 + i)
        experts = build_experts(
            resolved.n_experts,
            d_model,
            resolved.expert_ff,
            expert_type=resolved.expert_type,
            activation=family.activation(hf_cfg),
            dropout=resolved.expert_dropout,
        )
        can_upcycle = resolved.expert_type == family.expert_type and resolved.expert_ff == family.dense_ff(dense)
        if upcycle and can_upcycle:
            tensors = family.expert_tensors(dense)
            for expert in experts:
                _upcycle_into(expert, tensors, resolved.expert_ff, resolved.upcycle_noise_rel,
                              resolved.upcycle_reinit_ratio, gen)
        elif upcycle:
            _init_fresh(experts, std, n_blocks, gen)
        experts, shared = split_experts(experts, resolved)  # fine-grained / shared experts (moe/designs.py)
        layer = MoELayer.from_config(resolved, experts, d_model, output_dropout=family.output_dropout(hf_cfg),
                                     shared_experts=shared)
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * std)
        layer.to(device=ref.device, dtype=ref.dtype)
        layer.train(dense.training)
        blocks[i].mlp = layer
        installed[i] = layer
    model.moe_config = resolved
    refuse_generation_if_noncausal(model, resolved)
    return installed


@torch.no_grad()
def install_moe_measured(
    model: nn.Module, cfg: MoEConfig, input_ids: torch.Tensor, *, seed: int = 0
) -> tuple[dict[int, MoELayer], float]:
    """`install_moe` plus the warm-start deviation: max |logit change| on `input_ids` (eval mode).

    0.0 for upcycled top-1 STE layers without noise; with upcycling or router noise it
    says how far the model starts from its dense parent.
    """
    was_training = model.training
    model.eval()
    dense = model(input_ids).logits
    layers = install_moe(model, cfg, seed=seed)
    deviation = float((model(input_ids).logits - dense).abs().max())
    model.train(was_training)
    return layers, deviation
