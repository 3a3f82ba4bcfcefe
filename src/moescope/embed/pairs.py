"""Text pairs for embedding training and retrieval evaluation: real pairs, split without leakage.

Offline, pairs come from the texts of the built-in corpus, one kind per domain:

- code:  (docstring summary, function source without its docstring) from Python modules;
- math:  (problem, rationale) from texts formatted "{problem}\\n\\n{rationale}";
- prose: (title, lead paragraph) when the source has a title, and (lead sentence,
  rest of the paragraph) for every paragraph long enough.

Online, any Hugging Face pair dataset (two text columns, e.g. anchor/positive or
query/answer) loads through `load_pair_dataset`, from the hub or from local files in the
formats the hub serves (parquet, json/jsonl, csv) or a `save_to_disk` directory.

The held-out split is drawn by *source document* (a module, an article, a problem) before any
training, so no source contributes to both sides; pairs whose anchor or positive text
also occurs on the held-out side (e.g. the same one-line docstring in two modules) are
then dropped from training.
"""

from __future__ import annotations

import ast
import hashlib
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from moescope.data.split import document_key
from moescope.errors import MoescopeError
from moescope.io.config import bounded
from moescope.io.jsonl import iter_jsonl_objects

PairKind = Literal["docstring_body", "problem_rationale", "title_paragraph", "lead_paragraph", "dataset"]
Extractor = Literal["docstring", "problem_rationale", "lead_sentence"]


class SourceLike(Protocol):
    """What a pair extractor reads from a source text (moescope.data.sources.SourceText fits)."""

    text: str
    domain: str
    id: str
    meta: dict


@dataclass(frozen=True)
class TextPair:
    """One (anchor, positive) pair; `source_id` is the unit the held-out split is drawn by."""

    anchor: str
    positive: str
    domain: str
    source_id: str
    kind: PairKind


@dataclass
class PairConfig:
    """How pairs are cut out of source texts."""

    # domain name -> extractor; domains not listed are skipped with a count in the stats
    extractors: dict[str, str] = field(
        default_factory=lambda: {"code": "docstring", "math": "problem_rationale", "prose": "lead_sentence"}
    )
    min_anchor_chars: int = bounded(12, low=0)
    min_positive_chars: int = bounded(40, low=0)
    max_positive_chars: int = bounded(1500, low=1)  # longer bodies are cut (the encoder truncates anyway)
    max_pairs_per_source: int = bounded(8, low=1)  # so one long module or article cannot dominate a domain
    min_sentence_chars: int = bounded(25, low=0)


@dataclass
class PairSplit:
    """Train and held-out pairs plus what the leakage guard removed."""

    train: list[TextPair]
    eval: list[TextPair]
    dropped_for_leakage: int = 0
    dropped_duplicates: int = 0
    # drawn from the training side (by source, same leakage guard) for checkpoint selection,
    # so the held-out `eval` pairs stay untouched by any choice made during training
    validation: list[TextPair] = field(default_factory=list)


# --------------------------------------------------------------------------- extractors


def extract_docstring_pairs(text: str, *, source_id: str, domain: str, cfg: PairConfig) -> list[TextPair]:
    """(docstring summary, function source minus the docstring) for every documented function.

    The summary is the docstring's first paragraph (what a user would type as a query);
    the positive keeps the signature and body, so retrieval has to link prose to code.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    pairs: list[TextPair] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or len(node.body) < 2:  # docstring-only functions have no body to retrieve
            continue
        summary = " ".join(doc.split("\n\n", 1)[0].split())
        doc_node = node.body[0]
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        body_lines = lines[start : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        body = textwrap.dedent("\n".join(body_lines)).strip()
        if not _keep(summary, body, cfg):
            continue
        pairs.append(TextPair(summary, body[: cfg.max_positive_chars], domain, source_id, "docstring_body"))
    return pairs


def extract_problem_rationale_pair(text: str, *, source_id: str, domain: str, cfg: PairConfig) -> list[TextPair]:
    """(problem, rationale) from a text whose first blank line separates the two."""
    parts = text.strip().split("\n\n", 1)
    if len(parts) != 2:
        return []
    problem, rationale = (" ".join(p.split()) for p in parts)
    if not _keep(problem, rationale, cfg):
        return []
    return [TextPair(problem, rationale[: cfg.max_positive_chars], domain, source_id, "problem_rationale")]


# A sentence ends at . ! or ? followed by space and an upper-case letter, digit or quote.
# Written by hand: no sentence splitter ships with the project's dependencies, and prose
# pairs only need the lead sentence cut off, where a rare miss costs one pair.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_lead_sentence(paragraph: str) -> tuple[str, str] | None:
    """(first sentence, the rest) or None when the paragraph is a single sentence."""
    parts = _SENTENCE_END.split(paragraph.strip(), maxsplit=1)
    if len(parts) != 2:
        return None
    return parts[0].strip(), parts[1].strip()


def extract_prose_pairs(
    text: str, *, source_id: str, domain: str, cfg: PairConfig, title: str | None = None
) -> list[TextPair]:
    """(title, lead paragraph) when titled, then (lead sentence, rest of paragraph) per paragraph."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) == 1 and "\n" in text.strip():  # one paragraph per line (news corpora)
        paragraphs = [" ".join(p.split()) for p in text.splitlines() if p.strip()]
    pairs: list[TextPair] = []
    if title and paragraphs and _keep(title, paragraphs[0], cfg, min_anchor=3):
        pairs.append(TextPair(title.strip(), paragraphs[0][: cfg.max_positive_chars], domain, source_id, "title_paragraph"))
        paragraphs = paragraphs[1:]  # the lead paragraph is taken; its sentences would leak into it
    for paragraph in paragraphs:
        split = split_lead_sentence(paragraph)
        if split is None:
            continue
        lead, rest = split
        if len(lead) < cfg.min_sentence_chars or not _keep(lead, rest, cfg):
            continue
        pairs.append(TextPair(lead, rest[: cfg.max_positive_chars], domain, source_id, "lead_paragraph"))
    return pairs


def _keep(anchor: str, positive: str, cfg: PairConfig, min_anchor: int | None = None) -> bool:
    return (
        len(anchor) >= (cfg.min_anchor_chars if min_anchor is None else min_anchor)
        and len(positive) >= cfg.min_positive_chars
        and anchor != positive
    )


def extract_pairs(sources: Iterable[SourceLike], cfg: PairConfig | None = None) -> list[TextPair]:
    """Pairs from source texts, each domain through its configured extractor, in input order."""
    cfg = cfg or PairConfig()
    out: list[TextPair] = []
    for src in sources:
        kind = cfg.extractors.get(src.domain)
        if kind is None:
            continue
        meta = getattr(src, "meta", None) or {}
        # drawn by source document (an article with all its sections, a code file, one math problem
        # however worded), as the corpus split is: a text-level draw put most held-out pairs beside
        # training pairs of the same article or file
        common = {"source_id": f"{src.domain}:{document_key(src)}", "domain": src.domain, "cfg": cfg}
        if kind == "docstring":
            pairs = extract_docstring_pairs(src.text, **common)
        elif kind == "problem_rationale":
            text = src.text
            if meta.get("problem") and meta.get("rationale"):  # the math generator keeps both parts
                text = f"{meta['problem']}\n\n{meta['rationale']}"
            pairs = extract_problem_rationale_pair(text, **common)
        elif kind == "lead_sentence":
            # A title describes its article's lead section, not later sections' paragraphs.
            title = meta.get("title") if not meta.get("section") else None
            pairs = extract_prose_pairs(src.text, title=title, **common)
        else:
            raise MoescopeError(
                f"unknown pair extractor {kind!r} for domain {src.domain!r} "
                "(use docstring, problem_rationale or lead_sentence)"
            )
        out.extend(pairs[: cfg.max_pairs_per_source])
    return out


# --------------------------------------------------------------------------- split


def _eval_draw(source_id: str, seed: int) -> float:
    """A stable uniform number in [0, 1) per source, independent of input order and process."""
    digest = hashlib.sha256(f"{seed}\x00{source_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(
    pairs: Sequence[TextPair],
    *,
    eval_fraction: float = 0.2,
    seed: int = 0,
    max_eval_pairs_per_domain: int | None = None,
) -> PairSplit:
    """Held-out split by source text, then a leakage guard on the texts themselves.

    1. Each source goes wholly to train or eval (a stable hash of seed and source id),
       per domain, so every domain gets about `eval_fraction` of its sources.
    2. Exact duplicate (anchor, positive) pairs are kept once.
    3. Training pairs whose anchor or positive text occurs anywhere on the eval side are
       dropped: a query or document seen in training is not held out.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise MoescopeError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    seen: set[tuple[str, str]] = set()
    unique: list[TextPair] = []
    for pair in pairs:
        key = (pair.anchor, pair.positive)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    dropped_duplicates = len(pairs) - len(unique)

    by_domain: dict[str, list[str]] = defaultdict(list)
    for pair in unique:
        if pair.source_id not in by_domain[pair.domain]:
            by_domain[pair.domain].append(pair.source_id)
    eval_sources: set[str] = set()
    for domain, sources in by_domain.items():
        ranked = sorted(sources, key=lambda s: _eval_draw(s, seed))
        n_eval = max(1, round(eval_fraction * len(sources))) if len(sources) > 1 else 0
        eval_sources.update(ranked[:n_eval])

    eval_pairs = [p for p in unique if p.source_id in eval_sources]
    if max_eval_pairs_per_domain is not None:
        kept: list[TextPair] = []
        count: Counter[str] = Counter()
        for p in sorted(eval_pairs, key=lambda p: _eval_draw(p.anchor + "\x00" + p.positive, seed)):
            if count[p.domain] < max_eval_pairs_per_domain:
                kept.append(p)
                count[p.domain] += 1
        eval_pairs = kept
    eval_texts = {p.anchor for p in eval_pairs} | {p.positive for p in eval_pairs}
    train_side = [p for p in unique if p.source_id not in eval_sources]
    train_pairs = [p for p in train_side if p.anchor not in eval_texts and p.positive not in eval_texts]
    return PairSplit(
        train=train_pairs,
        eval=eval_pairs,
        dropped_for_leakage=len(train_side) - len(train_pairs),
        dropped_duplicates=dropped_duplicates,
    )


def text_units(pairs: Sequence[TextPair]) -> dict[tuple[str, str], tuple[str, str]]:
    """(domain, text) of every anchor and positive -> its resampling unit for intervals.

    Queries and texts cut from one source document (up to `max_pairs_per_source` docstrings of one
    module) are not independent draws, so a bootstrap moves a source's texts together. Sources that
    share a query (the same one-line docstring in two modules: one query, one metric value) are
    joined, transitively, within a domain; a shared positive (one answer to several questions of a
    user's file) joins nothing. A unit is named (domain, the smallest source id it holds); a text of
    several units takes the smallest.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sources = sorted({(p.domain, p.source_id) for p in pairs})
    row = {src: i for i, src in enumerate(sources)}
    first_source: dict[tuple[str, str], int] = {}
    edges = []
    for p in pairs:
        i = row[(p.domain, p.source_id)]
        j = first_source.setdefault((p.domain, p.anchor), i)
        edges.append((i, j))
    rows, cols = zip(*edges) if edges else ((), ())
    graph = coo_matrix(([1] * len(rows), (rows, cols)), shape=(len(sources), len(sources)))
    _, component = connected_components(graph, directed=False)
    name: dict[int, tuple[str, str]] = {}
    for src, i in row.items():  # sorted: the first source of a component is its smallest
        name.setdefault(int(component[i]), src)
    units: dict[tuple[str, str], tuple[str, str]] = {}
    for p in pairs:
        unit = name[int(component[row[(p.domain, p.source_id)]])]
        for text in (p.anchor, p.positive):
            key = (p.domain, text)
            units[key] = min(units.get(key, unit), unit)
    return units


def find_leaks(split: PairSplit) -> dict[str, int]:
    """Counts of sources and texts shared by train and eval (all zero for a clean split)."""
    train_sources = {p.source_id for p in split.train}
    eval_sources = {p.source_id for p in split.eval}
    train_texts = {p.anchor for p in split.train} | {p.positive for p in split.train}
    eval_texts = {p.anchor for p in split.eval} | {p.positive for p in split.eval}
    return {
        "shared_sources": len(train_sources & eval_sources),
        "shared_texts": len(train_texts & eval_texts),
    }


def pair_stats(split: PairSplit) -> dict[str, Any]:
    """Per-domain counts for the run's metrics file."""
    out: dict[str, Any] = {}
    for name, pairs in (("train", split.train), ("validation", split.validation), ("eval", split.eval)):
        if pairs or name != "validation":
            out[name] = dict(sorted(Counter(p.domain for p in pairs).items()))
    out["dropped_for_leakage"] = split.dropped_for_leakage
    out["dropped_duplicates"] = split.dropped_duplicates
    return out


# --------------------------------------------------------------------------- Hugging Face pair datasets

_LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_pair_dataset(
    name_or_path: str | Path,
    *,
    split: str = "train",
    subset: str | None = None,
    anchor_column: str | None = None,
    positive_column: str | None = None,
    domain: str = "dataset",
    max_pairs: int | None = None,
) -> list[TextPair]:
    """Pairs from a Hugging Face dataset: a hub id, a local data file, or a save_to_disk directory.

    Columns default to the first two string columns (the sentence-transformers convention:
    anchor/positive, query/answer, sentence1/sentence2). Pairs with the same anchor share a
    source id, so `split_pairs` never puts one query on both sides.
    """
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.is_file():
            fmt = _LOCAL_FORMATS.get("".join(path.suffixes[-1:]).lower())
            if fmt is None:
                raise MoescopeError(f"{path}: unknown pair file format (use {', '.join(_LOCAL_FORMATS)})")
            ds = datasets.load_dataset(fmt, data_files={split: str(path)}, split=split)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), subset, split=split)
        else:
            ds = datasets.load_dataset(str(name_or_path), subset, split=split)
    except MoescopeError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the name and the reason
        raise MoescopeError(f"cannot load pair dataset {name_or_path!s} (split {split!r}): {exc}") from exc

    string_columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if anchor_column is None or positive_column is None:
        if len(string_columns) < 2:
            raise MoescopeError(f"pair dataset {name_or_path!s} has fewer than two text columns: {ds.column_names}")
        anchor_column = anchor_column or string_columns[0]
        positive_column = positive_column or next(c for c in string_columns if c != anchor_column)
    for col in (anchor_column, positive_column):
        if col not in ds.column_names:
            raise MoescopeError(f"pair dataset {name_or_path!s} has no column {col!r} (columns: {ds.column_names})")
    n = len(ds) if max_pairs is None else min(len(ds), max_pairs)
    pairs = []
    for anchor, positive in zip(ds[anchor_column][:n], ds[positive_column][:n]):
        if not anchor or not positive:
            continue
        source = hashlib.sha256(anchor.encode("utf-8")).hexdigest()[:16]
        pairs.append(TextPair(anchor, positive, domain, f"{domain}:{source}", "dataset"))
    return pairs


# --------------------------------------------------------------------------- sources -> split


def load_builtin_sources(domains: Sequence[str], texts_per_domain: int, seed: int) -> list:
    """Source texts of the data stage's built-in corpora (stdlib code, generated math,
    gensim's Wikipedia/news), `texts_per_domain` each, in the data stage's seeded order."""
    from moescope.data.config import DomainConfig
    from moescope.data.sources import load_domain_texts

    out = []
    for name in domains:
        out += load_domain_texts(DomainConfig(name=name, target_mb=None, target_texts=texts_per_domain), seed)
    return out


def load_pairs(cfg) -> PairSplit:
    """Training and held-out pairs for a `PairSourceConfig` (moescope.embed.config)."""
    if cfg.source == "builtin":
        sources = load_builtin_sources(cfg.domains, cfg.texts_per_domain, cfg.data_seed)
        pairs = extract_pairs(sources, cfg.extract)
    elif cfg.source == "hf":
        pairs = load_pair_dataset(
            cfg.name_or_path, split=cfg.split, subset=cfg.subset, anchor_column=cfg.anchor_column,
            positive_column=cfg.positive_column, domain=cfg.hf_domain, max_pairs=cfg.max_pairs,
        )
    else:
        raise MoescopeError(f"unknown pair source {cfg.source!r} (use builtin or hf)")
    if not pairs:
        raise MoescopeError(f"no pairs could be extracted from the {cfg.source} source")
    split = split_pairs(
        pairs, eval_fraction=cfg.eval_fraction, seed=cfg.split_seed,
        max_eval_pairs_per_domain=cfg.max_eval_pairs_per_domain,
    )
    if not split.train or not split.eval:
        raise MoescopeError(f"pair split left {len(split.train)} training and {len(split.eval)} held-out pairs")
    if cfg.validation_fraction > 0:
        inner = split_pairs(
            split.train, eval_fraction=cfg.validation_fraction, seed=cfg.split_seed + 1,
            max_eval_pairs_per_domain=cfg.max_eval_pairs_per_domain,
        )
        if not inner.train or not inner.eval:
            raise MoescopeError(
                f"validation split (pairs.validation_fraction={cfg.validation_fraction}) left {len(inner.train)} "
                f"training and {len(inner.eval)} validation pairs"
            )
        split.train, split.validation = inner.train, inner.eval
        split.dropped_for_leakage += inner.dropped_for_leakage
    return split


# --------------------------------------------------------------------------- user evaluation pairs

STS_COLUMNS = ("sentence1", "sentence2", "score")
RETRIEVAL_COLUMNS = ("query", "positive")
_PAIR_FILE_FORMATS = (".csv", ".tsv", ".jsonl")


@dataclass
class UserPairs:
    """Evaluation pairs from a user's file: STS (sentence1, sentence2, score) or retrieval (query, positive)."""

    kind: Literal["sts", "retrieval"]
    first: list[str]
    second: list[str]
    scores: list[float] | None = None

    def __len__(self) -> int:
        return len(self.first)

    def as_text_pairs(self, domain: str) -> list[TextPair]:
        """Retrieval pairs as TextPairs (each query its own source: a shared answer joins no queries)."""
        return [TextPair(q, p, domain, f"{domain}:{q}", "dataset") for q, p in zip(self.first, self.second)]


def _pair_kind(columns: Iterable[str], where: str) -> Literal["sts", "retrieval"]:
    cols = set(columns)
    if set(STS_COLUMNS) <= cols:
        return "sts"
    if set(RETRIEVAL_COLUMNS) <= cols:
        return "retrieval"
    raise MoescopeError(
        f"{where}: need columns {', '.join(STS_COLUMNS)} (STS) or {', '.join(RETRIEVAL_COLUMNS)} (retrieval), "
        f"got {sorted(cols)}"
    )


def _pair_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) of a .csv/.tsv (header row) or .jsonl file; malformed lines raise."""
    import csv

    if path.suffix == ".jsonl":
        yield from iter_jsonl_objects(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoescopeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    reader = csv.reader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",")
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    except csv.Error as exc:
        raise MoescopeError(f"{path}:1: {exc}") from exc
    try:
        for row in reader:
            n = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise MoescopeError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
            yield n, dict(zip(header, row))
    except csv.Error as exc:
        raise MoescopeError(f"{path}:{reader.line_num}: {exc}") from exc


def read_pair_file(path: str | Path) -> UserPairs:
    """Read a user's evaluation pairs; any bad line is one MoescopeError naming file and line.

    .csv/.tsv need a header row; .jsonl holds one object per line. Columns sentence1,
    sentence2, score make an STS file (score: any finite number, only its ranking matters
    for Spearman); query, positive make a retrieval file.
    """
    import math

    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"pairs file not found: {path}")
    if path.suffix not in _PAIR_FILE_FORMATS:
        raise MoescopeError(f"{path}: unknown pairs format (use {', '.join(_PAIR_FILE_FORMATS)})")
    kind: Literal["sts", "retrieval"] | None = None
    first: list[str] = []
    second: list[str] = []
    scores: list[float] = []
    for n, record in _pair_rows(path):
        if kind is None:
            kind = _pair_kind(record, f"{path}:{n}")
        names = STS_COLUMNS[:2] if kind == "sts" else RETRIEVAL_COLUMNS
        texts = []
        for name in names:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                raise MoescopeError(f"{path}:{n}: {name!r} must be a non-empty text, got {value!r}")
            texts.append(value)
        if kind == "sts":
            raw = record.get("score")
            try:
                if isinstance(raw, bool):
                    raise ValueError
                score = float(raw)
            except (TypeError, ValueError):
                raise MoescopeError(f"{path}:{n}: score must be a number, got {raw!r}") from None
            if not math.isfinite(score):
                raise MoescopeError(f"{path}:{n}: score must be finite, got {raw!r}")
            scores.append(score)
        first.append(texts[0])
        second.append(texts[1])
    if kind is None:
        raise MoescopeError(f"{path}: no pairs")
    if kind == "sts":
        if len(first) < 3:
            raise MoescopeError(f"{path}: Spearman needs at least 3 scored pairs, got {len(first)}")
        if len(set(scores)) < 2:
            raise MoescopeError(f"{path}: every score is {scores[0]}; Spearman needs scores that differ")
    return UserPairs(kind, first, second, scores if kind == "sts" else None)
