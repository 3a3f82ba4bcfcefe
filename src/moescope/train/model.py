"""Where a run's data and model come from: the data directory (`open_store`), a fresh GPT-2,
pretrained weights (any transformers causal LM; MoE upcycling for the families of moe/decoders.py),
or a saved model; and the checks that the model fits the data directory (vocabulary, context)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moescope.data.blocks import BlockStore
from moescope.errors import MoescopeError
from moescope.moe.activation import fuse_config_activation, fused_activation
from moescope.io.saved_model import STRICT_CONFIG_ERRORS, config_error, load_saved_model
from moescope.moe.hf_model import MOE_CONFIG_NAME, WEIGHTS_NAME
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers
from moescope.train.config import ModelConfig, RunConfig


def build_scratch_model(cfg: ModelConfig, store: BlockStore, seed: int) -> nn.Module:
    """A randomly initialized GPT-2 of shape `cfg`, with the data's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if store.block_size > cfg.context_tokens:
        raise MoescopeError(
            f"{store.root}: block size {store.block_size} tokens is longer than model.context_tokens="
            f"{cfg.context_tokens}; rebuild the data with a smaller block or raise model.context_tokens"
        )
    hf = GPT2Config(
        vocab_size=store.vocab_size,
        n_positions=cfg.context_tokens,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function=fused_activation(cfg.activation),
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=store.eos_token_id,
        eos_token_id=store.eos_token_id,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(hf)
    return model


def load_init_model(init: str | Path) -> nn.Module:
    """Pretrained weights from a hub id (local HF cache only when offline) or a model directory
    (save_moe_model output, or a transformers save_pretrained directory of any causal LM).

    Never runs code from the model (no trust_remote_code) and never unpickles (safetensors
    only). GPT-2's Python gelu_new is switched to the fused op of the same function.
    """
    path = Path(init)
    if path.is_dir():
        if (path / MOE_CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file():
            model = load_saved_model(path)  # strict on keys and shapes; dense directories load too
        else:
            if not (path / "config.json").is_file():
                raise MoescopeError(f"base model directory {path} has no config.json")
            model = _from_pretrained(str(path), f"cannot load a causal LM from {path}")
    elif _looks_like_hub_id(str(init)):
        model = _from_pretrained(str(init), f"cannot load pretrained {init!r}; offline, it must be in the local "
                                            f"Hugging Face cache, or pass a local model directory to --base")
    else:
        raise MoescopeError(f"base model {init!r}: no such directory (use 'scratch', 'gpt2' or a model directory)")
    model.config.use_cache = False
    return model


def _from_pretrained(name_or_path: str, failure: str) -> nn.Module:
    """transformers' from_pretrained (hub ids, sharded checkpoints) under moescope's loading rules
    (safetensors only, every tensor from the checkpoint), with fused GELU."""
    from transformers import AutoConfig

    from moescope.hf.loading import load_checkpoint

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except STRICT_CONFIG_ERRORS as exc:
        raise config_error(Path(name_or_path) / "config.json" if Path(name_or_path).is_dir() else name_or_path,
                           exc) from exc
    except (OSError, ValueError) as exc:
        raise MoescopeError(f"{failure} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from exc
    fuse_config_activation(config)
    return load_checkpoint(name_or_path, failure, config=config)


def _looks_like_hub_id(name: str) -> bool:
    """"gpt2", "gpt2-medium", "openai-community/gpt2" (not a path that merely does not exist)."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not Path(name).exists()


def check_model_matches_data(model: nn.Module, store: BlockStore, where: str) -> None:
    """The data's token ids must be the model's, and a block must fit in the model's context."""
    cfg = model.config
    if cfg.vocab_size != store.vocab_size:
        raise MoescopeError(
            f"{where}: model vocabulary {cfg.vocab_size} != data vocabulary {store.vocab_size} "
            f"({store.root / 'manifest.json'}); build the data with the model's tokenizer"
        )
    context = getattr(cfg, "max_position_embeddings", None)  # GPT-2 maps it to n_positions
    if context is not None and store.block_size > context:
        raise MoescopeError(
            f"{where}: data block size {store.block_size} tokens ({store.root / 'manifest.json'}) is longer "
            f"than the model's context of {context} tokens"
        )


def open_store(data_dir: str | Path) -> BlockStore:
    """The run's data directory, refusing one that is missing or has an empty train or eval split."""
    if not str(data_dir):
        raise MoescopeError("data_dir is not set (config key data_dir, or --set data_dir=DIR)")
    path = Path(data_dir)
    if not path.is_dir():
        raise MoescopeError(f"data directory not found: {path} (build it with `moescope data build --out {path}`)")
    store = BlockStore.open(path)
    for split in ("train", "eval"):
        if sum(store.n_blocks(split, d) for d in store.domains) == 0:
            raise MoescopeError(f"{path}: the {split} split has no blocks")
    store.verify_blocks()
    return store


def initial_model(cfg: RunConfig, store: BlockStore, init: str | Path | None) -> nn.Module:
    """A stage's starting model in training mode: a fresh GPT-2 (`init` None) or the weights at
    `init`, with MoE layers installed (upcycled) when the run is an MoE arm and they have none."""
    model = build_scratch_model(cfg.model, store, cfg.train.seed) if init is None else load_init_model(init)
    if cfg.arch == "moe" and not moe_layers(model):
        install_moe(model, cfg.moe, seed=cfg.train.seed)
    model.train()
    return model
