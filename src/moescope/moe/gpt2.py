"""GPT-2 with MoE blocks: install (upcycle), find, anneal, save, load, generate with routing.

`install_moe` replaces chosen blocks' MLPs of a transformers `GPT2LMHeadModel` by
`MoELayer`s whose experts are copies of the dense MLP (plus small relative noise to
break symmetry). Checkpoints are a directory: `config.json` (the GPT2Config),
`model.safetensors` (all weights, tied embeddings stored once) and, for MoE models,
`moe_config.json` (the resolved MoE layout). Loading checks every key and shape and
fails naming the file: there are no silent partial loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_json
from moescope.io.config import from_dict, to_dict
from moescope.moe.config import MoEConfig, default_moe_layers
from moescope.moe.designs import refuse_generation_if_noncausal, split_experts
from moescope.moe.experts import GeluExpert, build_experts
from moescope.moe.layer import MoELayer
from moescope.moe.upcycle import add_relative_noise, dropped_units, resample_units

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MOE_CONFIG_NAME = "moe_config.json"
MOE_FORMAT = "moescope-moe/1"


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a GPT2LMHeadModel or GPT2Model."""
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise MoescopeError(f"{type(model).__name__} is not a GPT-2 model (no transformer.h blocks)")
    return blocks


@torch.no_grad()
def _upcycle_into(
    expert: GeluExpert, dense: nn.Module, rel_noise: float, reinit_ratio: float, gen: torch.Generator
) -> None:
    """Copy the dense MLP's c_fc/c_proj into `expert`: relative noise, then Drop-Upcycling.

    GPT-2's Conv1D stores c_fc.weight [d, ff] and c_proj.weight [ff, d], so hidden unit j
    is column j of c_fc.weight, element j of c_fc.bias and row j of c_proj.weight.
    """
    values = {}
    for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
        src = dense.get_parameter(name)
        dst = expert.get_parameter(name)
        if dst.shape != src.shape:
            raise MoescopeError(f"cannot upcycle {name}: dense shape {tuple(src.shape)} != expert {tuple(dst.shape)}")
        values[name] = add_relative_noise(src.detach().float().cpu(), rel_noise, gen)
    if reinit_ratio > 0:
        units = dropped_units(values["c_fc.bias"].numel(), reinit_ratio, gen)
        for name, axis in (("c_fc.weight", 1), ("c_fc.bias", 0), ("c_proj.weight", 0)):
            parent = dense.get_parameter(name).detach().float().cpu()
            values[name] = resample_units(values[name], units, axis, gen, reference=parent)
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


def install_moe(model: nn.Module, cfg: MoEConfig, *, seed: int = 0, upcycle: bool = True) -> dict[int, MoELayer]:
    """Replace the MLPs of blocks `cfg.layers` (default: last third) by MoE layers.

    GELU experts of the dense width are upcycled: each is a copy of the dense MLP plus
    Gaussian noise of std cfg.upcycle_noise_rel x that parameter's own std (0 = exact
    copies), then a random cfg.upcycle_reinit_ratio of its hidden units re-initialized
    (Drop-Upcycling; 0 = off). Other expert types or widths start from GPT-2's init. The router always
    starts fresh, N(0, initializer_range). `upcycle=False` skips the copy (used when
    weights are loaded right after). Returns {block_index: layer}; the resolved config
    is kept as `model.moe_config`.
    """
    blocks = _blocks(model)
    if moe_layers(model):
        raise MoescopeError("model already has MoE layers; install_moe runs once per model")
    hf_cfg = model.config
    n_blocks = len(blocks)
    layers = list(cfg.layers) if cfg.layers is not None else default_moe_layers(n_blocks)
    bad = [i for i in layers if not 0 <= i < n_blocks]
    if bad:
        raise MoescopeError(f"moe.layers {bad} out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    dense_ff = blocks[layers[0]].mlp.c_fc.nf
    resolved = replace(cfg, layers=sorted(layers), expert_ff=cfg.expert_ff or dense_ff)
    d_model = hf_cfg.n_embd
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
            activation=hf_cfg.activation_function,
            dropout=resolved.expert_dropout,
        )
        can_upcycle = resolved.expert_type == "gelu" and resolved.expert_ff == dense.c_fc.nf
        if upcycle and can_upcycle:
            for expert in experts:
                _upcycle_into(expert, dense, resolved.upcycle_noise_rel, resolved.upcycle_reinit_ratio, gen)
        elif upcycle:
            _init_fresh(experts, std, n_blocks, gen)
        experts, shared = split_experts(experts, resolved)  # fine-grained / shared experts (moe/designs.py)
        layer = MoELayer.from_config(resolved, experts, d_model, output_dropout=hf_cfg.resid_pdrop, shared_experts=shared)
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


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """{block_index: MoELayer} of any module; the index is the last integer in the layer's path."""
    found: dict[int, MoELayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            numbers = [int(part) for part in name.split(".") if re.fullmatch(r"\d+", part)]
            key = numbers[-1] if numbers else len(found)
            while key in found:
                key += 1
            found[key] = module
    return dict(sorted(found.items()))


def set_training_progress(model: nn.Module, progress: float) -> None:
    """Tell every MoE layer how far training is (0..1); the router noise anneals with it."""
    for layer in moe_layers(model).values():
        layer.progress = float(progress)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' weights (e.g. for a separate learning-rate multiplier)."""
    return [p for layer in moe_layers(model).values() for p in layer.router.parameters()]


# ---------------------------------------------------------------- save / load


def _atomic_save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_moe_model(model: nn.Module, directory: str | Path) -> Path:
    """Write config.json, model.safetensors and (MoE models) moe_config.json into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = moe_layers(model)
    _atomic_save_weights(model, directory / WEIGHTS_NAME)
    if layers:
        cfg = getattr(model, "moe_config", None)
        if cfg is None:
            raise MoescopeError("model has MoE layers but no moe_config (install them with install_moe)")
        atomic_write_json(
            directory / MOE_CONFIG_NAME,
            {"format": MOE_FORMAT, "moe": to_dict(cfg), "activation": model.config.activation_function},
        )
    else:
        with contextlib.suppress(FileNotFoundError):
            (directory / MOE_CONFIG_NAME).unlink()
    atomic_write_json(directory / CONFIG_NAME, json.loads(model.config.to_json_string()))
    return directory


def _read_moe_config(path: Path) -> MoEConfig:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MoescopeError(f"{path}: cannot read MoE config ({exc})") from exc
    if data.get("format") != MOE_FORMAT:
        raise MoescopeError(f"{path}: unknown MoE config format {data.get('format')!r} (expected {MOE_FORMAT!r})")
    return from_dict(MoEConfig, data.get("moe"), where=str(path))


def _check_weights(model: nn.Module, path: Path) -> None:
    """Raise naming `path` unless its tensors match the model's keys and shapes exactly."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        file_shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    params = model.state_dict()
    # tied tensors (lm_head.weight = wte.weight) are stored once under one of their names
    by_storage: dict[tuple[int, int], list[str]] = {}
    for key, t in params.items():
        by_storage.setdefault((t.data_ptr(), t.numel()), []).append(key)
    missing, mismatched = [], []
    covered: set[str] = set()
    for names in by_storage.values():
        present = [k for k in names if k in file_shapes]
        if not present:
            missing.extend(names)
            continue
        covered.update(present)
        want = tuple(params[names[0]].shape)
        for k in present:
            if file_shapes[k] != want:
                mismatched.append(f"{k}: file {file_shapes[k]} vs model {want}")
    unexpected = sorted(set(file_shapes) - covered)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch {mismatched[:3]}")
        if missing:
            parts.append(f"missing {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise MoescopeError(f"{path} does not match its config/MoE layout: {'; '.join(parts)}")


def load_moe_model(directory: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved by `save_moe_model` (MoE or dense) exactly; strict on keys and shapes."""
    from safetensors.torch import load_model
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise MoescopeError(f"{p} not found: not a moescope model directory")
    try:
        hf_cfg = GPT2Config.from_json_file(str(config_path))
    except (OSError, ValueError) as exc:
        raise MoescopeError(f"{config_path}: cannot read GPT-2 config ({exc})") from exc
    model = GPT2LMHeadModel(hf_cfg)
    moe_path = directory / MOE_CONFIG_NAME
    if moe_path.is_file():
        install_moe(model, _read_moe_config(moe_path), upcycle=False)
    _check_weights(model, weights_path)
    load_model(model, str(weights_path), strict=True)
    model.tie_weights()
    if device is not None:
        model.to(device)
    model.eval()
    return model


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate_with_routing(model: nn.Module, input_ids: torch.Tensor, **generate_kwargs: Any):
    """`model.generate(...)` plus, per MoE layer, the experts that produced each new token.

    Returns (sequences [B, prompt + new], {block: LongTensor[B, new, k]}): entry t is the
    expert choice at the last position of the forward pass that generated new token t.
    Greedy or sampled decoding only (beam search reorders hypotheses).
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise MoescopeError("generate_with_routing supports num_beams=1 only")
    layers = moe_layers(model)
    steps: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = []
    previous = {i: layer.capture for i, layer in layers.items()}

    def make_hook(i: int):
        def hook(module: MoELayer, inputs, output) -> None:
            x = inputs[0]
            rec = module.last_record
            idx = rec.expert_index.view(*x.shape[:-1], module.top_k)
            steps[i].append(idx.reshape(-1, idx.shape[-2], module.top_k)[:, -1])

        return hook

    try:
        for i, layer in layers.items():
            layer.capture = True
            hooks.append(layer.register_forward_hook(make_hook(i)))
        sequences = model.generate(input_ids, **generate_kwargs)
    finally:
        for h in hooks:
            h.remove()
        for i, layer in layers.items():
            layer.capture = previous[i]
    n_new = sequences.shape[1] - input_ids.shape[1]
    routing = {i: torch.stack(s[:n_new], dim=1) if s else torch.empty(0) for i, s in steps.items()}
    return sequences, routing
