"""Dense HF decoders with MoE blocks: install (upcycle), find, anneal, save, load, generate with routing.

`install_moe` replaces chosen blocks' MLPs of a transformers decoder (GPT-2, Llama,
Mistral, Qwen2, Qwen3, GPT-NeoX: one adapter per family in decoders.py) by `MoELayer`s
whose experts are copies of the dense MLP (plus small relative noise to break symmetry).
The module keeps its historical name: GPT-2 was its first family. Checkpoints are a
directory: `config.json` (the transformers config, with `architectures`),
`model.safetensors` (all weights, tied embeddings stored once), for MoE models
`moe_config.json` (the resolved MoE layout) and, when the caller knows it, the tokenizer.
Loading checks every key and shape and fails naming the file: there are no silent
partial loads, no pickles and no remote code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
from moescope.moe.activation import fuse_config_activation
from moescope.moe.decoders import DecoderFamily, ExpertTensors, decoder_family
from moescope.moe.designs import refuse_generation_if_noncausal, split_experts
from moescope.moe.experts import build_experts
from moescope.moe.layer import MoELayer
from moescope.moe.capture import record_routing
from moescope.moe.model import moe_layers
from moescope.moe.upcycle import add_relative_noise, dropped_units, resample_units

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MOE_CONFIG_NAME = "moe_config.json"
MOE_FORMAT = "moescope-moe/1"
# What transformers' tokenizers save (tokenizer*.json / tokenizer.model match by prefix).
TOKENIZER_FILES = frozenset({
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})


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


def _tokenizer_files(source: Path) -> list[Path]:
    """The tokenizer files in directory `source`; MoescopeError naming it when there are none."""
    if not source.is_dir():
        raise MoescopeError(f"tokenizer directory {source} not found")
    files = [f for f in sorted(source.iterdir()) if f.is_file() and _is_tokenizer_file(f.name)]
    if not files:
        raise MoescopeError(f"{source} holds no tokenizer files")
    return files


def _copy_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Put the tokenizer files beside the model, each file atomically.

    `tokenizer` is a directory holding a saved tokenizer (its files are copied byte for
    byte, so a data directory's tokenizer keeps the sha256 its manifest records) or a
    transformers tokenizer (saved with save_pretrained).
    """
    with tempfile.TemporaryDirectory(prefix=".tokenizer.", dir=directory) as tmp:
        if isinstance(tokenizer, (str, Path)):
            files = _tokenizer_files(Path(tokenizer))
        else:
            tokenizer.save_pretrained(tmp)
            files = _tokenizer_files(Path(tmp))
        for f in files:
            staged = Path(tmp) / f".{f.name}.part"
            shutil.copyfile(f, staged)
            os.replace(staged, directory / f.name)


def _is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.startswith("tokenizer")


def save_moe_model(model: nn.Module, directory: str | Path, *, tokenizer: Any = None) -> Path:
    """Write config.json, model.safetensors, (MoE models) moe_config.json and, when given, the
    tokenizer (a tokenizer directory or object) into `directory`: a self-contained model."""
    directory = Path(directory)
    if isinstance(tokenizer, (str, Path)):
        _tokenizer_files(Path(tokenizer))  # a bad tokenizer directory fails before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    layers = moe_layers(model)
    _atomic_save_weights(model, directory / WEIGHTS_NAME)
    if layers:
        cfg = getattr(model, "moe_config", None)
        if cfg is None:
            raise MoescopeError("model has MoE layers but no moe_config (install them with install_moe)")
        activation = decoder_family(model).activation(model.config)
        atomic_write_json(directory / MOE_CONFIG_NAME,
                          {"format": MOE_FORMAT, "moe": to_dict(cfg), "activation": activation})
    else:
        with contextlib.suppress(FileNotFoundError):
            (directory / MOE_CONFIG_NAME).unlink()
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, directory)
    config = json.loads(model.config.to_json_string())
    config["architectures"] = [type(model).__name__]  # the class load_moe_model rebuilds
    atomic_write_json(directory / CONFIG_NAME, config)
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


def _read_hf_config(path: Path):
    """The transformers config in `path`, by its model_type: never remote code, never a pickle."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MoescopeError(f"{path}: cannot read model config ({exc})") from exc
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise MoescopeError(f"{path}: unknown model_type {model_type!r} (not an architecture this transformers knows)")
    try:
        return CONFIG_MAPPING[model_type].from_json_file(str(path)), data.get("architectures") or []
    except (OSError, ValueError, TypeError) as exc:
        raise MoescopeError(f"{path}: cannot read {model_type} config ({exc})") from exc


def build_causal_lm(config) -> nn.Module:
    """A randomly initialized causal LM of `config`'s architecture (transformers' own class),
    with GPT-2's Python gelu_new switched to the fused op (activation.fuse_config_activation)."""
    from transformers import AutoModelForCausalLM

    fuse_config_activation(config)
    try:
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise MoescopeError(f"{type(config).__name__}: no causal-LM class in transformers ({exc})") from exc


def load_moe_model(directory: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved by `save_moe_model` (MoE or dense, any transformers causal LM;
    MoE layers on the families of decoders.py); strict on keys and shapes.

    Models saved with GPT-2's Python gelu_new come back with the fused op computing the
    same function (outputs agree to ~1e-6); everything else is as saved.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise MoescopeError(f"{p} not found: not a moescope model directory")
    hf_cfg, architectures = _read_hf_config(config_path)
    model = build_causal_lm(hf_cfg)
    if architectures and type(model).__name__ not in architectures:
        raise MoescopeError(f"{config_path}: architectures {architectures} is not a causal LM "
                            f"(moescope rebuilds {type(model).__name__})")
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

    def make_hook(i: int):
        def hook(module: MoELayer, inputs, output) -> None:
            x = inputs[0]
            rec = module.last_record
            idx = rec.expert_index.view(*x.shape[:-1], module.top_k)
            steps[i].append(idx.reshape(-1, idx.shape[-2], module.top_k)[:, -1])

        return hook

    try:
        with record_routing(layers):
            hooks.extend(layer.register_forward_hook(make_hook(i)) for i, layer in layers.items())
            sequences = model.generate(input_ids, **generate_kwargs)
    finally:
        for h in hooks:
            h.remove()
    n_new = sequences.shape[1] - input_ids.shape[1]
    routing = {i: torch.stack(s[:n_new], dim=1) if s else torch.empty(0) for i, s in steps.items()}
    return sequences, routing
