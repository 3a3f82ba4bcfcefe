"""Saving and loading a transformers causal LM with or without MoE layers (any decoder family).

A model is a directory: `config.json` (the transformers config, with `architectures`),
`model.safetensors` (all weights, tied embeddings stored once), for MoE models
`moe_config.json` (the resolved MoE layout, rebuilt by moe/install.py) and, when the caller
knows it, the tokenizer. Loading checks every key and shape and fails naming the file: there
are no silent partial loads, no pickles and no remote code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moescope.data.tokenizer import save_tokenizer
from moescope.errors import MoescopeError, first_line
from moescope.io.atomic import atomic_write_json, new_temporary, plain_file_mode
from moescope.io.config import from_dict, to_dict
from moescope.io.saved_model import STRICT_CONFIG_ERRORS, config_error
from moescope.moe.activation import fuse_config_activation
from moescope.moe.config import MoEConfig
from moescope.moe.decoders import decoder_family
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MOE_CONFIG_NAME = "moe_config.json"
MOE_FORMAT = "moescope-moe/1"
# What transformers' tokenizers save (tokenizer*.json / tokenizer.model match by prefix).
TOKENIZER_FILES = frozenset({
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})




def _atomic_save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    fd, tmp = new_temporary(path)
    os.close(fd)
    try:
        save_model(model, tmp)  # safetensors writes a new file of its own (0600)
        os.chmod(tmp, plain_file_mode())
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
    # ".tmp": a killed save leaves what remove_orphaned_temporaries clears before the next one
    with tempfile.TemporaryDirectory(prefix=".tokenizer.", suffix=".tmp", dir=directory) as tmp:
        if isinstance(tokenizer, (str, Path)):
            files = _tokenizer_files(Path(tokenizer))
        else:
            save_tokenizer(tokenizer, Path(tmp))
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
    # keys sorted as to_json_string sorts them: a fresh model's config has no architectures yet, a reloaded
    # one has; the same model must give the same bytes either way (a resumed run equals an uninterrupted one)
    config = dict(sorted(config.items()))
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


def read_moe_config(directory: str | Path) -> MoEConfig | None:
    """The MoE layout a saved model directory records (None: a dense model), read without building it."""
    path = Path(directory) / MOE_CONFIG_NAME
    return _read_moe_config(path) if path.is_file() else None


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (stored dtype such as "BF16" or "F8_E4M3", shape)} from a safetensors header, which
    safetensors checks (length, JSON, every tensor within the file). A missing, truncated, empty or foreign
    file is one error naming it (safetensors' own message names no file); anything but a regular file is
    refused unopened (a FIFO would block the read forever)."""
    import stat

    from safetensors import SafetensorError, safe_open

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MoescopeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise MoescopeError(f"{path}: not a regular file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: (fh.get_slice(key).get_dtype(), tuple(fh.get_slice(key).get_shape())) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise MoescopeError(f"{path}: unreadable safetensors file ({first_line(exc)})") from exc


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header (see safetensors_header)."""
    return {key: shape for key, (_, shape) in safetensors_header(path).items()}


def _check_weights(model: nn.Module, path: Path) -> None:
    """Raise naming `path` unless its tensors match the model's keys and shapes exactly."""
    file_shapes = weight_shapes(path)
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
    except (OSError, ValueError, TypeError, *STRICT_CONFIG_ERRORS) as exc:  # a value of the wrong type
        raise config_error(path, exc) from exc


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
