"""Tiny data directories and configs for the training tests (no tokenizer or corpus needed).

Each domain draws its tokens from its own band of the vocabulary with a simple
repeating structure, so a 2-layer model learns something within a few steps and
routers have a domain signal to pick up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.data.blocks import FORMAT_VERSION, block_path, dtype_for_vocab
from moescope.io.provenance import sha256_file
from moescope.train.config import ExperimentConfig, experiment_config_from_dict


def make_block_store(root: Path, *, vocab: int = 96, block: int = 16, domains=("code", "math", "prose"),
                     n_train: int = 24, n_eval: int | dict = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    dtype = dtype_for_vocab(vocab)
    band = (vocab - 1) // len(domains)
    splits: dict = {"train": {}, "eval": {}}
    for split, n_split in (("train", n_train), ("eval", n_eval)):
        for d, name in enumerate(domains):
            n = n_split[name] if isinstance(n_split, dict) else n_split
            lo = d * band
            start = rng.integers(0, band, size=(n, 1))
            step = d + 1
            toks = lo + (start + step * np.arange(block)[None, :] + rng.integers(0, 2, size=(n, block))) % band
            toks[:, block // 2] = vocab - 1  # an "EOS" inside each block
            path = block_path(root, split, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            toks.astype(dtype).tofile(path)
            splits[split][name] = {"n_blocks": n, "blocks_sha256": sha256_file(path)}
    manifest = {"format_version": FORMAT_VERSION, "block_size": block, "vocab_size": vocab,
                "eos_token_id": vocab - 1, "dtype": dtype.name, "domains": list(domains), "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def tiny_experiment(data_dir: Path, **overrides) -> ExperimentConfig:
    """2 layers, d=32, context 32, MoE in block 1 with 4 experts; a few steps."""
    cfg = {
        "data_dir": str(data_dir),
        "arms": ["dense", "moe", "moe-nolb"],
        "base": {"init": "scratch", "steps": 4},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "context_tokens": 32},
        "moe": {"n_experts": 4, "top_k": 1, "layers": [1], "router_noise_std": 0.1},
        "optim": {"learning_rate": 3e-3, "warmup_fraction": 0.2},
        "train": {"steps": 6, "batch_sequences": 4, "eval_every_steps": 3, "log_every_steps": 1,
                  "checkpoint_every_steps": 3, "eval_max_blocks_per_domain": 4, "eval_batch_sequences": 8},
        "tracking": {"progress_bar": False},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return experiment_config_from_dict(cfg)


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny matrices on a shared 2-core machine run ~100x faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
