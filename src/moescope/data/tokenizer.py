"""Tokenizers for the block store: a byte-level BPE trained on the train split, or GPT-2's.

Either way the result is a transformers fast tokenizer saved with save_pretrained in
DIR/tokenizer, so every later stage loads it with AutoTokenizer.from_pretrained.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moescope.data.config import TokenizerConfig
from moescope.errors import MoescopeError, first_line

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, model_max_length: int = 1024) -> Any:
    """Byte-level BPE (GPT-2 style, no prefix space, lossless decode) with EOS as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def load_pretrained_tokenizer(name_or_path: str) -> Any:
    """A transformers fast tokenizer from a local directory or a hub id (GPT-2 by default); never
    runs code from the tokenizer's directory (an auto_map is refused, not prompted for)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if not path.is_dir() and (path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        # a path, not a hub id: transformers would say "Repo id must be in the form 'repo_name'"
        raise MoescopeError(f"cannot load tokenizer {name_or_path!r}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as exc:  # OSError / ValueError / HF offline errors
        raise MoescopeError(f"cannot load tokenizer {name_or_path!r}: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc
    if getattr(tok, "backend_tokenizer", None) is None:
        raise MoescopeError(f"tokenizer {name_or_path!r} is not a fast (HF tokenizers) tokenizer")
    if tok.eos_token_id is None:
        raise MoescopeError(f"tokenizer {name_or_path!r} has no EOS token")
    return tok


def load_data_tokenizer(data_dir: str | Path) -> Any:
    """The tokenizer a data directory was built with (DIR/tokenizer/), or one error naming the directory."""
    from moescope.data.blocks import tokenizer_dir

    path = tokenizer_dir(data_dir)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise MoescopeError(f"{data_dir}: the data directory has no tokenizer ({path} is missing or empty); "
                            "rebuild it with `moescope data build`")
    return load_pretrained_tokenizer(str(path))


def make_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str], model_max_length: int) -> Any:
    if cfg.kind == "bpe":
        return train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency, model_max_length)
    if cfg.kind == "gpt2":
        return load_pretrained_tokenizer(cfg.name_or_path)
    raise MoescopeError(f"unknown tokenizer kind {cfg.kind!r} (choose bpe or gpt2)")


def tokenizer_size(tok: Any) -> int:
    """Number of ids the model must embed (base vocab plus added special tokens)."""
    return len(tok)


def save_tokenizer(tok: Any, directory: Path) -> None:
    """save_pretrained; the Rust library reports a failed write (a full disk) as a bare Exception
    "... (os error N)": it is raised as the OSError it was, naming the directory, so that callers that
    handle a full disk see one."""
    try:
        tok.save_pretrained(str(directory))
    except OSError:
        raise
    except Exception as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise MoescopeError(f"could not write the tokenizer to {directory}: {first_line(exc)}") from exc
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(directory)) from exc
