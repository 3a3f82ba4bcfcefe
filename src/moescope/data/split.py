"""Text-level train/eval split by source document (before tokenization and packing), the
cross-split near-duplicate removal, and the leakage check.

Splitting whole documents before packing is what keeps eval honest: packed blocks cut
texts at arbitrary points, and one document often yields several texts (the sections
of an article, the definitions of a code file, one math problem with differently
worded solutions), so splitting texts or blocks would put parts of one document on
both sides.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.data.text import SourceText, hash_normalized, hash_text, normalize_whitespace
from moescope.errors import MoescopeError

# Bump when what goes to which side changes (document keys, near-duplicate rules): a data directory
# built under other rules is another build (data/build.config_fingerprint), never silently reused.
SPLIT_RULES = 4
NEAR_DUP_THRESHOLD = 0.8
NEAR_DUP_SHINGLE_WORDS = 5
NEAR_DUP_NUM_PERM = 128
# Texts under this many shingles never join documents: short boilerplate (`def __repr__(self): return "_"`
# once string literals are masked) is the same in many files and would chain them into one group.
NEAR_DUP_MIN_SHINGLES = 20
# A text record names its document group here when the group holds other documents too.
GROUP_FIELD = "document_group"
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def eval_count(n_texts: int, eval_fraction: float, eval_min_texts: int) -> int:
    """max(eval_min_texts, floor(eval_fraction * n)) eval texts."""
    return max(eval_min_texts, int(n_texts * eval_fraction))


def domain_seed(seed: int, domain: str) -> list[int]:
    """Per-domain RNG seed material, so adding a domain never reshuffles the others."""
    return [seed, zlib.crc32(domain.encode("utf-8"))]


def normalize_problem(problem: str) -> str:
    """A math problem statement compared case- and whitespace-insensitively."""
    return normalize_whitespace(problem).lower()


def document_key(t: SourceText) -> str:
    """The source document a text comes from; all texts of one document go to the same split.

    A generated math problem is keyed by its family and the multiset of its parameter values:
    the generator words one problem many ways (templates, names, items, openers), and the same
    numbers in another order are the same problem with its givens swapped. Any other math
    problem (a `problem` field: MathQA, GSM8K) is keyed by its normalized statement, so one
    problem with two solution wordings is one document. Sources that cut documents into
    several texts (article sections, a file's definitions) name the document in
    `meta["document"]`; any other text is its own document.
    """
    family, params = t.meta.get("family"), t.meta.get("params")
    if isinstance(family, str) and family and isinstance(params, dict) and params:
        values = [x for v in params.values() for x in (v if isinstance(v, list) else [v])]  # lcm_bells' intervals
        return f"problem:{family}:" + json.dumps(sorted(json.dumps(x, sort_keys=True) for x in values))
    problem = t.meta.get("problem")
    if isinstance(problem, str) and problem.strip():
        return "problem:" + normalize_problem(problem)
    doc = t.meta.get("document")
    if isinstance(doc, str) and doc:
        return doc
    return "text:" + t.id


def eval_document_count(n_documents: int, eval_min_documents: int) -> int:
    """Documents eval must hold at least: eval_min_documents, but never over a tenth of them."""
    return min(eval_min_documents, n_documents // 10)


def split_texts(
    texts: Sequence[SourceText], *, domain: str, seed: int, eval_fraction: float, eval_min_texts: int,
    eval_min_documents: int = 0, groups: Sequence[str] | None = None, placed: Mapping[str, str] | None = None,
) -> tuple[list[SourceText], list[SourceText]]:
    """Seeded random split of whole document groups; both sides keep the source order of their texts.

    `groups` names each text's document group (default: its document; see `document_groups`,
    which joins near-duplicate documents). Groups are drawn in a seeded random order into eval
    until it holds at least `eval_count(...)` texts and `eval_document_count(...)` groups, so eval
    may hold a few texts more than that count. `placed` maps groups another domain already put
    on a side ("train" / "eval") to that side: they are not drawn, and count where they are.
    """
    n = len(texts)
    n_eval = eval_count(n, eval_fraction, eval_min_texts)
    keys = list(groups) if groups is not None else [document_key(t) for t in texts]
    if len(keys) != n:
        raise ValueError(f"{len(keys)} group keys for {n} texts")
    placed = placed or {}
    docs = list(dict.fromkeys(keys))  # first-appearance order, independent of hash seeds
    n_eval_docs = eval_document_count(len(docs), eval_min_documents)
    sizes: dict[str, int] = {}
    for k in keys:
        sizes[k] = sizes.get(k, 0) + 1
    perm = np.random.default_rng(domain_seed(seed, domain)).permutation(len(docs))
    chosen = {g for g in docs if placed.get(g) == "eval"}
    got = sum(sizes[g] for g in chosen)
    for i in perm:
        if got >= n_eval and len(chosen) >= n_eval_docs:
            break
        if docs[int(i)] in placed:
            continue
        chosen.add(docs[int(i)])
        got += sizes[docs[int(i)]]
    if got < n_eval or len(chosen) < n_eval_docs or len(chosen) == len(docs):
        n_placed = sum(g in placed for g in docs)
        fixed = f"; {n_placed} placed by another domain's near-duplicates" if n_placed else ""
        raise MoescopeError(
            f"domain {domain!r}: too few texts for the split ({n} texts in {len(docs)} source documents "
            f"(near-duplicates joined{fixed}), "
            f"{n_eval} needed for eval = max({eval_min_texts}, {eval_fraction:g} x {n}) in at least {n_eval_docs} "
            "of them, plus at least one document for train)"
        )
    train = [t for t, k in zip(texts, keys) if k not in chosen]
    evals = [t for t, k in zip(texts, keys) if k in chosen]
    return train, evals


# ------------------------------------------------------------------ near duplicates


_MASK32 = np.uint64(0xFFFFFFFF)
_MULT = np.uint64(0x01000193)  # FNV-1 32-bit prime: mixes word hashes into a shingle hash


def shingle_hashes(text: str, n: int = NEAR_DUP_SHINGLE_WORDS) -> np.ndarray:
    """32-bit hashes of the text's lower-cased word (and punctuation) n-grams, unique, sorted.

    crc32 per word, then a polynomial over each window of n word hashes (vectorized), because
    hashing ~10^6 shingle strings one by one dominated the build; a text shorter than n words
    is one shingle. Deterministic across processes (Python's str hash is not).
    """
    words = _WORD.findall(text.lower())
    h = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    width = min(n, len(h))
    m = len(h) - width + 1
    acc = np.zeros(max(m, 1), dtype=np.uint64)
    for k in range(width):
        acc = (acc * _MULT + h[k : k + m]) & _MASK32
    return np.unique(acc)


def _identity(x: Any) -> Any:
    return x


# a Python string literal: triple-quoted (any lines), or single-line quoted with escapes
_PY_STRING = re.compile(r'("""' r"|''')(?:\\.|[^\\])*?\1" r'|"(?:\\.|[^"\\\n])*"' r"|'(?:\\.|[^'\\\n])*'")


def near_duplicate_view(t: SourceText) -> str:
    """What the near-duplicate check compares: the text, with Python source's string literals (names,
    tables, docstrings) replaced by one placeholder, so that template twins (the encodings modules'
    definitions that differ only in a codec name) are seen as the copies they are."""
    path = str(t.meta.get("path") or t.meta.get("file") or "")
    return _PY_STRING.sub('"_"', t.text) if path.endswith(".py") else t.text


def minhashes(texts: Sequence[SourceText], num_perm: int = NEAR_DUP_NUM_PERM) -> list:
    """datasketch MinHash signature of each text's shingle set (seed fixed: both sides comparable)."""
    return signatures_of((shingle_hashes(near_duplicate_view(t)) for t in texts), num_perm)


def signatures_of(shingle_sets: Iterable[np.ndarray], num_perm: int = NEAR_DUP_NUM_PERM) -> list:
    """datasketch MinHash signatures of precomputed shingle hash sets (the one place the seed is set)."""
    from datasketch import MinHash

    return MinHash.bulk(shingle_sets, num_perm=num_perm, seed=1, hashfunc=_identity)


@dataclass
class NearDuplicates:
    """Eval texts with a train text at estimated Jaccard >= threshold, per domain, with examples."""

    removed: list[SourceText]
    per_domain: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str, float]] = field(default_factory=list)  # (eval id, train id, jaccard)


def find_near_duplicates(
    train: Sequence[SourceText], evals: Sequence[SourceText], threshold: float = NEAR_DUP_THRESHOLD,
    num_perm: int = NEAR_DUP_NUM_PERM,
) -> NearDuplicates:
    """Eval texts that near-duplicate any train text (all domains), by MinHash LSH on word shingles.

    LSH finds candidates; each is kept only when the two signatures' estimated Jaccard
    similarity reaches `threshold` (LSH alone also returns some pairs below it).
    """
    from datasketch import MinHashLSH

    if not train or not evals:
        return NearDuplicates(removed=[])
    train_mh = minhashes(train, num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for i, m in enumerate(train_mh):
            session.insert(i, m, check_duplication=False)
    out = NearDuplicates(removed=[])
    for t, m in zip(evals, minhashes(evals, num_perm)):
        best, best_j = None, 0.0
        for i in sorted(lsh.query(m)):  # sorted: ties resolve the same way every run
            j = m.jaccard(train_mh[i])
            if j > best_j:
                best, best_j = i, j
        if best is not None and best_j >= threshold:
            out.removed.append(t)
            out.per_domain[t.domain] = out.per_domain.get(t.domain, 0) + 1
            if len(out.examples) < 5:
                out.examples.append((t.id, train[best].id, round(best_j, 3)))
    return out


@dataclass
class DocumentGroups:
    """Each text's document group: its source document, joined with every document one of whose texts
    near-duplicates one of its own (any domain, transitively). The split keeps a group on one side.

    key[i] is the group of texts[i] (its smallest document key, so the name does not depend on order);
    pairs lists the near-duplicate text pairs of different documents (i, j, estimated Jaccard). Texts of
    fewer than NEAR_DUP_MIN_SHINGLES shingles join no documents.
    """

    key: list[str]
    pairs: list[tuple[int, int, float]] = field(default_factory=list)

    def crossing(self, texts: Sequence[SourceText], evals: Sequence[SourceText]) -> list[tuple[str, str, float]]:
        """Near-duplicate pairs with one text in `evals` and the other not: (eval id, train id, Jaccard)."""
        held = {id(t) for t in evals}
        out = []
        for i, j, jac in self.pairs:
            if (id(texts[i]) in held) != (id(texts[j]) in held):
                e, t = (i, j) if id(texts[i]) in held else (j, i)
                out.append((texts[e].id, texts[t].id, jac))
        return out

    def joined_documents(self, texts: Sequence[SourceText]) -> dict[str, int]:
        """Per domain, how many documents share their group with another document."""
        docs_of: dict[str, set[str]] = {}
        for t, g in zip(texts, self.key):
            docs_of.setdefault(g, set()).add(document_key(t))
        out: dict[str, set[str]] = {}
        for t, g in zip(texts, self.key):
            if len(docs_of[g]) > 1:
                out.setdefault(t.domain, set()).add(document_key(t))
        return {d: len(v) for d, v in out.items()}


def document_groups(
    texts: Sequence[SourceText], threshold: float = NEAR_DUP_THRESHOLD, num_perm: int = NEAR_DUP_NUM_PERM,
) -> DocumentGroups:
    """Join documents into groups by near-duplicate texts (MinHash LSH, as `find_near_duplicates`).

    Grouping before the split, rather than dropping eval texts that near-duplicate train texts after it,
    keeps every held-out document the split drew (template twins would otherwise leave eval short
    of its document quota) and still puts no near-duplicate pair on both sides.
    """
    from datasketch import MinHashLSH

    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    keys = [document_key(t) for t in texts]
    first_of_document: dict[str, int] = {}
    for i, k in enumerate(keys):
        join(i, first_of_document.setdefault(k, i))
    pairs: list[tuple[int, int, float]] = []
    shingles = [shingle_hashes(near_duplicate_view(t)) for t in texts]
    joinable = [i for i, sh in enumerate(shingles) if sh.size >= NEAR_DUP_MIN_SHINGLES]
    if len(joinable) > 1:
        signatures = dict(zip(joinable, signatures_of((shingles[i] for i in joinable), num_perm)))
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        with lsh.insertion_session() as session:
            for i in joinable:
                session.insert(i, signatures[i], check_duplication=False)
        for i in joinable:
            for j in sorted(lsh.query(signatures[i])):  # sorted: the same pairs in the same order every run
                if j > i and keys[i] != keys[j] and (jac := signatures[i].jaccard(signatures[j])) >= threshold:
                    pairs.append((i, j, jac))
                    join(i, j)
    name: dict[int, str] = {}
    for i, k in enumerate(keys):
        r = root(i)
        if r not in name or k < name[r]:
            name[r] = k
    return DocumentGroups(key=[name[root(i)] for i in range(len(texts))], pairs=pairs)


def split_groups(
    texts_by_domain: Mapping[str, Sequence[SourceText]], groups: DocumentGroups, *, seed: int,
    eval_fraction: float, eval_min_texts: int, eval_min_documents: int,
) -> dict[str, dict[str, list[SourceText]]]:
    """`split_texts` of every domain over the same document groups ({"train": {domain: texts}, "eval": ...}).

    `groups` covers the domains' texts in order. Domains are split in order; a group that spans
    domains goes where the first of them put it.
    """
    parts: dict[str, dict[str, list[SourceText]]] = {"train": {}, "eval": {}}
    placed: dict[str, str] = {}
    start = 0
    for name, texts in texts_by_domain.items():
        keys = groups.key[start : start + len(texts)]
        start += len(texts)
        train, evals = split_texts(texts, domain=name, seed=seed, eval_fraction=eval_fraction,
                                   eval_min_texts=eval_min_texts, eval_min_documents=eval_min_documents,
                                   groups=keys, placed=placed)
        side_of = {id(t): "eval" for t in evals}
        for t, g in zip(texts, keys):
            placed.setdefault(g, side_of.get(id(t), "train"))
        parts["train"][name], parts["eval"][name] = train, evals
    if start != len(groups.key):
        raise ValueError(f"document groups cover {len(groups.key)} texts, the domains hold {start}")
    return parts


# ------------------------------------------------------------------ leakage check


@dataclass
class LeakageReport:
    raw_overlap: int
    normalized_overlap: int
    examples: list[str]
    document_overlap: int = 0
    near_duplicates: int = 0

    @property
    def clean(self) -> bool:
        return not (self.raw_overlap or self.normalized_overlap or self.document_overlap or self.near_duplicates)


def find_leakage(
    train: Sequence[SourceText], evals: Sequence[SourceText], *, near: bool = False,
    threshold: float = NEAR_DUP_THRESHOLD, pairs: Sequence[tuple[str, str, float]] | None = None,
) -> LeakageReport:
    """Eval texts whose exact or whitespace-normalized hash, or source document, also occurs in
    train; with `near`, also eval texts that near-duplicate a train text (MinHash LSH). `pairs`: the
    near-duplicate pairs across the split already known (`DocumentGroups.crossing`), counted instead."""
    train_raw = {hash_text(t.text) for t in train}
    train_norm = {hash_normalized(t.text) for t in train}
    train_docs = {document_key(t) for t in train}
    raw = [t for t in evals if hash_text(t.text) in train_raw]
    norm = [t for t in evals if hash_normalized(t.text) in train_norm]
    docs = [t for t in evals if document_key(t) in train_docs]
    near_dups = [t.id for t in find_near_duplicates(train, evals, threshold).removed] if near else []
    if pairs is not None:
        near_dups += [e for e, _, _ in pairs]
    examples = [t.id for t in (norm or docs)[:5]] or near_dups[:5]
    return LeakageReport(raw_overlap=len(raw), normalized_overlap=len(norm), examples=examples,
                         document_overlap=len(docs), near_duplicates=len(near_dups))


def check_leakage(
    train: Sequence[SourceText], evals: Sequence[SourceText], *, near: bool = False,
    threshold: float = NEAR_DUP_THRESHOLD, pairs: Sequence[tuple[str, str, float]] | None = None,
) -> LeakageReport:
    """Raise (failing the build) when any eval text also appears in train, even re-spaced, shares a
    source document with a train text, or (with `near`) near-duplicates one."""
    report = find_leakage(train, evals, near=near, threshold=threshold, pairs=pairs)
    if not report.clean:
        raise MoescopeError(
            f"train/eval leakage: {report.raw_overlap} eval texts identical to train texts, "
            f"{report.normalized_overlap} identical after whitespace normalization, "
            f"{report.document_overlap} from a source document that train also holds, "
            f"{report.near_duplicates} near-duplicates (e.g. {', '.join(report.examples)})"
        )
    return report
