"""Dataclass configs of `moescope data build`: one source per domain, split, tokenizer, packing.

Every field names its unit. A build config file (TOML/YAML/JSON) maps onto
`DataBuildConfig` through `moescope.io.config.from_dict`, so unknown keys are
rejected with the closest valid key.

Example (TOML)::

    seed = 42
    block_size_tokens = 128
    [tokenizer]
    kind = "bpe"            # or "gpt2" with name_or_path = "gpt2" / a local directory
    vocab_size = 4096
    [[domains]]
    name = "code"
    target_mb = 10
    [domains.source]
    backend = "hf"
    name = "codeparrot/codeparrot-clean"
    # path = "/data/codeparrot"   # local stand-in in the dataset's own format
    [[domains]]
    name = "math"
    [domains.source]
    backend = "hf"
    name = "mathqa"          # the source zip; path = "MathQA.zip" for a local copy
    [[domains.extra_sources]]   # mixed in: 70% / 30% of the domain's size target
    backend = "hf"
    name = "openai/gsm8k"
    weight = 0.3                # the first source's weight: [domains.source] weight = 0.7
    [[domains]]
    name = "prose"
    [domains.source]
    backend = "files"
    paths = ["~/corpus/*.txt"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moescope.errors import MoescopeError
from moescope.io.names import is_path_name

BACKENDS = ("builtin", "hf", "files")
DOMAIN_NAME_MAX = 32  # a path name (io/names.py) short enough for a table column
BUILTIN_DOMAINS = ("code", "math", "prose")

# Per-domain length filters (characters) used when a domain config leaves them unset.
DEFAULT_MIN_CHARS = {"code": 100, "prose": 200, "math": 0}
DEFAULT_MAX_CHARS = {"code": 10_000, "prose": 10_000, "math": 10_000}


@dataclass
class SourceConfig:
    """Where a domain's texts come from.

    builtin: `name` is the built-in corpus ("code", "math", "prose"; empty = the domain name).
    hf: `name` is a hub dataset id (or "mathqa" / its zip URL); `path` is an optional local
        stand-in (file, directory or glob in the dataset's own format) used instead of the hub.
    files: `paths` lists .txt / .jsonl / .py files, directories or globs.
    """

    backend: str = "builtin"
    name: str = ""
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    path: str | None = None
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    shuffle_buffer_texts: int = 10_000
    python_unit: Literal["definition", "file"] = "definition"
    txt_unit: Literal["file", "paragraph"] = "file"
    weight: float | None = None  # share of the domain's size target when the domain mixes sources

    def __post_init__(self) -> None:
        if self.weight is not None and not self.weight > 0:
            raise MoescopeError(f"source weight must be > 0, got {self.weight}")
        if self.backend not in BACKENDS:
            raise MoescopeError(f"unknown source backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.shuffle_buffer_texts < 1:
            raise MoescopeError(f"shuffle_buffer_texts must be >= 1, got {self.shuffle_buffer_texts}")


@dataclass
class DomainConfig:
    """One domain: its source, length filters and size target (whichever of MB / texts hits first)."""

    name: str
    source: SourceConfig = field(default_factory=SourceConfig)
    extra_sources: list[SourceConfig] = field(default_factory=list)  # mixed with `source` (see all_sources)
    min_chars: int | None = None
    max_chars: int | None = None
    target_mb: float | None = 1.5
    target_texts: int | None = None

    def __post_init__(self) -> None:
        if not is_path_name(self.name) or len(self.name) > DOMAIN_NAME_MAX:
            # the name becomes a file name (blocks/{split}/{name}.bin) and a label in reports
            raise MoescopeError(f"bad domain name {self.name!r}: use 1-32 letters, digits, '_', '.' or '-' "
                                "(not starting with '.')")
        for extra in self.extra_sources:
            if extra.backend == "builtin" and (extra.name or self.name) not in BUILTIN_DOMAINS:
                raise MoescopeError(f"domain {self.name}: unknown built-in corpus {extra.name or self.name!r} "
                                    f"in extra_sources (built-in: {', '.join(BUILTIN_DOMAINS)})")
        if self.source.backend == "builtin" and self.builtin_name not in BUILTIN_DOMAINS:
            raise MoescopeError(
                f"unknown built-in domain {self.builtin_name!r} (built-in: {', '.join(BUILTIN_DOMAINS)}; "
                "other domains need source.backend = 'files' or 'hf')"
            )
        if self.target_mb is not None and self.target_mb <= 0:
            raise MoescopeError(f"domain {self.name}: target_mb must be > 0, got {self.target_mb}")
        if self.target_texts is not None and self.target_texts <= 0:
            raise MoescopeError(f"domain {self.name}: target_texts must be > 0, got {self.target_texts}")

    @property
    def builtin_name(self) -> str:
        return self.source.name or self.name

    @property
    def all_sources(self) -> list[SourceConfig]:
        """`source` then `extra_sources`; with several, each gets a share of the size target
        proportional to its weight (unset weights count 1)."""
        return [self.source, *self.extra_sources]

    @property
    def resolved_min_chars(self) -> int:
        if self.min_chars is not None:
            return self.min_chars
        return DEFAULT_MIN_CHARS.get(self.builtin_name if self.source.backend == "builtin" else self.name, 1)

    @property
    def resolved_max_chars(self) -> int | None:
        if self.max_chars is not None:
            return self.max_chars
        return DEFAULT_MAX_CHARS.get(self.builtin_name if self.source.backend == "builtin" else self.name)


@dataclass
class TokenizerConfig:
    """`bpe`: byte-level BPE trained on the train split; `gpt2`: a transformers tokenizer dir/hub id."""

    kind: Literal["bpe", "gpt2"] = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    name_or_path: str = "gpt2"

    def __post_init__(self) -> None:
        if self.kind == "bpe" and self.vocab_size < 257:
            raise MoescopeError(f"tokenizer.vocab_size must be >= 257 for byte-level BPE, got {self.vocab_size}")


def default_domains() -> list[DomainConfig]:
    return [DomainConfig(name=n) for n in BUILTIN_DOMAINS]


@dataclass
class DataBuildConfig:
    """Everything `build_dataset` needs; the manifest stores it verbatim."""

    domains: list[DomainConfig] = field(default_factory=default_domains)
    seed: int = 42
    eval_fraction: float = 0.05
    eval_min_texts: int = 20
    # eval also holds at least min(this, 1/10 of the domain's documents) documents: a few long
    # documents meeting the text count alone would leave every held-out statistic resting on them
    eval_min_documents: int = 20
    block_size_tokens: int = 512
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    balance: bool = False
    imbalance_warn_ratio: float = 1.5
    encode_batch_texts: int = 512
    encode_batch_chars: int = 250_000  # bounds tokenizer memory per batch (~35 MB of Encodings per 1M chars)

    def __post_init__(self) -> None:
        if not self.domains:
            raise MoescopeError("no domains configured")
        names = [d.name for d in self.domains]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise MoescopeError(f"domain listed twice: {', '.join(sorted(dup))}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise MoescopeError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.eval_min_texts < 1:
            raise MoescopeError(f"eval_min_texts must be >= 1, got {self.eval_min_texts}")
        if self.eval_min_documents < 0:
            raise MoescopeError(f"eval_min_documents must be >= 0, got {self.eval_min_documents}")
        if self.block_size_tokens < 2:
            raise MoescopeError(f"block_size_tokens must be >= 2, got {self.block_size_tokens}")
        if self.encode_batch_texts < 1 or self.encode_batch_chars < 1:
            raise MoescopeError(f"encode_batch_texts and encode_batch_chars must be >= 1, got "
                                f"{self.encode_batch_texts}, {self.encode_batch_chars}")

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.name == name:
                return d
        raise MoescopeError(f"unknown domain {name!r} (configured: {', '.join(d.name for d in self.domains)})")
