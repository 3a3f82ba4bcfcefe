"""Held-out data that is really held out: splits by source document (article, code file, math
problem), near-duplicates removed across splits, and an independent check that decodes every
held-out block of a built-in build and finds nothing of it in the training split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moescope.data.blocks import BlockStore, tokenizer_dir
from moescope.data.build import build_dataset
from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig, TokenizerConfig
from moescope.data.split import (
    check_leakage, document_groups, document_key, find_leakage, find_near_duplicates, split_groups, split_texts,
)
from moescope.data.text import SourceText
from moescope.errors import MoescopeError


def _math(i: int, problem: str, rationale: str) -> SourceText:
    return SourceText(text=f"{problem}\n\n{rationale}", domain="math", id=f"m{i}",
                      meta={"problem": problem, "rationale": rationale})


def test_one_math_problem_with_two_solution_wordings_stays_on_one_side() -> None:
    texts = []
    for i in range(60):
        p = f"a train running at {i} km / hr crosses a pole in 9 sec . what is the length ?"
        texts.append(_math(2 * i, p, f"speed = {i} × 5 / 18 . answer : {i * 2.5}"))
        # the same problem (re-spaced, upper case) with a differently worded solution
        texts.append(_math(2 * i + 1, p.upper().replace(" ", "  "), f"solution : {i} * 5 / 18 m/s ; hence {i * 2.5}"))
    for seed in range(5):
        train, evals = split_texts(texts, domain="math", seed=seed, eval_fraction=0.05, eval_min_texts=20)
        assert len(evals) == 20 and len(train) == 100
        assert {document_key(t) for t in train}.isdisjoint(document_key(t) for t in evals)
        assert find_leakage(train, evals).document_overlap == 0


def test_generated_math_never_puts_one_problem_on_both_sides() -> None:
    """The built-in generator repeats problems (small parameter ranges) with new solution wording;
    a whole-text split put 108 of 394 held-out problems of the default build into train too."""
    from moescope.data.sources.builtin import iter_builtin

    stream = iter_builtin("math", "math", 42)
    texts = [next(stream) for _ in range(4000)]
    statements = [" ".join(t.meta["problem"].split()).lower() for t in texts]
    assert len(set(statements)) < len(texts) - 100  # the generator does repeat problems
    train, evals = split_texts(texts, domain="math", seed=42, eval_fraction=0.05, eval_min_texts=20)
    train_problems = {(" ".join(t.meta["problem"].split()).lower(), t.meta["answer_text"]) for t in train}
    assert len(evals) >= 200
    assert not [t for t in evals if (" ".join(t.meta["problem"].split()).lower(), t.meta["answer_text"]) in train_problems]
    # nor one problem reworded: the same family and numbers under another template, name or item
    # (a statement-keyed split left a third of the held-out problems in train that way)
    def problem(t):
        values = [x for v in t.meta["params"].values() for x in (v if isinstance(v, list) else [v])]
        return t.meta["family"], tuple(sorted(map(str, values)))

    reworded = {problem(t) for t in train}
    assert not [t for t in evals if problem(t) in reworded]


def test_one_generated_problem_under_two_templates_is_one_document() -> None:
    """The committee family words n choose k two ways ("a committee of k from n people", "a coach
    picks k players out of n"); both are one problem, and the givens swapped are the same problem."""
    a = SourceText(text="x", domain="math", id="a", meta={
        "problem": "in how many ways can a committee of 3 be chosen from 6 people ?",
        "family": "committee", "params": {"n": 6, "k": 3}})
    b = SourceText(text="y", domain="math", id="b", meta={
        "problem": "a coach must pick 3 players out of 6 . how many different selections are possible ?",
        "family": "committee", "params": {"k": 3, "n": 6}})
    c = SourceText(text="z", domain="math", id="c", meta={
        "problem": "in how many ways can a committee of 2 be chosen from 6 people ?",
        "family": "committee", "params": {"n": 6, "k": 2}})
    assert document_key(a) == document_key(b) != document_key(c)
    bells = [SourceText(text="x", domain="math", id=str(i), meta={"family": "lcm_bells", "params": {"intervals": iv}})
             for i, iv in enumerate(([4, 6, 9], [9, 4, 6], [4, 6, 10]))]
    assert document_key(bells[0]) == document_key(bells[1]) != document_key(bells[2])


def test_article_sections_and_file_definitions_stay_together() -> None:
    texts = [SourceText(text=f"section {s} of article {a}", domain="prose", id=f"w{a}:{s}",
                        meta={"title": f"Article {a}", "document": f"enwiki:Article {a}"})
             for a in range(30) for s in range(4)]
    train, evals = split_texts(texts, domain="prose", seed=0, eval_fraction=0.05, eval_min_texts=20)
    assert len(evals) == 20  # five whole articles
    assert {t.meta["title"] for t in train}.isdisjoint(t.meta["title"] for t in evals)
    one_file = [SourceText(text=f"s{i}", domain="code", id=str(i), meta={"document": "file:a.py"}) for i in range(40)]
    with pytest.raises(MoescopeError, match="1 source documents"):
        split_texts(one_file, domain="code", seed=0, eval_fraction=0.05, eval_min_texts=20)


def test_eval_holds_enough_documents_not_just_enough_texts() -> None:
    """A few long articles would meet the text count alone; eval must also hold min(20, a tenth) of the
    documents, so that a held-out statistic does not rest on a handful of them."""
    long_docs = [SourceText(text=f"long {a}:{s}", domain="prose", id=f"L{a}:{s}", meta={"document": f"L{a}"})
                 for a in range(30) for s in range(40)]
    short_docs = [SourceText(text=f"short {a}", domain="prose", id=f"S{a}", meta={"document": f"S{a}"})
                  for a in range(270)]
    texts = long_docs + short_docs
    for seed in range(5):
        _, evals = split_texts(texts, domain="prose", seed=seed, eval_fraction=0.05, eval_min_texts=20,
                               eval_min_documents=20)
        assert len({document_key(t) for t in evals}) >= 20
    # without the document quota, some seed meets the text count with a few long documents
    few = [split_texts(texts, domain="prose", seed=seed, eval_fraction=0.05, eval_min_texts=20)[1] for seed in range(5)]
    assert min(len({document_key(t) for t in f}) for f in few) < 20
    small = long_docs[:200] + short_docs[:60]  # 65 documents: a tenth is 6
    _, evals = split_texts(small, domain="prose", seed=0, eval_fraction=0.05, eval_min_texts=1, eval_min_documents=20)
    assert len({document_key(t) for t in evals}) >= 6


def test_leakage_check_names_shared_documents() -> None:
    train = [_math(0, "what is 2 + 2 ?", "4")]
    evals = [_math(1, "What is 2 +  2 ?", "two plus two is 4")]
    rep = find_leakage(train, evals)
    assert (rep.raw_overlap, rep.normalized_overlap, rep.document_overlap) == (0, 0, 1)
    with pytest.raises(MoescopeError, match="1 from a source document"):
        check_leakage(train, evals)


def test_near_duplicates_found_by_minhash_lsh() -> None:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(500)]
    train = [SourceText(text=" ".join(rng.choice(vocab, 120)), domain="d", id=f"t{i}") for i in range(50)]
    words = train[7].text.split()
    words[60] = "changed"  # one word in 120: Jaccard of 5-word shingles ~ 0.92
    copy = SourceText(text=" ".join(words), domain="d", id="copy")
    words = train[9].text.split()
    half = SourceText(text=" ".join(words[:60] + list(rng.choice(vocab, 60))), domain="d", id="half")  # ~ 0.33
    fresh = [SourceText(text=" ".join(rng.choice(vocab, 120)), domain="d", id=f"e{i}") for i in range(10)]
    near = find_near_duplicates(train, [*fresh, copy, half])
    assert [t.id for t in near.removed] == ["copy"] and near.per_domain == {"d": 1}
    assert near.examples[0][:2] == ("copy", "t7") and near.examples[0][2] >= 0.8
    assert find_leakage(train, [copy], near=True).near_duplicates == 1



def _words(rng: np.random.Generator, n: int = 120) -> list[str]:
    return list(rng.choice([f"w{i}" for i in range(500)], n))


def test_document_groups_join_near_duplicates_transitively_and_name_groups_by_content() -> None:
    rng = np.random.default_rng(1)
    a = _words(rng)
    b = a[:-1] + ["x1"]  # a ~ b
    c = b[:-2] + ["x2", "x1"]  # b ~ c; a and c differ in two of 120 words, also close
    far = _words(rng)
    texts = [SourceText(text=" ".join(w), domain="d", id=i) for w, i in ((a, "a"), (far, "far"), (b, "b"), (c, "c"))]
    groups = document_groups(texts)
    assert groups.key[0] == groups.key[2] == groups.key[3] != groups.key[1]
    assert groups.key[0] == min(document_key(texts[i]) for i in (0, 2, 3))  # named by content, not order
    assert {(i, j) for i, j, _ in groups.pairs} >= {(0, 2), (2, 3)}
    assert groups.joined_documents(texts) == {"d": 3}
    assert document_groups(texts[::-1]).key[::-1] == groups.key
    # a chain's ends need not be near each other: joining is transitive
    d = c[:-8] + [f"y{i}" for i in range(8)]
    chain = texts + [SourceText(text=" ".join(d), domain="d", id="d")]
    assert len(set(document_groups(chain).key[i] for i in (0, 2, 3, 4))) == 1


def test_short_boilerplate_does_not_chain_files_into_one_group() -> None:
    """A one-line definition that is the same in many files once string literals are masked must not join
    those files; a long shared definition still does."""
    rng = np.random.default_rng(7)

    def file(i: int, shared: str) -> list[SourceText]:
        own = [f"def f{i}_{j}():\n    return " + " + ".join(_words(rng, 40)) for j in range(3)]
        return [SourceText(text=t, domain="code", id=f"m{i}:{j}", meta={"path": f"m{i}.py", "document": f"m{i}.py"})
                for j, t in enumerate([*own, shared.format(i=i)])]

    short = [t for i in range(30) for t in file(i, 'def __repr__(self):\n    return "<M{i}>"')]
    assert len(set(document_groups(short).key)) == 30
    long_shared = 'def table():\n    return "{i}", ' + ", ".join(f"v{k} + w{k}" for k in range(30))
    joined = [t for i in range(30) for t in file(i, long_shared)]
    assert len(set(document_groups(joined).key)) == 1


def test_split_keeps_every_group_on_one_side_across_domains_and_counts_groups_for_the_quota() -> None:
    rng = np.random.default_rng(2)
    by_domain: dict[str, list[SourceText]] = {"p": [], "q": []}
    for i in range(200):
        w = _words(rng)
        by_domain["p"].append(SourceText(text=" ".join(w), domain="p", id=f"p{i}"))
        if i % 4 == 0:  # a near-copy in the other domain, which has texts of its own too
            by_domain["q"].append(SourceText(text=" ".join(w[:-1] + ["z"]), domain="q", id=f"q{i}"))
            by_domain["q"].append(SourceText(text=" ".join(_words(rng)), domain="q", id=f"q{i}+"))
        if i % 5 == 0:  # and one in the same domain
            by_domain["p"].append(SourceText(text=" ".join(w[:-1] + ["y"]), domain="p", id=f"p{i}'"))
    texts = [t for ts in by_domain.values() for t in ts]
    groups = document_groups(texts)
    side_of = {}
    for seed in range(4):
        parts = split_groups(by_domain, groups, seed=seed, eval_fraction=0.05, eval_min_texts=5, eval_min_documents=20)
        side_of = {t.id: s for s in ("train", "eval") for ts in parts[s].values() for t in ts}
        for i, j, _ in groups.pairs:
            assert side_of[texts[i].id] == side_of[texts[j].id]
        assert not groups.crossing(texts, [t for ts in parts["eval"].values() for t in ts])
        for d, ts in parts["eval"].items():
            n_groups = len({groups.key[k] for k, t in enumerate(texts) if t.domain == d})
            held = {groups.key[k] for k, t in enumerate(texts) if side_of[t.id] == "eval" and t.domain == d}
            assert len(held) >= min(20, n_groups // 10)
    assert "eval" in set(side_of.values()) and "train" in set(side_of.values())
    # a domain whose every document another domain placed in train cannot fill its eval: it says so
    copies = {"p": by_domain["p"], "q": [t for t in by_domain["q"] if not t.id.endswith("+")]}
    flat = [t for ts in copies.values() for t in ts]
    with pytest.raises(MoescopeError, match="placed by another domain's near-duplicates"):
        for seed in range(10):
            split_groups(copies, document_groups(flat), seed=seed, eval_fraction=0.05, eval_min_texts=5,
                         eval_min_documents=20)


def test_template_twins_no_longer_cost_eval_its_documents() -> None:
    """22 encodings modules that are one template: grouped before the split, eval keeps its quota of
    document groups instead of losing the twins it drew."""
    files = [SourceText(text=GETREGENTRY.format(name=f"cp{i}"), domain="code", id=f"enc{i}",
                        meta={"path": f"encodings/cp{i}.py", "document": f"encodings/cp{i}.py"}) for i in range(22)]
    rng = np.random.default_rng(3)
    others = [SourceText(text="def f():\n    " + " ".join(_words(rng, 60)), domain="code", id=f"f{i}",
                         meta={"path": f"m{i}.py", "document": f"m{i}.py"}) for i in range(130)]
    texts = files + others
    groups = document_groups(texts)
    assert len(set(groups.key[:22])) == 1
    for seed in range(5):
        parts = split_groups({"code": texts}, groups, seed=seed, eval_fraction=0.05, eval_min_texts=5,
                             eval_min_documents=20)
        held = parts["eval"]["code"]
        assert len({groups.key[texts.index(t)] for t in held}) >= 131 // 10
        assert not groups.crossing(texts, held)


GETREGENTRY = """def getregentry():
    return codecs.CodecInfo(
        name='{name}',
        encode=Codec().encode,
        decode=Codec().decode,
        incrementalencoder=IncrementalEncoder,
        incrementaldecoder=IncrementalDecoder,
        streamreader=StreamReader,
        streamwriter=StreamWriter,
    )
"""


def test_setting_string_literals_aside_is_linear_in_hostile_source() -> None:
    """An unclosed triple quote followed by thousands of escapes (a truncated file) is read in one pass;
    a regex that could match a backslash two ways took time doubling with every escape."""
    import signal

    from moescope.data.split import near_duplicate_view

    text = 'x = """' + "\\n" * 5000 + "\ny = 'a'\n"
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("regex backtracking")))
    signal.alarm(20)
    try:
        view = near_duplicate_view(SourceText(text=text, domain="code", id="t", meta={"path": "t.py"}))
    finally:
        signal.alarm(0)
    assert view.endswith('y = "_"\n')  # read to the end: the later literal is set aside too


def test_python_template_twins_that_differ_in_strings_are_near_duplicates() -> None:
    """The stdlib's encodings modules repeat one definition with another codec name: word shingles
    see Jaccard ~0.55, but with string literals set aside the two are one text."""
    def code(name: str) -> SourceText:
        return SourceText(text=GETREGENTRY.format(name=name), domain="code", id=f"encodings.{name}:getregentry",
                          meta={"path": f"encodings/{name}.py", "module": name, "qualname": "getregentry"})

    near = find_near_duplicates([code("iso8859_3")], [code("cp1255"), code("mac_greek")])
    assert [t.id for t in near.removed] == ["encodings.cp1255:getregentry", "encodings.mac_greek:getregentry"]
    # prose keeps its quotes: the same two texts not from a Python file are far apart
    prose = [SourceText(text=t.text, domain="prose", id=t.id) for t in (code("iso8859_3"), code("cp1255"))]
    assert not find_near_duplicates(prose[:1], prose[1:]).removed


def test_wikitext_sections_split_by_article(tmp_path: Path) -> None:
    """WikiText (the HF loader, local parquet in the dataset's format): an article's sections
    all land on one side of the split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = []
    for a in range(12):
        lines += ["", f" = Article number {a} = \n", "", f" Lead paragraph of article {a} , long enough . \n"]
        for s in range(3):
            lines += ["", f" = = Section {s} = = \n", "", f" Body {s} of article {a} says something new . \n"]
    path = tmp_path / "wt" / "wikitext-103-raw-v1" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": lines}), str(path))
    dom = DomainConfig(name="prose", source=SourceConfig(backend="hf", name="Salesforce/wikitext",
                                                         path=str(tmp_path / "wt")), min_chars=1, target_mb=None)
    cfg = DataBuildConfig(domains=[dom], block_size_tokens=8, tokenizer=TokenizerConfig(vocab_size=300),
                          eval_min_texts=8)
    store = build_dataset(cfg, tmp_path / "out")
    titles = {s: {r["title"] for r in store.texts(s, "prose")} for s in ("train", "eval")}
    assert len(titles["eval"]) == 2 and titles["train"].isdisjoint(titles["eval"])
    assert store.manifest["splits"]["eval"]["prose"]["n_texts"] == 8


# ------------------------------------------------------------------ the independent check


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n", 1)[0].split()).lower()


def _eval_stream_texts(store: BlockStore, domain: str, tok) -> list[str]:
    """Every complete text of the held-out blocks, recovered by decoding the blocks (in order they
    are one token stream: texts joined by EOS, cut into blocks), not read from texts/*.jsonl."""
    ids = np.asarray(store.blocks("eval", domain)).reshape(-1)
    cuts = np.flatnonzero(ids == store.eos_token_id)
    pieces = np.split(ids, cuts)
    texts = [tok.decode(p[1:] if k else p) for k, p in enumerate(pieces[:-1])]  # the last one may be cut
    return [t for t in texts if t.strip()]


@pytest.fixture(scope="module")
def builtin_store(tmp_path_factory) -> BlockStore:
    # small targets, but enough that the generated math repeats problems and articles have several sections
    cfg = DataBuildConfig(
        domains=[DomainConfig(name="code", target_texts=300), DomainConfig(name="math", target_texts=600),
                 DomainConfig(name="prose", target_texts=300)],
        block_size_tokens=128, tokenizer=TokenizerConfig(vocab_size=1000), eval_min_texts=40)
    return build_dataset(cfg, tmp_path_factory.mktemp("builtin") / "data")


def test_held_out_blocks_share_no_problem_article_or_file_with_train(builtin_store: BlockStore) -> None:
    from transformers import AutoTokenizer

    store = builtin_store
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(store.root)))
    train = {d: list(store.texts("train", d)) for d in store.domains}
    evals = {d: {r["text"]: r for r in store.texts("eval", d)} for d in store.domains}
    decoded = {d: _eval_stream_texts(store, d, tok) for d in store.domains}
    for d in store.domains:
        assert len(decoded[d]) >= 10
        assert all(t in evals[d] for t in decoded[d])  # what the blocks hold is the eval split's texts

    # math: the problem statement is read off the decoded text itself
    train_problems = {_first_paragraph(r["text"]) for r in train["math"]}
    held_out = [_first_paragraph(t) for t in decoded["math"]]
    assert not [p for p in held_out if p in train_problems]
    # prose: article titles; code: source files
    train_titles = {r["title"] for r in train["prose"] if r.get("title")}
    eval_titles = {evals["prose"][t]["title"] for t in decoded["prose"] if evals["prose"][t].get("title")}
    assert eval_titles and not eval_titles & train_titles
    train_files = {r["path"] for r in train["code"]}
    eval_files = {evals["code"][t]["path"] for t in decoded["code"]}
    assert eval_files and not eval_files & train_files
    # no decoded held-out text is a near-duplicate of a training text of any domain
    all_train = [SourceText.from_record(r) for rs in train.values() for r in rs]
    held = [SourceText(text=t, domain=d, id=f"{d}:{i}") for d in store.domains for i, t in enumerate(decoded[d])]
    assert not find_near_duplicates(all_train, held).removed


def test_manifest_and_inspect_report_near_duplicates(builtin_store: BlockStore, capsys) -> None:
    from moescope.cli import main

    m = builtin_store.manifest
    assert set(m["near_duplicates"]["documents_joined"]) == {"code", "math", "prose"}
    assert m["near_duplicates"]["documents_joined"]["code"] > 0  # the encodings modules' template twins
    assert m["leakage_check"]["near_duplicates"] == 0
    assert m["leakage_check"]["document_overlap"] == 0
    assert main(["data", "inspect", str(builtin_store.root), "--samples", "1",
                 "--png", str(builtin_store.root.parent / "len.png")]) == 0
    out = capsys.readouterr().out
    assert "documents joined by near-duplicate texts" in out and "source documents" in out
