"""The build: split, leakage check, BPE on train only, packing round trip, balance, dtype, manifest,
atomic output and every bad-input error, through the Python API and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from moescope.cli import main
from moescope.data.blocks import BlockStore, block_path, dtype_for_vocab, texts_path, tokenizer_dir
from moescope.data.build import TEXT_HASHES_NAME, build_dataset
from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig, TokenizerConfig
from moescope.data.packing import batched_texts, pack_to_file
from moescope.data.split import check_leakage, eval_count, find_leakage, split_texts
from moescope.data.text import SourceText, hash_text
from moescope.data.tokenizer import train_bpe
from moescope.errors import MoescopeError
from moescope.io.provenance import sha256_file

WORDS = {
    "alpha": "the river city people music history war king church north village".split(),
    "beta": "def return self value none import class lambda yield async await".split(),
}


def write_domain(path: Path, n: int, words: list[str], seed: int, tag: str) -> Path:
    """n distinct jsonl texts; each carries a unique word so every text is distinguishable."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            body = " ".join(rng.choice(words) for _ in range(rng.randint(15, 60)))
            fh.write(json.dumps({"text": f"{tag}{i}x{rng.randint(0, 10**6)} {body}."}) + "\n")
    return path


def small_cfg(tmp_path: Path, sizes: dict[str, int] | None = None, **kw) -> DataBuildConfig:
    sizes = sizes or {"alpha": 60, "beta": 60}
    domains = []
    for j, (name, n) in enumerate(sizes.items()):
        p = write_domain(tmp_path / f"{name}.jsonl", n, WORDS[name], seed=j, tag=name[:2])
        domains.append(DomainConfig(name=name, source=SourceConfig(backend="files", paths=[str(p)]),
                                    min_chars=1, target_mb=None))
    opts = dict(domains=domains, block_size_tokens=32, tokenizer=TokenizerConfig(vocab_size=400), seed=3)
    opts.update(kw)
    return DataBuildConfig(**opts)


def read_texts(store: BlockStore, split: str, domain: str) -> list[str]:
    return [r["text"] for r in store.texts(split, domain)]


def no_temp_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# ------------------------------------------------------------------ split + leakage


def test_split_sizes_and_determinism() -> None:
    texts = [SourceText(text=f"t{i}", domain="d", id=str(i)) for i in range(1000)]
    assert eval_count(100, 0.05, 20) == 20 and eval_count(1000, 0.05, 20) == 50 and eval_count(1000, 0.1, 20) == 100
    tr, ev = split_texts(texts, domain="d", seed=1, eval_fraction=0.05, eval_min_texts=20)
    assert len(ev) == 50 and len(tr) == 950
    assert {t.id for t in tr}.isdisjoint(t.id for t in ev) and len({t.id for t in tr + ev}) == 1000
    tr2, ev2 = split_texts(texts, domain="d", seed=1, eval_fraction=0.05, eval_min_texts=20)
    _, ev3 = split_texts(texts, domain="d", seed=2, eval_fraction=0.05, eval_min_texts=20)
    assert [t.id for t in ev] == [t.id for t in ev2] and {t.id for t in ev} != {t.id for t in ev3}
    _, small = split_texts(texts[:100], domain="d", seed=1, eval_fraction=0.05, eval_min_texts=20)
    assert len(small) == 20
    with pytest.raises(MoescopeError, match="too few texts"):
        split_texts(texts[:20], domain="d", seed=1, eval_fraction=0.05, eval_min_texts=20)


def test_leakage_check_detects_planted_duplicates() -> None:
    train = [SourceText(text=f"train text {i}", domain="d", id=f"tr{i}") for i in range(10)]
    clean = [SourceText(text=f"eval text {i}", domain="d", id=f"ev{i}") for i in range(5)]
    assert check_leakage(train, clean).clean
    raw = clean + [SourceText(text="train text 3", domain="d", id="planted")]
    rep = find_leakage(train, raw)
    assert (rep.raw_overlap, rep.normalized_overlap) == (1, 1) and rep.examples == ["planted"]
    spaced = clean + [SourceText(text="train   text\n 4 ", domain="d", id="respaced")]
    rep = find_leakage(train, spaced)
    assert (rep.raw_overlap, rep.normalized_overlap) == (0, 1)
    with pytest.raises(MoescopeError, match="leakage.*respaced"):
        check_leakage(train, spaced)


def test_build_fails_on_planted_leak_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    import moescope.data.build as build_mod

    real = build_mod.split_groups

    def leaky(texts_by_domain, groups, **kw):
        parts = real(texts_by_domain, groups, **kw)
        t = parts["train"]["alpha"][0]
        parts["eval"]["alpha"].append(SourceText(text=t.text.replace(" ", "  "), domain="alpha", id="leak"))
        return parts

    monkeypatch.setattr(build_mod, "split_groups", leaky)
    out = tmp_path / "out"
    with pytest.raises(MoescopeError, match="leakage"):
        build_dataset(small_cfg(tmp_path), out)
    assert not out.exists() and no_temp_leftovers(tmp_path)


def _with_near_copies(path: Path, n_copies: int) -> list[tuple[str, str]]:
    """Append to a jsonl source a copy of each of its first n texts with one word added at the end (one new
    5-word shingle: Jaccard >= 0.8 for any text of 15+ words); returns (original, copy) texts."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    pairs = []
    long_enough = [r for r in rows if len(r["text"].split()) >= 30]  # NEAR_DUP_MIN_SHINGLES: short texts join nothing
    for r in long_enough[:n_copies]:
        pairs.append((r["text"], r["text"] + " zebra"))
    with open(path, "a", encoding="utf-8") as fh:
        for _, copy in pairs:
            fh.write(json.dumps({"text": copy}) + "\n")
    return pairs


def test_build_keeps_near_duplicate_documents_on_one_side(tmp_path: Path) -> None:
    """A text and its near-copy (another document) land on the same side, nothing is dropped from eval
    afterwards, and no held-out text near-duplicates a training text."""
    from moescope.data.split import find_near_duplicates

    cfg = small_cfg(tmp_path, {"alpha": 60, "beta": 60})
    pairs = _with_near_copies(tmp_path / "alpha.jsonl", 12)
    store = build_dataset(cfg, tmp_path / "out")
    side = {t: s for s in ("train", "eval") for t in read_texts(store, s, "alpha")}
    assert all(side[a] == side[b] for a, b in pairs)
    assert {side[a] for a, _ in pairs} == {"train", "eval"}  # the draw did put some of them in eval
    near = store.manifest["near_duplicates"]
    assert near["pairs"]["alpha"] >= 12 and near["documents_joined"]["alpha"] >= 24
    assert near["documents_joined"]["beta"] == 0
    assert store.manifest["leakage_check"]["near_duplicates"] == 0
    train = [SourceText(text=t, domain=d, id=f"{d}{i}") for d in store.domains
             for i, t in enumerate(read_texts(store, "train", d))]
    held = [SourceText(text=t, domain=d, id=f"e{d}{i}") for d in store.domains
            for i, t in enumerate(read_texts(store, "eval", d))]
    assert not find_near_duplicates(train, held).removed
    alpha = store.manifest["splits"]["eval"]["alpha"]
    assert alpha["n_document_groups"] < alpha["n_documents"]  # joined copies count once
    assert alpha["n_texts"] >= 20


def test_build_fails_when_a_near_duplicate_pair_crosses_the_split(tmp_path: Path, monkeypatch) -> None:
    """The leakage check counts near-duplicate pairs across the split, not only exact copies."""
    import moescope.data.build as build_mod

    cfg = small_cfg(tmp_path, {"alpha": 60, "beta": 60})
    pairs = _with_near_copies(tmp_path / "alpha.jsonl", 12)
    real = build_mod.split_groups

    def crossing(texts_by_domain, groups, **kw):
        parts = real(texts_by_domain, groups, **kw)
        train = parts["train"]["alpha"]
        moved = next(t for t in train if t.text in {b for _, b in pairs} | {a for a, _ in pairs})
        parts["train"]["alpha"] = [t for t in train if t is not moved]
        parts["eval"]["alpha"].append(moved)
        return parts

    monkeypatch.setattr(build_mod, "split_groups", crossing)
    out = tmp_path / "out"
    with pytest.raises(MoescopeError, match="1 near-duplicates"):
        build_dataset(cfg, out)
    assert not out.exists() and no_temp_leftovers(tmp_path)


# ------------------------------------------------------------------ the build itself


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[BlockStore, DataBuildConfig]:
    tmp = tmp_path_factory.mktemp("built")
    cfg = small_cfg(tmp, {"alpha": 80, "beta": 50})
    return build_dataset(cfg, tmp / "data"), cfg


def test_store_contract_and_manifest(built) -> None:
    from transformers import AutoTokenizer

    store, cfg = built
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(store.root)))
    assert store.domains == ["alpha", "beta"] and store.block_size == 32
    assert store.vocab_size == len(tok) and store.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    m = store.manifest
    for split, n_eval in (("eval", 20), ("train", None)):
        for d, n in (("alpha", 80), ("beta", 50)):
            s = m["splits"][split][d]
            assert s["n_texts"] == (20 if split == "eval" else n - 20)
            assert s["n_texts"] == len(read_texts(store, split, d))
            assert s["n_blocks"] == store.blocks(split, d).shape[0] > 0
            assert s["n_tokens"] == s["n_blocks"] * 32 + s["tail_tokens_dropped"]
            assert s["blocks_sha256"] == sha256_file(block_path(store.root, split, d))  # after balancing
    store.verify_blocks()
    idx = store.index("train")
    assert len(idx) == sum(store.n_blocks("train", d) for d in store.domains)
    rows = idx[[0, -1]]
    got = store.gather("train", rows)
    assert (got[0] == store.blocks("train", "alpha")[0]).all() and (got[1] == store.blocks("train", "beta")[-1]).all()
    assert m["leakage_check"]["passed"] and m["leakage_check"]["normalized_overlap"] == 0
    assert m["tokenizer"]["sha256"] == sha256_file(tokenizer_dir(store.root) / "tokenizer.json")
    assert m["tokenizer"]["trained_on"] == "train split only"
    assert m["sources"]["alpha"]["backend"] == "files" and m["sources"]["alpha"]["files"]
    assert m["filtering"]["alpha"]["kept"] == 80 and "duplicates_exact" in m["filtering"]["alpha"]
    assert m["seed"] == 3 and m["environment"]["libraries"]["tokenizers"] and m["timings"]["total_s"] > 0
    hashes = json.loads((store.root / TEXT_HASHES_NAME).read_text())["splits"]
    for split in ("train", "eval"):
        for d in store.domains:
            assert hashes[split][d] == [hash_text(t) for t in read_texts(store, split, d)]
    assert m["text_hashes"]["sha256"] == sha256_file(store.root / TEXT_HASHES_NAME)


def test_bpe_trained_on_train_split_only(built) -> None:
    store, cfg = built
    train = [t for d in store.domains for t in read_texts(store, "train", d)]
    evals = [t for d in store.domains for t in read_texts(store, "eval", d)]
    built_vocab = json.loads((tokenizer_dir(store.root) / "tokenizer.json").read_text())["model"]["vocab"]
    ref = train_bpe(iter(train), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    assert built_vocab == ref.backend_tokenizer.get_vocab() or built_vocab == json.loads(
        ref.backend_tokenizer.to_str())["model"]["vocab"]
    with_eval = train_bpe(iter(train + evals), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    assert json.loads(with_eval.backend_tokenizer.to_str())["model"]["vocab"] != built_vocab  # the test can tell


def test_packing_round_trip(built) -> None:
    from transformers import AutoTokenizer

    store, _ = built
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(store.root)))
    eos = store.eos_token_id
    for split in ("train", "eval"):
        for d in store.domains:
            texts = read_texts(store, split, d)
            stream = []
            for t in texts:
                stream += tok(t, add_special_tokens=False)["input_ids"] + [eos]
            blocks = np.asarray(store.blocks(split, d))
            n = blocks.size
            assert blocks.reshape(-1).tolist() == stream[:n]
            assert len(stream) - n == store.manifest["splits"][split][d]["tail_tokens_dropped"] < store.block_size
            joined = "".join(t + "<|endoftext|>" for t in texts)
            assert tok.decode(blocks.reshape(-1).tolist()) == joined[: len(tok.decode(stream[:n]))]
            assert joined.startswith(tok.decode(blocks.reshape(-1).tolist()))


def test_memmap_dtype(built, tmp_path: Path) -> None:
    store, _ = built
    assert store.dtype == np.uint16 and isinstance(store.blocks("train", "alpha"), np.memmap)
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    # ids beyond uint16 survive in a uint32 block file
    big = [[70000 + i, 65536, 3] for i in range(10)]
    stats = pack_to_file([str(i) for i in range(10)], lambda batch: [big[int(t)] for t in batch], eos_id=99999, block_size=8, dtype=np.dtype(np.uint32),
                         path=tmp_path / "b.bin", batch_texts=3)
    flat = np.fromfile(tmp_path / "b.bin", dtype=np.uint32)
    expect = [x for ids in big for x in ids + [99999]]
    assert stats.n_blocks == 5 and flat.tolist() == expect[:40] and stats.tail_tokens_dropped == 0


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = build_dataset(small_cfg(tmp_path), tmp_path / "a")
    b = build_dataset(small_cfg(tmp_path), tmp_path / "b")
    for split in ("train", "eval"):
        for d in a.domains:
            assert texts_path(a.root, split, d).read_bytes() == texts_path(b.root, split, d).read_bytes()
            assert block_path(a.root, split, d).read_bytes() == block_path(b.root, split, d).read_bytes()
    c = build_dataset(small_cfg(tmp_path, seed=4), tmp_path / "c")
    assert read_texts(a, "eval", "alpha") != read_texts(c, "eval", "alpha")


def test_balance_truncates_to_smallest_block_count(tmp_path: Path) -> None:
    sizes = {"alpha": 150, "beta": 50}
    plain = build_dataset(small_cfg(tmp_path, sizes), tmp_path / "plain")
    assert plain.manifest["warnings"] and "--balance" in plain.manifest["warnings"][0]
    bal = build_dataset(small_cfg(tmp_path, sizes, balance=True), tmp_path / "bal")
    for split in ("train", "eval"):
        counts = {d: plain.n_blocks(split, d) for d in plain.domains}
        low = min(counts.values())
        assert all(bal.n_blocks(split, d) == low for d in bal.domains)
        for d in bal.domains:
            full = np.asarray(plain.blocks(split, d))
            kept = np.asarray(bal.blocks(split, d))
            # the kept blocks are original blocks, in their original order
            pos = [next(i for i in range(len(full)) if (full[i] == row).all()) for row in kept]
            assert pos == sorted(pos)
            assert bal.manifest["splits"][split][d]["balanced_from_blocks"] == counts[d]
            assert bal.manifest["splits"][split][d]["n_block_tokens"] == low * bal.block_size
    again = build_dataset(small_cfg(tmp_path, sizes, balance=True), tmp_path / "bal2")
    assert block_path(again.root, "train", "alpha").read_bytes() == block_path(bal.root, "train", "alpha").read_bytes()
    for store in (plain, bal):
        assert_blocks_come_from_their_texts(store)


def assert_blocks_come_from_their_texts(store: BlockStore) -> None:
    """Every block's tokens are a run of the EOS-joined encodings of the texts its sources row names, and its
    packed number is where it sat before balancing chose rows (the manifest holds the file's digest)."""
    from transformers import AutoTokenizer

    from moescope.data.blocks import block_sources_path
    from moescope.io.provenance import sha256_file

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(store.root)))
    eos = store.manifest["eos_token_id"]
    for split in ("train", "eval"):
        for d in store.domains:
            texts = read_texts(store, split, d)
            path = block_sources_path(store.root, split, d)
            sources = np.load(path)
            blocks = np.asarray(store.blocks(split, d))
            assert sources.shape == (len(blocks), 3) and np.all(np.diff(sources[:, 0]) > 0)
            assert store.manifest["splits"][split][d]["block_sources_sha256"] == sha256_file(path)
            encoded = [[*tok.encode(text, add_special_tokens=False), eos] for text in texts]

            def holds(lo: int, hi: int, block: np.ndarray) -> bool:
                stream = [t for ids in encoded[lo:hi + 1] for t in ids]
                return any(stream[i:i + len(block)] == block.tolist() for i in range(len(stream) - len(block) + 1))

            for block, (_, first, last) in zip(blocks, sources):
                assert holds(first, last, block)
                # and no shorter span does: the first and last texts are the block's own ends
                assert first == last or not (holds(first + 1, last, block) or holds(first, last - 1, block))


def test_gpt2_tokenizer_from_local_directory(tmp_path: Path) -> None:
    from transformers import GPT2TokenizerFast

    base = train_bpe(["hello world " * 20, "def f(x): return x"] * 10, vocab_size=300)
    gpt2_dir = tmp_path / "gpt2-local"
    GPT2TokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>").save_pretrained(gpt2_dir)
    cfg = small_cfg(tmp_path, tokenizer=TokenizerConfig(kind="gpt2", name_or_path=str(gpt2_dir)))
    store = build_dataset(cfg, tmp_path / "out")
    assert store.manifest["tokenizer"]["name_or_path"] == str(gpt2_dir)
    assert json.loads((tokenizer_dir(store.root) / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads(base.backend_tokenizer.to_str())["model"]["vocab"]
    with pytest.raises(MoescopeError, match="cannot load tokenizer"):
        build_dataset(small_cfg(tmp_path, tokenizer=TokenizerConfig(kind="gpt2", name_or_path=str(tmp_path / "none"))),
                      tmp_path / "out2")


def test_builtin_three_domains_small(tmp_path: Path) -> None:
    cfg = DataBuildConfig(
        domains=[DomainConfig(name="code", target_texts=60), DomainConfig(name="math", target_texts=150),
                 DomainConfig(name="prose", target_texts=60)],
        block_size_tokens=64, tokenizer=TokenizerConfig(vocab_size=600))
    store = build_dataset(cfg, tmp_path / "demo")
    assert store.domains == ["code", "math", "prose"]
    assert store.manifest["leakage_check"]["passed"]
    code = list(store.texts("train", "code"))
    assert any(r["docstring"] for r in code) and all("module" in r for r in code)
    prose = list(store.texts("train", "prose"))
    assert any(r["title"] for r in prose)
    math = list(store.texts("eval", "math"))
    assert len(math) == 20 and all({"family", "params", "answer", "problem", "rationale"} <= set(r) for r in math)


# ------------------------------------------------------------------ CLI and bad input


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_build_and_inspect(tmp_path: Path, capsys) -> None:
    a = write_domain(tmp_path / "a.jsonl", 60, WORDS["alpha"], 0, "a")
    b = write_domain(tmp_path / "b.jsonl", 60, WORDS["beta"], 1, "b")
    out = tmp_path / "data"
    code, stdout, _ = run_cli(["data", "build", "--out", str(out), "--domains", "alpha,beta", "--files", f"alpha={a}",
                               "--files", f"beta={b}", "--block-size", "16", "--vocab-size", "300",
                               "--set", "seed=5"], capsys)
    assert code == 0 and "leakage check passed" in stdout
    store = BlockStore.open(out)
    assert store.block_size == 16 and store.manifest["seed"] == 5 and store.domains == ["alpha", "beta"]
    code, stdout, _ = run_cli(["data", "inspect", str(out), "--samples", "2"], capsys)
    assert code == 0
    assert stdout.count("/ alpha / text") == 4 and stdout.count("/ beta / block") == 4  # 2 per split
    png = out / "inspect" / "length_distribution.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad(tmp_path: Path, capsys, args: list[str], pattern: str, out: Path | None = None) -> None:
    out = out or tmp_path / "out"
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed else None
    code, _, err = run_cli(["data", "build", "--out", str(out), *args], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("moescope: error:")]
    assert len(lines) == 1 and __import__("re").search(pattern, lines[0]), err
    if existed:
        assert sorted(p.name for p in out.iterdir()) == before
    else:
        assert not out.exists()
    assert no_temp_leftovers(out.parent)


def test_bad_input_errors(tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": "tiny"}) + "\n" for _ in range(5)))
    _bad(tmp_path, capsys, ["--files", f"code={short}", "--domains", "code"], r"domain 'code': empty source")
    few = write_domain(tmp_path / "few.jsonl", 15, WORDS["alpha"], 0, "f")
    _bad(tmp_path, capsys, ["--files", f"alpha={few}", "--domains", "alpha", "--set", "domains=[]"],
         r"no domains configured")
    _bad(tmp_path, capsys, ["--files", f"alpha={few}", "--domains", "alpha"], r"domain 'alpha': too few texts")
    _bad(tmp_path, capsys, ["--domains", "poetry"], r"unknown built-in domain 'poetry'")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[domains]]\nname = "x"\n[domains.source]\nbackend = "ftp"\n')
    _bad(tmp_path, capsys, ["--config", str(cfg)], r"unknown source backend 'ftp'")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 " * 100)
    _bad(tmp_path, capsys, ["--files", f"alpha={latin}", "--domains", "alpha"], r"latin\.txt: not UTF-8")
    ok = write_domain(tmp_path / "ok.jsonl", 50, WORDS["alpha"], 0, "o")
    _bad(tmp_path, capsys, ["--files", f"alpha={ok}", "--domains", "alpha", "--block-size", "100000",
                            "--vocab-size", "300"], r"block size 100000 is larger than the whole domain")
    missing = tmp_path / "missing.jsonl"
    _bad(tmp_path, capsys, ["--files", f"alpha={missing}", "--domains", "alpha"], r"path not found: .*missing\.jsonl")


def test_existing_output_directory_rules(tmp_path: Path, capsys) -> None:
    ok = write_domain(tmp_path / "ok.jsonl", 50, WORDS["alpha"], 0, "o")
    out = tmp_path / "data"
    base = ["--files", f"alpha={ok}", "--domains", "alpha", "--vocab-size", "300", "--block-size", "16"]
    assert run_cli(["data", "build", "--out", str(out), *base], capsys)[0] == 0
    first = (out / "manifest.json").read_text()
    # same config again: the existing build is reused untouched
    assert run_cli(["data", "build", "--out", str(out), *base], capsys)[0] == 0
    assert (out / "manifest.json").read_text() == first
    # a build made under other split rules (an older moescope) is another build: refused, never reused;
    # another Python's standard library only matters to builds that read it (built-in sources)
    import moescope.data.build as build

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "SPLIT_RULES", build.SPLIT_RULES + 1)
        _bad(tmp_path, capsys, base, r"already holds a different build .*split rules", out=out)
    other_python = lambda: {"python": "3.99", "gensim": None}  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "builtin_input_versions", other_python)
        assert run_cli(["data", "build", "--out", str(out), *base], capsys)[0] == 0  # files only: reused
    from moescope.data.config import DataBuildConfig

    builtin = DataBuildConfig()
    before = build.config_fingerprint(builtin)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "builtin_input_versions", other_python)
        assert build.config_fingerprint(builtin) != before
    _bad(tmp_path, capsys, [*base, "--seed", "9"], r"already holds a different build", out=out)
    assert (out / "manifest.json").read_text() == first
    assert run_cli(["data", "build", "--out", str(out), *base, "--seed", "9", "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 9
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    _bad(tmp_path, capsys, base, r"holds no moescope build", out=junk)


def test_a_rerun_after_a_killed_build_removes_its_temporaries(tmp_path: Path, capsys) -> None:
    """A build killed mid-write leaves a hidden temporary copy of --out (and, when replacing, the old one);
    the next build of the same --out removes them, also when it reuses the finished build."""
    ok = write_domain(tmp_path / "ok.jsonl", 50, WORDS["alpha"], 0, "o")
    out = tmp_path / "data"
    args = ["data", "build", "--out", str(out), "--files", f"alpha={ok}", "--domains", "alpha",
            "--vocab-size", "300", "--block-size", "16"]
    killed = [tmp_path / ".data.2147483647.abcdefgh.tmp", tmp_path / ".data.old"]
    for stale in killed:
        (stale / "blocks").mkdir(parents=True)
    assert run_cli(args, capsys)[0] == 0
    assert no_temp_leftovers(tmp_path) and BlockStore.open(out).domains == ["alpha"]
    for stale in killed:
        (stale / "blocks").mkdir(parents=True)
    assert run_cli(args, capsys)[0] == 0  # reused, and still cleaned
    assert no_temp_leftovers(tmp_path) and not (tmp_path / ".data.old").exists()


@pytest.mark.slow
def test_default_demo_build_under_a_minute(tmp_path: Path, capsys) -> None:
    """`moescope data build --out DIR` with all defaults (built-in code, math, prose; offline)."""
    import time

    t0 = time.perf_counter()
    code, stdout, _ = run_cli(["data", "build", "--out", str(tmp_path / "demo")], capsys)
    elapsed = time.perf_counter() - t0
    store = BlockStore.open(tmp_path / "demo")
    assert code == 0 and store.domains == ["code", "math", "prose"]
    assert store.manifest["leakage_check"]["normalized_overlap"] == 0
    print(f"default build took {elapsed:.1f} s")


def test_cli_flags_map_onto_the_config(tmp_path: Path) -> None:
    from moescope.cli import build_parser
    from moescope.commands.data import build_config_from_args

    args = build_parser().parse_args([
        "data", "build", "--domains", "code,prose", "--hf", "code=codeparrot/codeparrot-clean",
        "--hf-path", f"code={tmp_path}", "--hf", "math=openai/gsm8k:main", "--target-texts", "500",
        "--tokenizer-path", str(tmp_path / "tok"), "--block-size", "128", "--eval-fraction", "0.1", "--balance",
    ])
    cfg = build_config_from_args(args)
    assert [d.name for d in cfg.domains] == ["code", "prose", "math"]
    code, prose, math = cfg.domains
    assert (code.source.backend, code.source.name, code.source.path) == ("hf", "codeparrot/codeparrot-clean", str(tmp_path))
    assert (math.source.name, math.source.config) == ("openai/gsm8k", "main")
    assert prose.source.backend == "builtin"
    assert all(d.target_texts == 500 and d.target_mb is None for d in cfg.domains)
    assert cfg.tokenizer.kind == "gpt2" and cfg.tokenizer.name_or_path == str(tmp_path / "tok")
    assert (cfg.block_size_tokens, cfg.eval_fraction, cfg.balance) == (128, 0.1, True)
    defaults = build_config_from_args(build_parser().parse_args(["data", "build"]))
    assert defaults == DataBuildConfig()


def test_batches_bounded_by_texts_and_characters() -> None:
    texts = [("x" * n) for n in [5, 300, 20, 20, 1000, 1, 1, 1, 1, 1, 1, 90]]
    batches = list(batched_texts(iter(texts), max_texts=4, max_chars=100))
    assert [t for b in batches for t in b] == texts
    for b in batches:
        assert len(b) <= 4
        assert sum(map(len, b[:-1])) < 100  # only the last text of a batch may cross the budget


def test_documented_toml_example_parses() -> None:
    import textwrap
    import tomllib

    import moescope.data.config as config_mod
    from moescope.io.config import from_dict

    doc = textwrap.dedent(config_mod.__doc__.split("Example (TOML)::")[1])
    cfg = from_dict(DataBuildConfig, tomllib.loads(doc))
    assert [(d.name, d.source.backend) for d in cfg.domains] == [("code", "hf"), ("math", "hf"), ("prose", "files")]
    assert cfg.block_size_tokens == 128 and cfg.domains[0].target_mb == 10


def test_a_tokenizer_asking_for_its_own_code_is_refused_never_run(built, tmp_path: Path, capsys, monkeypatch) -> None:
    """A data directory whose tokenizer names Python beside it (auto_map): transformers would ask
    "run it? [y/N]" and import it on "y"; moescope refuses in one line whatever stdin says."""
    import io
    import shutil

    store, _ = built
    data = tmp_path / "data"
    shutil.copytree(store.root, data)
    marker = tmp_path / "ran"
    tok_dir = data / "tokenizer"
    (tok_dir / "evil_tok.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\n"))
    capsys.readouterr()
    assert main(["data", "inspect", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load tokenizer" in err[0], err
    assert not marker.exists()
