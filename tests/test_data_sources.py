"""Sources (builtin / hf on local files in the real formats / files), length filters, dedup, size target."""

from __future__ import annotations

import ast
import gzip
import json
import zipfile
from pathlib import Path

import pytest

from moescope.data.config import DomainConfig, SourceConfig
from moescope.data.sources import collect_domain, load_domain_texts
from moescope.data.sources.builtin import iter_news_texts, iter_wiki_texts, wiki_sections
from moescope.data.sources.files import iter_files
from moescope.data.sources.hf import gsm8k_text, iter_hf, mathqa_text
from moescope.data.sources.pycode import (
    docstring_and_body, is_test_path, split_definitions, stdlib_files, stdlib_root,
)
from moescope.data.text import CollectStats, SourceText, collect_texts
from moescope.errors import MoescopeError

# ------------------------------------------------------------------ filters, dedup, size


def _st(text: str, i: int = 0) -> SourceText:
    return SourceText(text=text, domain="d", id=str(i))


def test_collect_filters_and_dedups_exact_and_whitespace_copies() -> None:
    items = ["a" * 5, "b" * 50, "c" * 500, "x y  z " * 10, "x y z " * 10, "b" * 50, "   ", "d" * 60]
    stats = CollectStats()
    kept = list(collect_texts((_st(t, i) for i, t in enumerate(items)), min_chars=10, max_chars=100, stats=stats))
    assert [k.text for k in kept] == ["b" * 50, "x y  z " * 10, "d" * 60]
    assert (stats.too_short, stats.too_long, stats.empty) == (1, 1, 1)
    assert (stats.duplicates_exact, stats.duplicates_whitespace) == (1, 1)
    assert stats.kept == 3 and stats.kept_chars == 50 + 70 + 60


def test_size_target_stops_reading_the_stream() -> None:
    consumed = []

    def stream():
        for i in range(1000):
            consumed.append(i)
            yield _st(f"text number {i:04d} " * 5, i)

    kept = list(collect_texts(stream(), target_bytes=1000))
    assert sum(len(k.text.encode()) for k in kept) >= 1000
    assert sum(len(k.text.encode()) for k in kept[:-1]) < 1000
    assert len(consumed) == len(kept)  # nothing read past the target
    assert len(list(collect_texts(stream(), target_texts=7))) == 7


# ------------------------------------------------------------------ builtin


def test_stdlib_code_excludes_test_packages() -> None:
    assert is_test_path(Path("test/test_os.py")) and is_test_path(Path("idlelib/idle_test/x.py"))
    assert is_test_path(Path("unittest/test/foo.py")) and is_test_path(Path("pkg/test_mod.py"))
    assert not is_test_path(Path("unittest/case.py")) and not is_test_path(Path("json/decoder.py"))
    root = stdlib_root()
    files = stdlib_files(root)
    assert len(files) > 300
    assert not any({"test", "tests", "idle_test"} & set(f.relative_to(root).parts) for f in files)


def test_split_definitions_and_docstring_pairs() -> None:
    src = (
        "import os\nX = 1\n\n@decorator\ndef f(a):\n    '''Add one.\n\n    More.'''\n    def inner():\n"
        "        pass\n    return a + 1\n\n\nclass C:\n    \"\"\"A class.\"\"\"\n    y = 2\n\nasync def g():\n    await h()\n"
    )
    defs = list(split_definitions(src, module="m", domain="code", path="m.py"))
    assert [d.meta["qualname"] for d in defs] == ["f", "C", "g"]
    assert defs[0].text.startswith("@decorator\ndef f(a):") and "return a + 1" in defs[0].text
    assert defs[0].meta["docstring"] == "Add one.\n\nMore." and defs[2].meta["docstring"] is None
    for d in defs:
        ast.parse(d.text)  # every unit is valid Python on its own
    doc, body = docstring_and_body(defs[0].text)
    assert doc == "Add one.\n\nMore." and "Add one" not in body and "return a + 1" in body
    ast.parse(body)
    assert docstring_and_body(defs[2].text) is None
    twice = list(split_definitions("def f():\n    pass\n\n\ndef f():\n    return 1\n", module="m", domain="c", path="m.py"))
    assert [d.id for d in twice] == ["m:f", "m:f#2"]


def test_builtin_code_domain_from_stdlib() -> None:
    texts = load_domain_texts(DomainConfig(name="code", target_texts=40), seed=1)
    assert len(texts) == 40
    assert len({t.meta["module"] for t in texts}) > 5  # files are sampled, not read in sorted order
    for t in texts:
        ast.parse(t.text)
        assert 100 <= len(t.text) <= 10_000
        assert not any(part in ("test", "tests") for part in t.meta["path"].split("/"))
    assert load_domain_texts(DomainConfig(name="code", target_texts=40), seed=1) == texts


def test_wiki_markup_removed_with_gensim_filter() -> None:
    markup = (
        "'''Anarchism''' is a [[political philosophy|philosophy]] {{cite|x}}that rejects ''rulers''.<ref>r</ref>\n\n"
        "==History==\nEarly [[Taoism|taoists]] and [http://x.org stoics].\n\n===Modern===\nToday.\n"
    )
    secs = wiki_sections(markup)
    assert [h for h, _ in secs] == ["", "History", "Modern"]
    text = " ".join(b for _, b in secs)
    for mark in ("'''", "''", "[[", "]]", "{{", "<ref", "=="):
        assert mark not in text
    assert secs[0][1].startswith("Anarchism is a philosophy")


def test_builtin_wiki_leaves_out_link_and_citation_lists() -> None:
    """"See also", "External links", "References" ... are lists, not prose; the excerpt has them."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages

    from moescope.data.sources.builtin import LIST_SECTIONS, WIKI_FILE, gensim_data_dir

    with bz2.open(gensim_data_dir() / WIKI_FILE, "rb") as fh:
        headings = {h.strip().lower() for _, markup, _ in extract_pages(fh, filter_namespaces=("0",))
                    for h, _ in wiki_sections(markup)}
    assert {"see also", "external links"} <= headings & LIST_SECTIONS
    sections = {t.meta["section"].strip().lower() for t in iter_wiki_texts("prose")}
    assert "history" in sections and not sections & LIST_SECTIONS


def test_builtin_prose_has_titles_and_news() -> None:
    news = list(iter_news_texts("prose"))
    assert len(news) >= 290 and all(len(n.text) > 100 for n in news)
    dt = collect_domain(DomainConfig(name="prose", target_texts=200), seed=3)
    sources = {t.meta["source"] for t in dt.texts}
    assert sources == {"enwiki-excerpt", "lee_background"}
    wiki = [t for t in dt.texts if t.meta["source"] == "enwiki-excerpt"]
    assert all(t.meta["title"] for t in wiki)
    assert all(200 <= len(t.text) <= 10_000 for t in dt.texts)
    assert dt.source["files"] and dt.source["filters"] == {
        "min_chars": 200, "max_chars": 10_000, "dedup": dt.source["filters"]["dedup"]}


def test_builtin_math_records_carry_family_params_answer() -> None:
    texts = load_domain_texts(DomainConfig(name="math", target_texts=100), seed=5)
    assert len(texts) == 100
    for t in texts:
        assert t.text == f"{t.meta['problem']}\n\n{t.meta['rationale']}"
        assert {"family", "params", "answer"} <= set(t.meta)


def test_unknown_builtin_domain_and_backend() -> None:
    with pytest.raises(MoescopeError, match="unknown built-in domain 'poetry'"):
        DomainConfig(name="poetry")
    with pytest.raises(MoescopeError, match="unknown source backend 'ftp'"):
        SourceConfig(backend="ftp")


# ------------------------------------------------------------------ files backend


def test_files_backend_txt_jsonl_py_dirs_globs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first paragraph here\n\nsecond paragraph here", encoding="utf-8")
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"body": "json text one", "tag": 1}) + "\n\n" + json.dumps({"body": "json text two"}) + "\n")
    (tmp_path / "sub" / "c.py").write_text("def f():\n    return 1\n\n\ndef g():\n    return 2\n")
    (tmp_path / "sub" / "ignored.md").write_text("not read")
    src = SourceConfig(backend="files", paths=[str(tmp_path)], text_field="body")
    got = sorted(t.text for t in iter_files(src, "d", seed=0))
    assert got == sorted(["first paragraph here\n\nsecond paragraph here", "json text one", "json text two",
                          "def f():\n    return 1\n", "def g():\n    return 2\n"])
    para = SourceConfig(backend="files", paths=[str(tmp_path / "*.txt")], txt_unit="paragraph")
    assert [t.text for t in iter_files(para, "d", 0)] == ["first paragraph here", "second paragraph here"]
    whole = SourceConfig(backend="files", paths=[str(tmp_path / "sub" / "*.py")], python_unit="file")
    assert [t.text for t in iter_files(whole, "d", 0)] == [(tmp_path / "sub" / "c.py").read_text()]
    rec = next(t for t in iter_files(SourceConfig(backend="files", paths=[str(tmp_path / "sub" / "b.jsonl")],
                                                  text_field="body"), "d", 0))
    assert rec.meta["tag"] == 1 and rec.meta["line"] == 1


def test_files_backend_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(MoescopeError, match=r"latin\.txt: not UTF-8"):
        list(iter_files(SourceConfig(backend="files", paths=[str(bad)]), "d", 0))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(MoescopeError, match=r"broken\.jsonl:2: invalid JSON"):
        list(iter_files(SourceConfig(backend="files", paths=[str(broken)]), "d", 0))
    with pytest.raises(MoescopeError, match="path not found"):
        list(iter_files(SourceConfig(backend="files", paths=[str(tmp_path / "nope.txt")]), "d", 0))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(MoescopeError, match="unsupported file type"):
        list(iter_files(SourceConfig(backend="files", paths=[str(tmp_path / "x.csv")]), "d", 0))
    (tmp_path / "bad.py").write_text("def f(:\n")
    with pytest.raises(MoescopeError, match=r"bad\.py:1: Python syntax error"):
        list(iter_files(SourceConfig(backend="files", paths=[str(tmp_path / "bad.py")]), "d", 0))


# ------------------------------------------------------------------ hf loaders on local files


def _write_parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), str(path))


def _order(src: SourceConfig, seed: int) -> list[str]:
    return [t.id for t in iter_hf(src, "d", seed)]


def test_codeparrot_local_jsonl_gz_streaming_shuffle(tmp_path: Path) -> None:
    rows = [{"repo_name": f"user/repo{i}", "path": f"pkg/mod{i}.py", "copies": "1", "size": "100",
             "content": f"def f{i}(x):\n    return x * {i}\n" * 8, "license": "mit", "hash": str(i),
             "line_mean": 20.0, "line_max": 30, "alpha_frac": 0.6, "autogenerated": False} for i in range(60)]
    d = tmp_path / "codeparrot"
    d.mkdir()
    for shard in range(2):
        with gzip.open(d / f"file-00000000000{shard}.json.gz", "wt", encoding="utf-8") as fh:
            for r in rows[shard * 30 : (shard + 1) * 30]:
                fh.write(json.dumps(r) + "\n")
    src = SourceConfig(backend="hf", name="codeparrot/codeparrot-clean", path=str(d), shuffle_buffer_texts=20)
    texts = list(iter_hf(src, "code", seed=1))
    assert sorted(t.text for t in texts) == sorted(r["content"] for r in rows)
    assert texts[0].meta["repo_name"].startswith("user/repo") and texts[0].meta["license"] == "mit"
    a, b, c = _order(src, 1), _order(src, 1), _order(src, 2)
    assert a == b and a != c and a != sorted(a, key=lambda s: int(s.split("repo")[1].split("/")[0]))
    dt = collect_domain(DomainConfig(name="code", source=src, target_texts=5), seed=1)
    assert len(dt.texts) == 5 and dt.stats.seen == 5 and dt.source["files"]


def test_mathqa_from_source_zip(tmp_path: Path) -> None:
    def row(i):
        return {"Problem": f"a train running at {i} km / hr crosses a pole in 9 sec . what is the length ?",
                "Rationale": f'"explanation : speed = {i} * 5 / 18 m / sec . answer : a"',
                "options": "a ) 120 , b ) 130", "correct": "a", "annotated_formula": "multiply(9, 5)",
                "linear_formula": "multiply(n0,n1)|", "category": "physics"}

    zpath = tmp_path / "MathQA.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("train.json", json.dumps([row(i) for i in range(40)]))
        zf.writestr("dev.json", json.dumps([row(i) for i in range(100, 105)]))
        zf.writestr("test.json", json.dumps([row(i) for i in range(200, 203)]))
    src = SourceConfig(backend="hf", name="mathqa", path=str(zpath))
    texts = list(iter_hf(src, "math", seed=0))
    assert len(texts) == 40
    t = texts[0]
    assert t.text == f"{t.meta['problem']}\n\n{t.meta['rationale']}"
    assert not t.meta["rationale"].startswith('"') and t.meta["rationale"].startswith("explanation :")
    assert t.meta["category"] == "physics"
    assert _order(src, 0) != _order(src, 1) and _order(src, 0) == _order(src, 0)
    dev = list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(zpath), split="validation"), "math", 0))
    assert len(dev) == 5
    assert mathqa_text("p", '"r"') == ("p\n\nr", "r")
    (tmp_path / "x.bin").write_text("[]")
    with pytest.raises(MoescopeError, match="not a zip file or a MathQA .json"):
        list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(tmp_path / "x.bin")), "m", 0))


def test_gsm8k_local_parquet(tmp_path: Path) -> None:
    root = tmp_path / "gsm8k"
    q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
    a = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    _write_parquet(root / "main" / "train-00000-of-00001.parquet", {"question": [q] * 3, "answer": [a] * 3})
    _write_parquet(root / "main" / "test-00000-of-00001.parquet", {"question": ["t"], "answer": ["#### 1"]})
    texts = list(iter_hf(SourceConfig(backend="hf", name="openai/gsm8k", path=str(root)), "math", 0))
    assert len(texts) == 3  # the test split's file is not read
    assert "<<" not in texts[0].text and texts[0].text.startswith(q + "\n\n")
    assert texts[0].meta["answer_text"] == "72"
    assert gsm8k_text("q", "x <<1+1=2>>2\n#### 2")[0] == "q\n\nx 2\n#### 2"


def test_wikitext_103_local_parquet_grouped_by_article(tmp_path: Path) -> None:
    lines = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical role @-@ playing game . \n",
             "", " = = Gameplay = = \n", "", " As with previous games , the player takes control . \n",
             " It is fun . \n", " = Tower Building = \n", "", " The Tower Building is a skyscraper . \n"]
    _write_parquet(tmp_path / "wt" / "wikitext-103-raw-v1" / "train-00000-of-00001.parquet", {"text": lines})
    src = SourceConfig(backend="hf", name="Salesforce/wikitext", config="wikitext-103-raw-v1", path=str(tmp_path / "wt"))
    texts = sorted(iter_hf(src, "prose", 0), key=lambda t: t.id)
    assert [(t.meta["title"], t.meta["section"]) for t in texts] == [
        ("Tower Building", ""), ("Valkyria Chronicles III", ""), ("Valkyria Chronicles III", "Gameplay")]
    assert texts[2].text == "As with previous games , the player takes control .\n\nIt is fun ."


def test_openwebtext_and_c4_local_files(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "owt" / "plain_text" / "train-00000-of-00080.parquet",
                   {"text": [f"web document {i} " * 20 for i in range(25)]})
    owt = list(iter_hf(SourceConfig(backend="hf", name="Skylion007/openwebtext", path=str(tmp_path / "owt")), "p", 0))
    assert len(owt) == 25 and owt[0].text.startswith("web document")
    c4 = tmp_path / "c4" / "en"
    c4.mkdir(parents=True)
    with gzip.open(c4 / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as fh:
        for i in range(12):
            fh.write(json.dumps({"text": f"c4 page {i} " * 30, "timestamp": "2019-04-25T12:57:54Z",
                                 "url": f"https://example.org/{i}"}) + "\n")
    src = SourceConfig(backend="hf", name="allenai/c4", config="en", path=str(tmp_path / "c4" / "en" / "*.json.gz"))
    texts = list(iter_hf(src, "prose", 0))
    assert len(texts) == 12 and texts[0].meta["url"].startswith("https://example.org/")


def test_hf_missing_local_path_is_one_clear_error(tmp_path: Path) -> None:
    src = SourceConfig(backend="hf", name="Skylion007/openwebtext", path=str(tmp_path / "absent"))
    with pytest.raises(MoescopeError, match="local dataset path not found"):
        list(iter_hf(src, "p", 0))


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("some text " * 30)
    real = Path.read_text

    def deny(self, *a, **kw):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", deny)  # chmod cannot lock root out, so simulate the OS error
    with pytest.raises(MoescopeError, match=r"locked\.txt: cannot read \(Permission denied\)"):
        list(iter_files(SourceConfig(backend="files", paths=[str(tmp_path)]), "d", 0))


def test_builtin_sources_record_digests_of_what_they_read() -> None:
    """The manifest names each built-in input by content, not only by path: another gensim wheel, another
    Python's standard library or another generator is visible in it."""
    import hashlib

    from moescope.data import mathgen
    from moescope.data.sources.builtin import builtin_source_info
    from moescope.data.sources.pycode import stdlib_files, stdlib_root

    prose = builtin_source_info("prose")
    assert {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in prose["files"]} == prose["sha256"]
    assert builtin_source_info("math")["generator_sha256"] == hashlib.sha256(
        Path(mathgen.__file__).read_bytes()).hexdigest()
    code = builtin_source_info("code")
    root = stdlib_root()
    expected = hashlib.sha256()
    for f in stdlib_files(root):
        expected.update(f"{f.relative_to(root).as_posix()}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    assert code["files_sha256"] == expected.hexdigest() and code["python"].count(".") == 2
