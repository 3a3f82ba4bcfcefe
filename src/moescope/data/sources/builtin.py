"""The offline built-in corpora: stdlib code, gensim's Wikipedia/news prose, generated math."""

from __future__ import annotations

import bz2
import hashlib
import platform
import random
import re
from collections.abc import Iterator
from pathlib import Path

from moescope.data.mathgen import generate_problems
from moescope.data.sources.pycode import iter_stdlib_definitions, stdlib_files, stdlib_root
from moescope.data.text import SourceText
from moescope.errors import MoescopeError
from moescope.io.provenance import sha256_file

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
SECTION_CHUNK_CHARS = 4000

_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_BOLD_ITALIC = re.compile(r"'{2,5}")
_BLANKS = re.compile(r"\n{3,}")


def gensim_data_dir() -> Path:
    """gensim's bundled test data (importing gensim.test.utils would build a toy corpus as a side effect)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise MoescopeError("the built-in prose corpus needs gensim (pip install gensim)")
    path = Path(spec.origin).parent / "test" / "test_data"
    if not (path / WIKI_FILE).is_file():
        raise MoescopeError(f"gensim's Wikipedia excerpt is missing: {path / WIKI_FILE}")
    return path


def builtin_source_info(name: str) -> dict:
    """Provenance for the manifest: which files a built-in corpus reads, with their digests (the standard
    library's .py files as one digest over their relative paths and contents, the generator's source)."""
    if name == "code":
        root = stdlib_root()
        digest = hashlib.sha256()
        for f in stdlib_files(root):
            digest.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
        return {"backend": "builtin", "name": "code", "description": "Python standard library, top-level "
                "functions and classes (ast), test packages excluded", "root": str(root),
                "python": platform.python_version(), "files_sha256": digest.hexdigest()}
    if name == "prose":
        d = gensim_data_dir()
        files = [d / WIKI_FILE, d / NEWS_FILE]
        return {"backend": "builtin", "name": "prose", "description": "Wikipedia excerpt and Lee news corpus "
                "shipped in the gensim wheel, wiki markup removed with gensim.corpora.wikicorpus.filter_wiki",
                "files": [str(f) for f in files], "sha256": {f.name: sha256_file(f) for f in files}}
    if name == "math":
        from moescope.data import mathgen

        return {"backend": "builtin", "name": "math", "description": "generated MathQA-style word problems, "
                "'{problem}\\n\\n{rationale}'", "families": sorted(mathgen.FAMILIES),
                "generator_sha256": sha256_file(mathgen.__file__)}
    raise MoescopeError(f"unknown built-in corpus {name!r}")


def _chunk_paragraphs(text: str, limit: int) -> list[str]:
    """Split at blank lines into pieces of at most ~`limit` characters (a paragraph is never cut)."""
    if len(text) <= limit:
        return [text]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > limit:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return out


def wiki_sections(raw_markup: str) -> list[tuple[str, str]]:
    """(section heading, plain text) pairs of one article; the lead section's heading is ''.

    gensim's filter_wiki removes links, templates, tables, refs and comments; what it
    leaves of the markup (bold/italic quotes and == headings ==) is removed here.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    plain = filter_wiki(raw_markup)
    plain = _BOLD_ITALIC.sub("", plain)
    sections: list[tuple[str, str]] = []
    last_end, heading = 0, ""
    for m in _HEADING.finditer(plain):
        sections.append((heading, plain[last_end : m.start()]))
        heading, last_end = m.group(2).strip(), m.end()
    sections.append((heading, plain[last_end:]))
    out = []
    for head, body in sections:
        lines = [ln.rstrip() for ln in body.strip().splitlines()]
        body = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
        if body:
            out.append((head, body))
    return out


# sections that are lists of links and citations, not prose
LIST_SECTIONS = frozenset({"see also", "external links", "references", "further reading", "notes", "bibliography",
                           "sources", "citations", "footnotes", "notes and references", "works cited",
                           "external link", "reference", "other websites", "related pages"})


def iter_wiki_texts(domain: str, path: Path | None = None) -> Iterator[SourceText]:
    from gensim.corpora.wikicorpus import extract_pages

    path = path or gensim_data_dir() / WIKI_FILE
    with bz2.open(path, "rb") as fh:
        for title, markup, pageid in extract_pages(fh, filter_namespaces=("0",)):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            for s_idx, (heading, body) in enumerate(wiki_sections(markup)):
                if heading.strip().lower() in LIST_SECTIONS:
                    continue
                for c_idx, chunk in enumerate(_chunk_paragraphs(body, SECTION_CHUNK_CHARS)):
                    yield SourceText(
                        text=chunk, domain=domain, id=f"enwiki:{pageid}:{s_idx}:{c_idx}",
                        meta={"source": "enwiki-excerpt", "title": title, "section": heading, "pageid": pageid,
                              "document": f"enwiki:{title}"},
                    )


def iter_news_texts(domain: str, path: Path | None = None) -> Iterator[SourceText]:
    path = path or gensim_data_dir() / NEWS_FILE
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            text = line.strip()
            if text:
                yield SourceText(text=text, domain=domain, id=f"lee:{i}",
                                 meta={"source": "lee_background", "title": None, "section": "", "line": i})


def iter_builtin(name: str, domain: str, seed: int) -> Iterator[SourceText]:
    """Texts of built-in corpus `name` in a seeded order."""
    if name == "code":
        yield from iter_stdlib_definitions(domain, seed)
    elif name == "prose":
        texts = list(iter_wiki_texts(domain)) + list(iter_news_texts(domain))
        random.Random(seed).shuffle(texts)
        yield from texts
    elif name == "math":
        for i, p in enumerate(generate_problems(seed)):
            yield SourceText(
                text=p.text, domain=domain, id=f"mathgen:{seed}:{i}",
                meta={"family": p.family, "params": p.params, "answer": p.answer, "answer_text": p.answer_text,
                      "problem": p.problem, "rationale": p.rationale},
            )
    else:
        raise MoescopeError(f"unknown built-in corpus {name!r} (choose from code, math, prose)")
