"""Pairs for the embedding stage: extraction from real-looking texts, leak-free split, HF loader."""

from __future__ import annotations

import ast
import random

import pytest

from moescope.data.split import document_key
from moescope.data.text import SourceText
from moescope.embed.pairs import (
    PairConfig,
    TextPair,
    extract_docstring_pairs,
    extract_pairs,
    extract_problem_rationale_pair,
    extract_prose_pairs,
    find_leaks,
    load_pair_dataset,
    split_lead_sentence,
    split_pairs,
)
from moescope.errors import MoescopeError

CODE = '''
import os


def join_parts(head, *tails):
    """Join path components with the platform separator.

    Empty components are skipped.
    """
    parts = [head] + [t for t in tails if t]
    return os.sep.join(parts)


class Counter:
    """Counts things."""

    def bump(self, n=1):
        """Increase the count by n and return the new count."""
        self.n = getattr(self, "n", 0) + n
        return self.n

    def reset(self):
        """Only a docstring."""


def no_doc(x):
    return x
'''


def test_docstring_pairs_take_summary_and_body_without_docstring():
    pairs = extract_docstring_pairs(CODE, source_id="m", domain="code", cfg=PairConfig(min_positive_chars=10))
    by_anchor = {p.anchor: p for p in pairs}
    assert set(by_anchor) == {
        "Join path components with the platform separator.",
        "Increase the count by n and return the new count.",
    }
    body = by_anchor["Join path components with the platform separator."].positive
    assert body.startswith("def join_parts(head, *tails):")
    assert '"""' not in body and "Empty components" not in body
    ast.parse(body)  # still valid Python after the docstring is cut out
    method = by_anchor["Increase the count by n and return the new count."].positive
    assert method.startswith("def bump(self, n=1):\n    self.n")  # dedented method
    ast.parse(method)


def test_problem_rationale_and_prose_pairs():
    cfg = PairConfig(min_positive_chars=10)
    text = "a train 100 m long passes a pole in 10 s . find its speed .\n\nspeed = 100 / 10 = 10 m / s . answer : 10"
    (pair,) = extract_problem_rationale_pair(text, source_id="p", domain="math", cfg=cfg)
    assert pair.anchor.startswith("a train 100 m") and pair.positive.startswith("speed = 100")
    assert extract_problem_rationale_pair("no rationale here", source_id="p", domain="math", cfg=cfg) == []

    article = (
        "Anarchism is a political philosophy. It rejects hierarchy and the state as unnecessary.\n\n"
        "The term comes from Greek roots meaning without ruler. Early uses were often pejorative in tone.\n\n"
        "Short."
    )
    pairs = extract_prose_pairs(article, source_id="w", domain="prose", cfg=cfg, title="Anarchism")
    assert pairs[0].kind == "title_paragraph" and pairs[0].anchor == "Anarchism"
    assert pairs[0].positive.startswith("Anarchism is a political philosophy.")
    assert [p.kind for p in pairs[1:]] == ["lead_paragraph"]
    assert pairs[1].anchor == "The term comes from Greek roots meaning without ruler."
    assert pairs[1].positive == "Early uses were often pejorative in tone."
    assert split_lead_sentence("One sentence only.") is None


def test_extract_pairs_dispatches_by_domain_and_uses_source_meta():
    sources = [
        SourceText(CODE, "code", "mod", {}),
        SourceText("ignored text", "math", "m1", {"problem": "what is 6 times 7 exactly ?",
                                                   "rationale": "six times seven is 42 . answer : 42"}),
        SourceText("Lead sentence of the lead section here. Rest of it follows in this part.", "prose", "w1",
                   {"title": "Some Title", "section": ""}),
        SourceText("A later section starts like this one. And it goes on to say more things.", "prose", "w2",
                   {"title": "Some Title", "section": "History"}),
        SourceText("whatever", "other", "o1", {}),
    ]
    pairs = extract_pairs(sources, PairConfig(min_positive_chars=10))
    kinds = {(p.domain, p.kind) for p in pairs}
    assert kinds == {("code", "docstring_body"), ("math", "problem_rationale"), ("prose", "title_paragraph"),
                     ("prose", "lead_paragraph")}
    assert not any(p.anchor == "Some Title" and p.source_id == "prose:text:w2" for p in pairs)
    assert all(p.source_id.startswith(p.domain + ":") for p in pairs)
    with pytest.raises(MoescopeError, match="unknown pair extractor"):
        extract_pairs(sources, PairConfig(extractors={"code": "nope"}))


def test_pairs_of_one_document_are_held_out_together():
    """Two sections of one article, two definitions of one file and one problem in two wordings are
    one source each: the split never puts one of them beside the other."""
    para = "A sentence that leads this paragraph of the section. The rest of it follows here at length."
    sources = [SourceText(f"{para} {a}-{s}", "prose", f"w{a}:{s}", {"title": f"T{a}", "section": f"S{s}",
                                                                     "document": f"enwiki:T{a}"})
               for a in range(20) for s in range(3)]
    sources += [SourceText(CODE, "code", f"f{f}:def{d}", {"document": f"stdlib:f{f}.py"})
                for f in range(20) for d in range(2)]
    sources += [SourceText("x", "math", f"m{i}:{w}", {"problem": f"pick {i % 3 + 2} of 9 , wording {w} ?",
                                                       "rationale": f"ways = {i} . answer : {i}",
                                                       "family": "committee", "params": {"n": 9, "k": i % 3 + 2}})
                for i in range(20) for w in range(2)]
    pairs = extract_pairs(sources, PairConfig(min_positive_chars=10))
    assert {p.source_id for p in pairs if p.domain == "math"} == {f"math:{document_key(s)}" for s in sources[100:]}
    assert len({p.source_id for p in pairs if p.domain == "prose"}) == 20
    # the split draws by source_id: one per article, so every section of a held-out article is held out
    split = split_pairs(pairs, eval_fraction=0.3, seed=0)
    held = {p.positive.split()[-1].split("-")[0] for p in split.eval if p.domain == "prose"}
    assert held and not [p for p in split.train if p.domain == "prose" and p.positive.split()[-1].split("-")[0] in held]


def _synthetic_pairs(n_sources: int = 60) -> list[TextPair]:
    pairs = []
    for s in range(n_sources):
        domain = ("code", "math", "prose")[s % 3]
        for j in range(1 + s % 3):
            pairs.append(TextPair(f"anchor {s}-{j}", f"positive {s}-{j}", domain, f"{domain}:src{s}", "dataset"))
    # the same one-line docstring in two modules: one copy must not sit on each side
    pairs.append(TextPair("Return a copy.", "def copy(self): return 1", "code", "code:srcA", "docstring_body"))
    pairs.append(TextPair("Return a copy.", "def copy(self): return 2", "code", "code:srcB", "docstring_body"))
    pairs.append(TextPair("anchor 0-0", "positive 0-0", "code", "code:src0", "dataset"))  # exact duplicate
    return pairs


def test_split_has_no_leakage_and_is_deterministic():
    pairs = _synthetic_pairs()
    split = split_pairs(pairs, eval_fraction=0.25, seed=3)
    assert find_leaks(split) == {"shared_sources": 0, "shared_texts": 0}
    assert split.dropped_duplicates == 1
    eval_sources = {p.source_id for p in split.eval}
    for domain in ("code", "math", "prose"):  # every domain is represented on both sides
        assert any(p.domain == domain for p in split.eval) and any(p.domain == domain for p in split.train)
    # a source is never split across sides, and the split does not depend on input order
    shuffled = list(pairs)
    random.Random(0).shuffle(shuffled)
    again = split_pairs(shuffled, eval_fraction=0.25, seed=3)
    assert {p.source_id for p in again.eval} == eval_sources
    assert sorted(p.anchor for p in again.train) == sorted(p.anchor for p in split.train)
    assert {p.source_id for p in split_pairs(pairs, eval_fraction=0.25, seed=4).eval} != eval_sources


def test_split_drops_training_pairs_whose_text_is_held_out():
    pairs = _synthetic_pairs()
    for seed in range(10):  # find a seed that puts exactly one "Return a copy." source on the eval side
        split = split_pairs(pairs, eval_fraction=0.25, seed=seed)
        on_eval = [p for p in split.eval if p.anchor == "Return a copy."]
        if len(on_eval) == 1:
            assert not any(p.anchor == "Return a copy." for p in split.train)
            assert split.dropped_for_leakage >= 1
            return
    pytest.fail("no seed split the two copies")


def test_eval_cap_per_domain():
    split = split_pairs(_synthetic_pairs(120), eval_fraction=0.5, seed=0, max_eval_pairs_per_domain=5)
    counts = {d: sum(p.domain == d for p in split.eval) for d in ("code", "math", "prose")}
    assert counts == {"code": 5, "math": 5, "prose": 5}
    assert find_leaks(split)["shared_texts"] == 0


def test_hf_pair_dataset_from_local_files(tmp_path):
    import datasets

    rows = {"query": ["how to sort a list", "capital of france", "how to sort a list"],
            "answer": ["use sorted()", "paris", "list.sort() in place"], "score": [1.0, 1.0, 0.5]}
    ds = datasets.Dataset.from_dict(rows)
    parquet = tmp_path / "train-00000.parquet"
    ds.to_parquet(str(parquet))
    pairs = load_pair_dataset(parquet, domain="qa")
    assert [(p.anchor, p.positive) for p in pairs] == list(zip(rows["query"], rows["answer"]))
    assert pairs[0].source_id == pairs[2].source_id != pairs[1].source_id  # same query, same source
    jsonl = tmp_path / "pairs.jsonl"
    ds.to_json(str(jsonl))
    assert load_pair_dataset(jsonl, anchor_column="answer", positive_column="query", max_pairs=2)[1].anchor == "paris"
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_pair_dataset(tmp_path / "saved")) == 3
    with pytest.raises(MoescopeError, match="no column 'nope'"):
        load_pair_dataset(parquet, anchor_column="nope", positive_column="answer")
    with pytest.raises(MoescopeError, match="cannot load pair dataset"):
        load_pair_dataset(tmp_path / "missing-dataset-name")
