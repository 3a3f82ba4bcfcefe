"""Hugging Face sources: codeparrot-clean, MathQA (source zip), GSM8K, WikiText-103, OpenWebText, C4.

Every loader streams (`datasets.load_dataset(..., streaming=True)`) and shuffles with a
seeded buffer, so a size target samples the stream instead of taking its head. Each
also accepts `path`: a local file, directory or glob in the dataset's own format
(parquet / json(l)[.gz] / the MathQA zip), used in place of the hub id or URL.
"""

from __future__ import annotations

import glob
import json
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moescope.data.config import SourceConfig
from moescope.data.text import SourceText
from moescope.errors import MoescopeError

MATHQA_URL = "https://math-qa.github.io/math-QA/data/MathQA.zip"
MATHQA_SPLIT_FILES = {"train": "train.json", "validation": "dev.json", "dev": "dev.json", "test": "test.json"}

# hub id -> (format, default config)
KNOWN_DATASETS: dict[str, tuple[str, str | None]] = {
    "codeparrot/codeparrot-clean": ("codeparrot", None),
    "codeparrot/codeparrot-clean-train": ("codeparrot", None),
    "mathqa": ("mathqa", None),
    "allenai/math_qa": ("mathqa", None),
    MATHQA_URL: ("mathqa", None),
    "openai/gsm8k": ("gsm8k", "main"),
    "gsm8k": ("gsm8k", "main"),
    "Salesforce/wikitext": ("wikitext", "wikitext-103-raw-v1"),
    "wikitext": ("wikitext", "wikitext-103-raw-v1"),
    "Skylion007/openwebtext": ("text", None),
    "allenai/c4": ("c4", "en"),
}

_DATA_SUFFIXES = {
    ".parquet": "parquet", ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
    ".json.zst": "json", ".jsonl.zst": "json", ".arrow": "arrow", ".csv": "csv", ".txt": "text",
}
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")
_WT_TITLE = re.compile(r"^ = (?!=)(.*?) = $")
_WT_SECTION = re.compile(r"^ (= )+(.*?)( =)+ $")


def dataset_format(src: SourceConfig) -> tuple[str, str | None]:
    """(format, default config) for a source; unknown names read `text_field` of each row."""
    if src.name in KNOWN_DATASETS:
        return KNOWN_DATASETS[src.name]
    if src.name.endswith("MathQA.zip"):
        return "mathqa", None
    if src.name.startswith("codeparrot/"):
        return "codeparrot", None
    return "text", None


def _suffix_builder(path: str) -> str | None:
    name = path.lower()
    for suf in sorted(_DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return _DATA_SUFFIXES[suf]
    return None


def resolve_local_files(location: str, split: str) -> tuple[str, list[str]]:
    """(datasets builder name, sorted data files) of a local file, directory or glob.

    A directory holding several splits (e.g. main/train-*.parquet and main/test-*.parquet)
    contributes only the files whose name mentions `split`.
    """
    p = Path(location)
    if any(ch in location for ch in "*?["):
        files = sorted(glob.glob(location, recursive=True))
    elif p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _suffix_builder(str(f)))
        in_split = [f for f in files if split in Path(f).name]
        files = in_split or files
    elif p.is_file():
        files = [str(p)]
    else:
        raise MoescopeError(f"local dataset path not found: {location}")
    files = [f for f in files if _suffix_builder(f)]
    if not files:
        raise MoescopeError(f"no data files (parquet/json/jsonl/arrow/csv/txt) at {location}")
    builders = {_suffix_builder(f) for f in files}
    if len(builders) > 1:
        raise MoescopeError(f"{location}: mixed data file formats {sorted(b or '' for b in builders)}")
    return builders.pop() or "json", files


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MoescopeError(f"{where}: line {line}: not UTF-8 (byte {exc.start})") from exc


def validate_json_file(path: str) -> None:
    """Fail with file and line on a local JSON / JSON-lines file that is not UTF-8 JSON.

    datasets would raise deep inside the streaming iterator with neither; a whole JSON
    document (e.g. a list of rows) is accepted as well as one object per line.
    """
    import gzip

    p = Path(path)
    if p.name.lower().endswith(".zst"):
        return  # needs zstandard to read; datasets reports its own errors for these
    try:
        data = gzip.decompress(p.read_bytes()) if p.name.lower().endswith(".gz") else p.read_bytes()
    except (OSError, EOFError) as exc:
        raise MoescopeError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    text = decode_utf8(data, str(p))
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as whole:
        first_error = whole
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            # a pretty-printed document fails on its first line as JSON lines: report the whole-file error then
            bad = first_error if lineno == 1 and first_error.lineno > 1 else exc
            line_no = bad.lineno if bad is first_error else lineno
            raise MoescopeError(f"{p}: line {line_no}: invalid JSON ({bad.msg})") from exc


def _open_rows(src: SourceConfig, default_config: str | None) -> Any:
    """A streaming datasets.IterableDataset over the source's raw rows."""
    from datasets import load_dataset

    try:
        if src.path:
            builder, files = resolve_local_files(src.path, src.split)
            if builder == "json":
                for f in files:
                    validate_json_file(f)
            return load_dataset(builder, data_files={src.split: files}, split=src.split, streaming=True)
        return load_dataset(src.name, src.config or default_config, split=src.split, revision=src.revision,
                            streaming=True)
    except MoescopeError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        where = src.path or src.name
        raise MoescopeError(f"cannot open dataset {where!r} (split {src.split!r}): {type(exc).__name__}: {exc}") from exc


def _shuffled(ds: Any, seed: int, buffer: int) -> Any:
    return ds.shuffle(seed=seed, buffer_size=buffer)


def source_info(src: SourceConfig, seed: int) -> dict[str, Any]:
    fmt, default_config = dataset_format(src)
    info: dict[str, Any] = {
        "backend": "hf", "name": src.name, "format": fmt, "config": src.config or default_config,
        "split": src.split, "revision": src.revision, "streaming": True,
        "shuffle_buffer_texts": src.shuffle_buffer_texts, "seed": seed,
    }
    if fmt == "mathqa":
        info["url"] = src.path or (src.name if src.name.startswith("http") else MATHQA_URL)
        info["shuffle"] = "full permutation (numpy default_rng(seed))"
    if src.path:
        info["local_path"] = src.path
        if fmt != "mathqa":
            info["files"] = resolve_local_files(src.path, src.split)[1]
    return info


# ------------------------------------------------------------------ formats


def _iter_codeparrot(ds: Iterable[dict], domain: str) -> Iterator[SourceText]:
    for row in ds:
        yield SourceText(text=row["content"], domain=domain, id=f"{row.get('repo_name', '')}/{row.get('path', '')}",
                         meta={"repo_name": row.get("repo_name"), "path": row.get("path"), "license": row.get("license"),
                               "document": f"file:{row.get('repo_name', '')}/{row.get('path', '')}"})


def _iter_text(ds: Iterable[dict], domain: str, field: str, prefix: str) -> Iterator[SourceText]:
    for i, row in enumerate(ds):
        if field not in row:
            raise MoescopeError(f"dataset rows have no field {field!r} (fields: {', '.join(sorted(row))}); "
                                "set source.text_field")
        meta = {k: row[k] for k in ("url", "timestamp") if k in row}
        yield SourceText(text=row[field], domain=domain, id=f"{prefix}:{i}", meta={k: str(v) for k, v in meta.items()})


def gsm8k_text(question: str, answer: str) -> tuple[str, str, str]:
    """(text, rationale, final answer): calculator annotations <<...>> removed, no prefixes added."""
    rationale = _GSM8K_CALC.sub("", answer).strip()
    final = rationale.rsplit("####", 1)[-1].strip() if "####" in rationale else ""
    return f"{question.strip()}\n\n{rationale}", rationale, final


def _iter_gsm8k(ds: Iterable[dict], domain: str) -> Iterator[SourceText]:
    for i, row in enumerate(ds):
        text, rationale, final = gsm8k_text(row["question"], row["answer"])
        yield SourceText(text=text, domain=domain, id=f"gsm8k:{i}",
                         meta={"problem": row["question"].strip(), "rationale": rationale, "answer_text": final})


def wikitext_articles(lines: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """Group WikiText rows (one line per row, ' = Title = ' starts an article) into (title, lines)."""
    title, body = None, []
    for line in lines:
        stripped = line.rstrip("\n")
        m = _WT_TITLE.match(stripped)
        if m:
            if title is not None:
                yield title, body
            title, body = m.group(1), []
        elif title is not None:
            body.append(stripped)
    if title is not None:
        yield title, body


def wikitext_sections(title: str, lines: list[str]) -> list[tuple[str, str]]:
    """(section heading, text) pairs of one article; ' = = Heading = = ' lines start sections."""
    out: list[tuple[str, str]] = []
    heading, paras = "", []
    for line in lines:
        m = _WT_SECTION.match(line)
        if m:
            if paras:
                out.append((heading, "\n\n".join(paras)))
            heading, paras = m.group(2).strip(), []
        elif line.strip():
            paras.append(line.strip())
    if paras:
        out.append((heading, "\n\n".join(paras)))
    return out


def _wikitext_section_rows(rows: Any) -> Iterator[dict]:
    for title, lines in wikitext_articles(r["text"] for r in rows):
        for idx, (heading, text) in enumerate(wikitext_sections(title, lines)):
            yield {"text": text, "title": title, "section": heading, "section_index": idx}


def _iter_wikitext(rows: Any, domain: str, seed: int, buffer: int) -> Iterator[SourceText]:
    # Rows are lines, so shuffling rows would scramble articles: group first, then shuffle sections.
    from datasets import IterableDataset

    sections = IterableDataset.from_generator(_wikitext_section_rows, gen_kwargs={"rows": rows})
    for i, row in enumerate(_shuffled(sections, seed, buffer)):
        yield SourceText(text=row["text"], domain=domain, id=f"wikitext:{row['title']}:{row['section_index']}",
                         meta={"title": row["title"], "section": row["section"],
                               "document": f"wikitext:{row['title']}"})


def mathqa_text(problem: str, rationale: str) -> tuple[str, str]:
    """MathQA's rationales come wrapped in literal double quotes; strip them, join with a blank line."""
    r = rationale.strip()
    if len(r) >= 2 and r[0] == r[-1] == '"':
        r = r[1:-1].strip()
    return f"{problem.strip()}\n\n{r}", r


def read_json_file(path: Path, data: bytes | None = None, member: str = "") -> Any:
    """A whole-file JSON document; errors name the file (and zip member) and the line."""
    where = f"{path}:{member}" if member else str(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MoescopeError(f"{where}: cannot read ({exc.strerror or exc})") from exc
    text = decode_utf8(data, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoescopeError(f"{where}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc


def read_mathqa(location: str, split: str) -> list[dict]:
    """Rows of one split of MathQA: the source zip (local path, or URL fetched through datasets'
    cache), one of its JSON files (train.json, a list of problems) or a directory holding them."""
    if split not in MATHQA_SPLIT_FILES:
        raise MoescopeError(f"MathQA has no split {split!r} (choose from {', '.join(MATHQA_SPLIT_FILES)})")
    if location.startswith(("http://", "https://")):
        from datasets.utils.file_utils import cached_path

        try:
            location = cached_path(location)
        except Exception as exc:
            raise MoescopeError(f"cannot download MathQA zip {location}: {exc}") from exc
    path = Path(location)
    want = MATHQA_SPLIT_FILES[split]
    if path.is_dir():
        found = sorted(f for f in path.rglob(want) if f.is_file())
        if not found:
            raise MoescopeError(f"MathQA directory {path} holds no {want} (split {split!r})")
        path = found[0]
    if not path.is_file():
        raise MoescopeError(f"MathQA data not found: {location}")
    member = ""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if Path(m).name == want]
            if not members:
                raise MoescopeError(f"{path}: no {want} inside (members: {', '.join(zf.namelist()[:10])})")
            member = members[0]
            rows = read_json_file(path, zf.read(member), member)
    elif path.suffix.lower() == ".json":
        rows = read_json_file(path)
    else:
        raise MoescopeError(f"{path}: not a zip file or a MathQA .json file")
    where = f"{path}:{member}" if member else str(path)
    if not isinstance(rows, list):
        raise MoescopeError(f"{where}: expected a JSON list of problems, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("Problem"), str) or not isinstance(
                row.get("Rationale"), str):
            raise MoescopeError(f"{where}: problem #{i} lacks string fields 'Problem' and 'Rationale'")
    return rows


def _iter_mathqa(src: SourceConfig, domain: str, seed: int) -> Iterator[SourceText]:
    location = src.path or (src.name if src.name.startswith("http") else MATHQA_URL)
    rows = read_mathqa(location, src.split)
    for i in np.random.default_rng(seed).permutation(len(rows)):
        row = rows[int(i)]
        text, rationale = mathqa_text(row["Problem"], row["Rationale"])
        yield SourceText(text=text, domain=domain, id=f"mathqa:{src.split}:{int(i)}",
                         meta={"problem": row["Problem"].strip(), "rationale": rationale,
                               "category": row.get("category"), "correct": row.get("correct"),
                               "options": row.get("options"), "annotated_formula": row.get("annotated_formula")})


def iter_hf(src: SourceConfig, domain: str, seed: int) -> Iterator[SourceText]:
    """Texts of a Hugging Face source in seeded (shuffle-buffer) order; any failure while
    reading is one error naming the dataset (datasets raises many types mid-stream)."""
    try:
        for t in _iter_hf(src, domain, seed):
            if not isinstance(t.text, str):
                raise MoescopeError(f"dataset {src.path or src.name!r}: row {t.id} has no text string "
                                    f"(got {type(t.text).__name__})")
            yield t
    except MoescopeError:
        raise
    except Exception as exc:
        raise MoescopeError(f"cannot read dataset {src.path or src.name!r} (split {src.split!r}): "
                            f"{type(exc).__name__}: {exc}") from exc


def _iter_hf(src: SourceConfig, domain: str, seed: int) -> Iterator[SourceText]:
    fmt, default_config = dataset_format(src)
    if fmt == "mathqa":
        yield from _iter_mathqa(src, domain, seed)
        return
    rows = _open_rows(src, default_config)
    if fmt == "wikitext":
        yield from _iter_wikitext(rows, domain, seed, src.shuffle_buffer_texts)
        return
    rows = _shuffled(rows, seed, src.shuffle_buffer_texts)
    if fmt == "codeparrot":
        yield from _iter_codeparrot(rows, domain)
    elif fmt == "gsm8k":
        yield from _iter_gsm8k(rows, domain)
    else:
        yield from _iter_text(rows, domain, src.text_field, src.name.split("/")[-1] or "hf")
