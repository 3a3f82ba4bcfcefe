"""Loaders and bad input: MathQA's own train.json, several sources per domain, and every bad
input of `moescope data build` / `data inspect` as one line naming the file (and line) or value,
exit 2, nothing written under --out. Hub formats are local files in the datasets' own layout."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from moescope.cli import main
from moescope.data.blocks import BlockStore
from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig, TokenizerConfig
from moescope.data.sources import collect_domain
from moescope.data.sources.hf import iter_hf
from moescope.errors import MoescopeError


def mathqa_row(i: int) -> dict:
    return {"Problem": f"a train running at {i} km / hr crosses a pole in 9 sec . what is the length of it ?",
            "Rationale": f'"explanation : speed = {i} * 5 / 18 m / sec . length = {i} * 2.5 m . answer : a"',
            "options": "a ) 120 , b ) 130", "correct": "a", "annotated_formula": "multiply(9, 5)",
            "linear_formula": "multiply(n0,n1)|", "category": "physics"}


def write_mathqa_dir(root: Path, n: int = 40) -> Path:
    """MathQA as unzipped from MathQA.zip: train.json, dev.json, test.json (JSON lists)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps([mathqa_row(i) for i in range(n)]), encoding="utf-8")
    (root / "dev.json").write_text(json.dumps([mathqa_row(1000 + i) for i in range(5)]), encoding="utf-8")
    (root / "test.json").write_text(json.dumps([mathqa_row(2000 + i) for i in range(3)]), encoding="utf-8")
    return root


def write_gsm8k_jsonl(path: Path, n: int = 40) -> Path:
    """GSM8K's own jsonl format (grade-school-math/data/train.jsonl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 3} more. How many apples now?",
                                 "answer": f"Tom has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3} apples."
                                           f"\n#### {2 * i + 3}"}) + "\n")
    return path


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("moescope: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def bad_build(tmp_path: Path, capsys, args: list[str], pattern: str) -> str:
    out = tmp_path / "out"
    code, _, err = run(["data", "build", "--out", str(out), *args], capsys)
    line = one_error_line(err)
    assert code == 2 and __import__("re").search(pattern, line), line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    return line


# ------------------------------------------------------------------ MathQA's own files


def test_mathqa_train_json_file_and_directory(tmp_path: Path) -> None:
    root = write_mathqa_dir(tmp_path / "MathQA")
    for path, n in ((root / "train.json", 40), (root, 40)):
        texts = list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(path)), "math", 0))
        assert len(texts) == n and texts[0].text.startswith("a train running at")
        assert not texts[0].meta["rationale"].startswith('"')
    dev = list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(root), split="validation"), "math", 0))
    assert len(dev) == 5 and all("running at 10" in t.text for t in dev)


def test_mathqa_bad_json_names_file_and_line(tmp_path: Path) -> None:
    d = tmp_path / "mq"
    d.mkdir()
    (d / "train.json").write_text('[\n{"Problem": "p", "Rationale": "r"},\n{"Problem": oops}\n]', encoding="utf-8")
    with pytest.raises(MoescopeError, match=r"train\.json: line 3: invalid JSON"):
        list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(d)), "math", 0))
    (d / "train.json").write_bytes(b'[{"Problem": "p",\n "Rationale": "\xff\xfe"}]')
    with pytest.raises(MoescopeError, match=r"train\.json: line 2: not UTF-8"):
        list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(d)), "math", 0))
    zpath = tmp_path / "MathQA.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("train.json", "[{]")
    with pytest.raises(MoescopeError, match=r"MathQA\.zip:train\.json: line 1: invalid JSON"):
        list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(zpath)), "math", 0))
    (d / "train.json").write_text(json.dumps([{"Problem": 3}]), encoding="utf-8")
    with pytest.raises(MoescopeError, match=r"problem #0 lacks"):
        list(iter_hf(SourceConfig(backend="hf", name="mathqa", path=str(d)), "math", 0))


# ------------------------------------------------------------------ several sources per domain


def test_two_sources_in_one_domain_are_mixed_by_weight(tmp_path: Path) -> None:
    mq = write_mathqa_dir(tmp_path / "MathQA", 60)
    gsm = write_gsm8k_jsonl(tmp_path / "gsm8k" / "train.jsonl", 60)
    dom = DomainConfig(name="math", source=SourceConfig(backend="hf", name="mathqa", path=str(mq), weight=3),
                       extra_sources=[SourceConfig(backend="hf", name="openai/gsm8k", path=str(gsm), weight=1)],
                       target_mb=None, target_texts=40)
    dt = collect_domain(dom, seed=0)
    from_mq = [t for t in dt.texts if t.id.startswith("mathqa:")]
    from_gsm = [t for t in dt.texts if t.id.startswith("gsm8k:")]
    assert (len(from_mq), len(from_gsm)) == (30, 10)
    assert [s["share"] for s in dt.source["sources"]] == [0.75, 0.25] and dt.source["backend"] == "mix"
    first_ten = {t.id.split(":")[0] for t in dt.texts[:10]}
    assert first_ten == {"mathqa", "gsm8k"}  # interleaved, not concatenated


def test_cli_repeated_hf_keeps_every_source(tmp_path: Path, capsys) -> None:
    from moescope.cli import build_parser
    from moescope.commands.data import build_config_from_args

    mq = write_mathqa_dir(tmp_path / "MathQA", 60)
    gsm = write_gsm8k_jsonl(tmp_path / "gsm8k" / "train.jsonl", 60)
    argv = ["data", "build", "--out", str(tmp_path / "out"), "--domains", "math",
            "--hf", "math=mathqa@0.7", "--hf", "math=openai/gsm8k:main@0.3",
            "--hf-path", f"math:mathqa={mq}", "--hf-path", f"math:openai/gsm8k={gsm}",
            "--target-texts", "50", "--block-size", "16", "--vocab-size", "300"]
    cfg = build_config_from_args(build_parser().parse_args(argv))
    (math,) = cfg.domains
    got = [(s.name, s.config, s.weight, s.path) for s in math.all_sources]
    assert got == [("mathqa", None, 0.7, str(mq)), ("openai/gsm8k", "main", 0.3, str(gsm))]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    store = BlockStore.open(tmp_path / "out")
    ids = [r["id"] for s in ("train", "eval") for r in store.texts(s, "math")]
    assert sum(i.startswith("mathqa:") for i in ids) == 35 and sum(i.startswith("gsm8k:") for i in ids) == 15
    assert [s["name"] for s in store.manifest["sources"]["math"]["sources"]] == ["mathqa", "openai/gsm8k"]


def test_cli_repeated_files_for_one_domain_keeps_every_path(tmp_path: Path) -> None:
    from moescope.cli import build_parser
    from moescope.commands.data import build_config_from_args

    args = build_parser().parse_args(["data", "build", "--domains", "notes", "--files", "notes=a.txt,b.txt",
                                      "--files", "notes=c.txt", "--hf", "notes=Skylion007/openwebtext@2"])
    (notes,) = build_config_from_args(args).domains
    assert notes.source.backend == "files" and notes.source.paths == ["a.txt", "b.txt", "c.txt"]
    assert [(s.backend, s.name, s.weight) for s in notes.extra_sources] == [("hf", "Skylion007/openwebtext", 2.0)]


def test_cli_hf_source_errors(tmp_path: Path, capsys) -> None:
    base = ["--domains", "math", "--hf", "math=mathqa", "--hf", "math=openai/gsm8k"]
    bad_build(tmp_path, capsys, [*base, "--hf-path", f"math={tmp_path}"], r"has 2 --hf datasets; write --hf-path math:")
    bad_build(tmp_path, capsys, [*base, "--hf-path", f"math:c4={tmp_path}"], r"no --hf dataset 'c4'")
    bad_build(tmp_path, capsys, ["--hf", "math=mathqa@heavy"], r"weight 'heavy' is not a number")
    bad_build(tmp_path, capsys, ["--hf", "math=mathqa@0"], r"weight must be > 0")
    bad_build(tmp_path, capsys, ["--hf-path", f"prose={tmp_path}"], r"domain 'prose' has no --hf dataset")


# ------------------------------------------------------------------ bad files through --hf-path


def test_invalid_json_through_hf_path_names_file_and_line(tmp_path: Path, capsys) -> None:
    rows = tmp_path / "owt" / "train.jsonl"
    rows.parent.mkdir()
    rows.write_text('{"text": "fine text one"}\n{"text": "fine text two"}\n{"text": broken\n', encoding="utf-8")
    args = ["--domains", "prose", "--hf", "prose=Skylion007/openwebtext", "--hf-path", f"prose={rows.parent}"]
    bad_build(tmp_path, capsys, args, r"train\.jsonl: line 3: invalid JSON")
    rows.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 latin-1"}\n')
    bad_build(tmp_path, capsys, args, r"train\.jsonl: line 2: not UTF-8")
    rows.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', encoding="utf-8")  # one pretty-printed document
    bad_build(tmp_path, capsys, args, r"train\.jsonl: line 3: invalid JSON")


def test_non_string_text_rows_are_one_error(tmp_path: Path) -> None:
    rows = tmp_path / "owt.jsonl"
    rows.write_text('{"text": "fine text"}\n{"text": 42}\n', encoding="utf-8")
    with pytest.raises(MoescopeError, match="has no text string"):
        list(iter_hf(SourceConfig(backend="hf", name="Skylion007/openwebtext", path=str(rows)), "p", 0))


# ------------------------------------------------------------------ values and manifests


def test_vocab_size_zero_is_refused(tmp_path: Path, capsys) -> None:
    bad_build(tmp_path, capsys, ["--domains", "math", "--target-texts", "60", "--vocab-size", "0"],
              r"tokenizer\.vocab_size must be >= 257 .*got 0")


@pytest.mark.parametrize("name", ["m<!--<script>", "", "a" * 33, "a/b", ".hidden", "naïve", "two words"])
def test_bad_domain_names_are_refused(name: str) -> None:
    with pytest.raises(MoescopeError, match="bad domain name .*letters, digits"):
        DomainConfig(name=name, source=SourceConfig(backend="files", paths=["x"]))


def test_good_domain_names_and_cli_error(tmp_path: Path, capsys) -> None:
    for name in ("code_v2.1-x", "a" * 32, "Math"):
        assert DomainConfig(name=name, source=SourceConfig(backend="files", paths=["x"])).name == name
    f = tmp_path / "t.txt"
    f.write_text("some text " * 30)
    line = bad_build(tmp_path, capsys, ["--domains", "m<!--<script>", "--files", f"m<!--<script>={f}"],
                     r"bad domain name")
    assert "'m<!--<script>'" in line


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    from moescope.data.build import build_dataset

    tmp = tmp_path_factory.mktemp("store")
    src = tmp / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"text number {i} about rivers and kings {i * 7}"}) + "\n"
                           for i in range(60)), encoding="utf-8")
    cfg = DataBuildConfig(domains=[DomainConfig(name="alpha", source=SourceConfig(backend="files", paths=[str(src)]),
                                                min_chars=1, target_mb=None)],
                          block_size_tokens=16, tokenizer=TokenizerConfig(vocab_size=300))
    return build_dataset(cfg, tmp / "data").root


def _copy(store_root: Path, dst: Path) -> Path:
    shutil.copytree(store_root, dst)
    return dst


def test_binary_manifest_is_one_error(small_store: Path, tmp_path: Path, capsys) -> None:
    d = _copy(small_store, tmp_path / "d")
    (d / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    code, _, err = run(["data", "inspect", str(d)], capsys)
    assert code == 2 and "manifest.json: unreadable manifest: not UTF-8" in one_error_line(err)
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(MoescopeError, match="must be a JSON object"):
        BlockStore.open(d)
    # a build into a directory holding a binary manifest: refused, the directory untouched
    (d / "manifest.json").write_bytes(b"\xff\x00binary")
    before = sorted(p.name for p in d.iterdir())
    code, _, err = run(["data", "build", "--out", str(d), "--domains", "math", "--target-texts", "60"], capsys)
    assert code == 2 and "already holds a different build" in one_error_line(err)
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("vocab", [100_000, 200])
def test_manifest_vocab_must_match_its_tokenizer(small_store: Path, tmp_path: Path, vocab: int) -> None:
    d = _copy(small_store, tmp_path / "d")
    m = json.loads((d / "manifest.json").read_text())
    assert BlockStore.open(d).vocab_size == m["vocab_size"] == 300
    m["vocab_size"] = vocab
    m["dtype"] = "uint32" if vocab > 65536 else m["dtype"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MoescopeError, match=rf"vocab_size {vocab} disagrees with the tokenizer .*300 token ids"):
        BlockStore.open(d)


def test_manifest_values_and_tokenizer_digest_are_checked(small_store: Path, tmp_path: Path) -> None:
    d = _copy(small_store, tmp_path / "d")
    good = json.loads((d / "manifest.json").read_text())
    for key, value, pattern in (("vocab_size", 0, "vocab_size must be a positive integer"),
                                ("eos_token_id", 300, "eos_token_id 300 is outside"),
                                ("dtype", "float32", "dtype must be"),
                                ("block_size", "16", "block_size must be a positive integer")):
        (d / "manifest.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(MoescopeError, match=pattern):
            BlockStore.open(d)
    (d / "manifest.json").write_text(json.dumps(good))
    tj = d / "tokenizer" / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    with pytest.raises(MoescopeError, match="sha256 differs"):
        BlockStore.open(d)


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("keep_sha", [True, False])
def test_token_id_past_the_vocabulary_is_refused_naming_file_and_id(small_store: Path, tmp_path: Path,
                                                                   keep_sha: bool) -> None:
    import numpy as np

    from moescope.io.provenance import sha256_file

    d = _copy(small_store, tmp_path / "d")
    path = d / "blocks" / "eval" / "alpha.bin"
    store = BlockStore.open(d)
    tokens = np.fromfile(path, dtype=store.dtype)
    tokens[5] = store.vocab_size  # one past the last id
    tokens.tofile(path)
    entry = lambda m: m["splits"]["eval"]["alpha"]  # noqa: E731
    _edit_manifest(d, lambda m: entry(m).update(blocks_sha256=sha256_file(path)) if keep_sha
                   else entry(m).pop("blocks_sha256", None))
    with pytest.raises(MoescopeError, match=rf"{path}: token id {store.vocab_size} is outside the vocabulary"):
        BlockStore.open(d).verify_blocks()


def test_huge_n_blocks_is_a_size_error_before_any_allocation(small_store: Path, tmp_path: Path) -> None:
    d = _copy(small_store, tmp_path / "d")
    _edit_manifest(d, lambda m: m["splits"]["train"]["alpha"].update(n_blocks=10**12))
    with pytest.raises(MoescopeError, match=r"alpha\.bin: size \d+ bytes, manifest says 32000000000000"):
        BlockStore.open(d).index("train")


@pytest.mark.parametrize("domains, says", [(["alpha", "alpha"], "'alpha' is listed more than once"),
                                           (["../../evil"], "name '../../evil' is not a plain file name"),
                                           ([".."], "name '..' is not a plain file name")])
def test_manifest_domain_names_must_be_distinct_plain_file_names(small_store: Path, tmp_path: Path,
                                                                  domains: list[str], says: str) -> None:
    d = _copy(small_store, tmp_path / "d")

    def edit(m: dict) -> None:
        for split in m["splits"].values():
            for name in domains:
                split[name] = split["alpha"]
        m["domains"] = domains

    _edit_manifest(d, edit)
    with pytest.raises(MoescopeError, match=f"manifest.json: domain {re.escape(says)}"):
        BlockStore.open(d)


@pytest.mark.parametrize("kind, says", [("fifo", "block file is not a regular file"),
                                        ("loop", "cannot read block file .*symbolic links")])
def test_block_file_that_is_no_regular_file_says_why(small_store: Path, tmp_path: Path, kind: str, says: str) -> None:
    import os

    d = _copy(small_store, tmp_path / "d")
    path = d / "blocks" / "train" / "alpha.bin"
    path.unlink()
    os.mkfifo(path) if kind == "fifo" else os.symlink(path.name, path)
    with pytest.raises(MoescopeError, match=f"{path}: {says}"):
        BlockStore.open(d).blocks("train", "alpha")


@pytest.mark.parametrize("line, says", [("[1]", "expected a JSON object, got list"),
                                        ('{"x": 1}', 'expected a "text" string, got no text key'),
                                        ('{"text": 5}', 'expected a "text" string, got int'),
                                        ("{{{", "invalid JSON")])
def test_bad_text_lines_are_one_error_naming_file_and_line(small_store: Path, tmp_path: Path, capsys,
                                                           line: str, says: str) -> None:
    d = _copy(small_store, tmp_path / "d")
    path = d / "texts" / "eval" / "alpha.jsonl"
    path.write_text(json.dumps({"text": "fine\u2028still the same line"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(MoescopeError, match=re.escape(f"{path}:2: {says}")):
        list(BlockStore.open(d).texts("eval", "alpha"))
    code, _, err = run(["data", "inspect", str(d)], capsys)
    assert code == 2 and f"{path}:2: {says}" in one_error_line(err)
