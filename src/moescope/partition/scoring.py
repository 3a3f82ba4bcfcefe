"""Curriculum difficulty from a trained model: per-text perplexity (the seed's better proxy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError


def load_scoring_model(model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """(model, tokenizer) from a moescope / transformers model directory (dense or MoE)."""
    from moescope.data.tokenizer import load_pretrained_tokenizer
    from moescope.io.saved_model import load_saved_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MoescopeError(f"{model_dir}: not a model directory (no config.json)")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else next(
        (d for d in (model_dir / "tokenizer", model_dir) if (d / "tokenizer_config.json").is_file()), None
    )
    if tok_dir is None:
        raise MoescopeError(f"{model_dir}: no tokenizer beside the model (pass the data directory's tokenizer/)")
    model = load_saved_model(model_dir)
    model.eval()
    return model, load_pretrained_tokenizer(str(tok_dir))


def score_perplexity(
    texts: Sequence[str],
    model_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    max_tokens: int = 256,
    show_progress: bool = True,
) -> np.ndarray:
    """Perplexity of each text's first `max_tokens` tokens under the model (higher = harder)."""
    import torch
    from tqdm.auto import tqdm

    model, tok = load_scoring_model(model_dir, tokenizer_dir)
    limit = min(max_tokens, int(getattr(model.config, "n_positions", max_tokens)))
    out = np.zeros(len(texts), dtype=np.float64)
    with torch.no_grad():
        for i, text in enumerate(tqdm(texts, desc="perplexity", disable=not show_progress)):
            ids = tok(text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                out[i] = math.inf  # nothing to predict: rank with the hardest
                continue
            loss = model(input_ids=ids, labels=ids).loss
            out[i] = math.exp(min(float(loss), 50.0))
    return out
