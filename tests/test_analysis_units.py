"""Intervals and tests resample source documents, not eval blocks: the reader that maps every eval
block to the document of its first token, the per-unit sums, and what the unit changes in the numbers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from moescope.analysis import stats
from moescope.analysis.summary import (
    SummaryConfig, best_layer_nmi_test, block_routing_counts, statistics_header, summarize_eval_loss, summarize_layer,
    summarize_start_nmi, summarize_token_types,
)
from moescope.analysis.table import RoutingTable
from moescope.data.blocks import BlockStore, block_sources_path, tokenizer_dir
from moescope.data.units import UNIT_BLOCK, UNIT_DOCUMENT, UNIT_NAMED_DOCUMENT, UNIT_TEXT, eval_block_units
from moescope.errors import MoescopeError
from moescope.report.build import resampled_units
from test_analysis_summary import synthetic_table
from train_fixtures import make_block_store

CFG = SummaryConfig(n_resamples=300, n_permutations=199, vocab_min_count=5)


def width(iv) -> float:
    iv = iv if isinstance(iv, dict) else iv.to_dict()
    return iv["high"] - iv["low"]


# --------------------------------------------------------------------------- every block its own unit


def test_every_block_its_own_unit_reproduces_the_block_level_numbers_bit_for_bit() -> None:
    table = synthetic_table(np.random.default_rng(0), k=2)
    domains = ["a", "b", "c"]
    ids, block_domain, counts = block_routing_counts(table)
    # units numbered apart from the block ids, one per block: the numbers must not move at all
    own = np.full(ids.max() + 1, -1)
    own[ids] = 1000 + 7 * np.arange(ids.size)
    default, explicit = summarize_layer(table, domains, CFG), summarize_layer(table, domains, CFG, unit_of_block=own)
    assert json.dumps(default, sort_keys=True) == json.dumps(explicit, sort_keys=True)
    # ... and they are the block-level machinery's own results, called on the block tables directly
    nmi = stats.nmi_statistic(3, table.n_experts)
    tables = stats.domain_tables(counts, block_domain, 3)
    direct = stats.bootstrap_interval(tables, nmi, strata=block_domain, n_resamples=CFG.n_resamples, seed=CFG.seed)
    assert explicit["specialization"]["nmi"] == {"estimate": direct.estimate, "low": direct.low, "high": direct.high}
    perm = stats.permutation_test_nmi(counts, block_domain, 3, n_permutations=CFG.n_permutations, seed=CFG.seed)
    assert explicit["specialization"]["nmi_permutation"] == perm.to_dict()
    assert explicit["n_units"] == explicit["n_blocks"] == ids.size
    start = summarize_start_nmi(table, table, domains, CFG, unit_of_block=own)
    assert start == summarize_start_nmi(table, table, domains, CFG)

    rng = np.random.default_rng(1)
    dom = np.repeat([0, 1], 15)
    loss, tokens = rng.normal(300, 30, 30), np.full(30, 100.0)
    assert summarize_eval_loss(loss, tokens, dom, ["x", "y"], CFG, block_unit=np.arange(30) * 3) == \
        summarize_eval_loss(loss, tokens, dom, ["x", "y"], CFG)
    other = loss + rng.normal(0, 5, 30)
    pair = dict(n_resamples=200, n_permutations=200)
    assert stats.paired_loss_difference(loss, other, tokens, dom, 2, block_unit=np.arange(30) + 5, **pair) == \
        stats.paired_loss_difference(loss, other, tokens, dom, 2, **pair)


# --------------------------------------------------------------------------- blocks of one document move together


def test_a_duplicated_block_inside_its_document_does_not_narrow_the_interval() -> None:
    rng = np.random.default_rng(2)
    n_docs = 24
    dom = np.repeat([0, 1], n_docs // 2)
    loss, tokens = rng.normal(3.0, 0.6, n_docs) * 128, np.full(n_docs, 128.0)
    once = summarize_eval_loss(loss, tokens, dom, ["x", "y"], CFG)
    # every document now holds two blocks with identical sums
    twice = dict(block_loss_sum=np.repeat(loss, 2), block_tokens=np.repeat(tokens, 2), block_domain=np.repeat(dom, 2))
    as_documents = summarize_eval_loss(**twice, domains=["x", "y"], cfg=CFG, block_unit=np.repeat(np.arange(n_docs), 2))
    as_blocks = summarize_eval_loss(**twice, domains=["x", "y"], cfg=CFG)
    for key in ("token_weighted", "domain_weighted"):
        # the document's sums are twice the block's: ratios and resamples are those of the single blocks
        assert as_documents[key]["low"] == pytest.approx(once[key]["low"])
        assert as_documents[key]["high"] == pytest.approx(once[key]["high"])
        # the same copies taken as independent blocks: about 1/sqrt(2) as wide, which is wrong
        assert width(as_blocks[key]) < 0.85 * width(as_documents[key])


def documents_table(rng: np.random.Generator, docs_per_domain: int = 3, blocks_per_doc: int = 20,
                    block_len: int = 16, n_exp: int = 6) -> tuple[RoutingTable, np.ndarray]:
    """2 domains; every document routes all its tokens to an expert of its own (domain 0's documents to
    experts 0-2, domain 1's to 3-5). (table, unit of every block id)."""
    n_docs = 2 * docs_per_domain
    doc_of_block = np.repeat(np.arange(n_docs), blocks_per_doc)
    block = np.repeat(np.arange(doc_of_block.size), block_len)
    domain = (doc_of_block // docs_per_domain)[block]
    expert = doc_of_block[block].copy()
    noise = rng.random(block.size) < 0.3
    expert[noise] = rng.integers(0, n_exp, noise.sum())
    n = block.size
    probs = np.full((n, n_exp), 0.1 / (n_exp - 1))
    probs[np.arange(n), expert] = 0.9
    return (RoutingTable(rng.integers(10, 40, n), block, np.tile(np.arange(block_len), doc_of_block.size), domain,
                         expert[:, None], np.ones((n, 1)), probs), doc_of_block)


def test_the_nmi_null_keeps_documents_intact() -> None:
    table, doc_of_block = documents_table(np.random.default_rng(3))
    blocks = summarize_layer(table, ["x", "y"], CFG)["specialization"]
    nulls: list[np.ndarray] = []
    documents = summarize_layer(table, ["x", "y"], CFG, unit_of_block=doc_of_block, nmi_nulls=nulls)
    spec = documents["specialization"]
    assert documents["n_units"] == 6 and documents["n_blocks"] == 120
    # 120 blocks shuffled one by one never reach the observed NMI ...
    assert blocks["nmi_pvalue"] <= 1 / (1 + CFG.n_permutations) + 1e-12
    # ... but 3 documents per domain can be relabelled only C(6, 3) = 20 ways, one of them the observed split
    assert spec["nmi_pvalue"] >= 0.04
    assert spec["nmi"]["estimate"] == blocks["nmi"]["estimate"]
    # one document per resample weighs 20 blocks: the interval widens
    assert width(spec["nmi"]) > 1.5 * width(blocks["nmi"])
    # the best of several layers is tested under the same document relabellings
    summarize_layer(table, ["x", "y"], CFG, unit_of_block=doc_of_block, nmi_nulls=nulls)
    best = best_layer_nmi_test({"1": documents, "2": documents}, nulls)
    assert best["pvalue"] == pytest.approx(spec["nmi_pvalue"])
    # the start NMI and the change come from the same resampled documents as the final NMI
    start = summarize_start_nmi(table, table, ["x", "y"], CFG, unit_of_block=doc_of_block)
    assert start["nmi_start"] == spec["nmi"]
    assert start["nmi_start"] != summarize_start_nmi(table, table, ["x", "y"], CFG)["nmi_start"]


def test_the_sign_flip_test_flips_whole_documents() -> None:
    rng = np.random.default_rng(4)
    doc_of_block = np.repeat(np.arange(6), 20)
    dom = doc_of_block // 3
    tokens = np.full(doc_of_block.size, 100.0)
    b = rng.normal(3.0, 0.3, doc_of_block.size) * 100
    a = b + (0.05 + rng.normal(0, 0.01, doc_of_block.size)) * 100  # every block of every document is worse
    pair = dict(n_resamples=200, n_permutations=999)
    by_block = stats.paired_loss_difference(a, b, tokens, dom, 2, **pair)
    by_document = stats.paired_loss_difference(a, b, tokens, dom, 2, block_unit=doc_of_block, **pair)
    assert by_block.pvalue < 0.005
    # 6 documents: 2^6 sign patterns, two of them (all +, all -) as extreme as the observed one
    assert by_document.pvalue == pytest.approx(2 / 64)
    assert (by_document.n_blocks, by_document.n_units) == (120, 6)
    with pytest.raises(ValueError, match="unit holds tokens of more than one domain"):
        stats.paired_loss_difference(a, b, tokens, dom, 2, block_unit=np.zeros(120, dtype=int), **pair)


@pytest.mark.filterwarnings("ignore")  # resamples that miss the one-document domain: its ratio is 0/0 there
def test_a_domain_with_one_document_is_held_fixed_not_pooled() -> None:
    """Pooling a one-document domain with the others would leave it out of ~1/3 of the resamples (0/0 = NaN
    intervals); held fixed, every interval it enters is finite, and its own interval is null, not [x, x]."""
    rng = np.random.default_rng(5)
    dom = np.repeat([0, 1], 10)
    unit = np.where(dom == 0, 0, 1 + np.arange(20))  # domain 0: one document of 10 blocks
    loss = rng.normal(300, 30, 20)
    out = summarize_eval_loss(loss, np.full(20, 100.0), dom, ["x", "y"], CFG, block_unit=unit)
    for key in ("token_weighted", "domain_weighted"):
        assert np.isfinite([out[key]["low"], out[key]["high"]]).all() and out[key]["low"] < out[key]["high"]
    assert out["domains"]["y"]["low"] < out["domains"]["y"]["high"]
    assert np.isnan(out["domains"]["x"]["low"]) and np.isnan(out["domains"]["x"]["high"])
    # domain x is in every resample as it is: the domain-weighted interval is domain y's, shifted
    y = out["domains"]["y"]
    x = out["domains"]["x"]["estimate"]
    assert out["domain_weighted"]["low"] == pytest.approx((x + y["low"]) / 2)
    assert out["domain_weighted"]["high"] == pytest.approx((x + y["high"]) / 2)
    paired = stats.paired_loss_difference(loss, loss - rng.normal(1, 1, 20), np.full(20, 100.0), dom, 2,
                                          block_unit=unit)
    assert np.isfinite([paired.domain_weighted.low, paired.domain_weighted.high]).all()
    with pytest.raises(ValueError, match="need at least two units"):
        stats.bootstrap_interval(np.ones((1, 1)), lambda t: t[..., 0], strata=np.array([0]))


def test_token_type_nmi_resamples_documents() -> None:
    table, doc_of_block = documents_table(np.random.default_rng(6))
    types = np.asarray(table.expert_index[:, 0] % 3)
    types[::5] = (types[::5] + 1) % 3
    blocks = summarize_token_types(types, table, ["a", "b", "c"], CFG)
    documents = summarize_token_types(types, table, ["a", "b", "c"], CFG, unit_of_block=doc_of_block)
    assert documents["nmi"]["estimate"] == blocks["nmi"]["estimate"]
    assert width(documents["nmi"]) > width(blocks["nmi"])


# --------------------------------------------------------------------------- the reader, on a real build


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> BlockStore:
    """A tiny `moescope data` build whose texts come four to a document, balanced (rows chosen)."""
    from moescope.data.build import build_dataset
    from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig, TokenizerConfig

    tmp = tmp_path_factory.mktemp("units")
    rng = random.Random(0)
    domains = []
    for name, words, n in (("alpha", "the river city people music".split(), 90),
                           ("beta", "def return self value none".split(), 70)):
        path = tmp / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(n):
                body = " ".join(rng.choice(words) for _ in range(rng.randint(15, 60)))
                fh.write(json.dumps({"text": f"{name}{i} {body}.", "document": f"{name}-doc{i // 4}"}) + "\n")
        domains.append(DomainConfig(name=name, source=SourceConfig(backend="files", paths=[str(path)]),
                                    min_chars=1, target_mb=None))
    cfg = DataBuildConfig(domains=domains, block_size_tokens=32, tokenizer=TokenizerConfig(vocab_size=400), seed=3,
                          balance=True)
    return build_dataset(cfg, tmp / "data")


def first_token_documents(store: BlockStore) -> list[tuple[int, str]]:
    """(domain, document) of every eval block's first token, found by re-packing the texts and locating
    each block's tokens in the stream (independently of sources.npy)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(store.root)))
    out = []
    for d, domain in enumerate(store.domains):
        records = list(store.texts("eval", domain))
        stream, owner = [], []
        for i, record in enumerate(records):
            ids = tok.encode(record["text"], add_special_tokens=False) + [store.eos_token_id]
            stream += ids
            owner += [i] * len(ids)
        size = store.block_size
        starts = {tuple(stream[j:j + size]): j for j in range(0, len(stream) - size + 1, size)}
        for block in np.asarray(store.blocks("eval", domain)):
            out.append((d, records[owner[starts[tuple(block.tolist())]]]["document"]))
    return out


def test_the_reader_maps_every_eval_block_to_the_document_of_its_first_token(built: BlockStore) -> None:
    units = eval_block_units(built)
    assert units.unit == UNIT_DOCUMENT and units.note is None
    assert units.of_block.shape == (built.index("eval").shape[0],)
    truth = first_token_documents(built)
    # same document <=> same unit, over every pair of blocks (domains included)
    same_doc = np.array([[x == y for y in truth] for x in truth])
    assert np.array_equal(same_doc, units.of_block[:, None] == units.of_block[None, :])
    assert same_doc.sum() > len(truth)  # documents do span several blocks here
    described = units.describe(np.arange(len(truth)), built.index("eval")[:, 0], built.domains)
    assert described == {"unit": UNIT_DOCUMENT,
                         "n_units": {name: len({doc for d, doc in truth if d == i})
                                     for i, name in enumerate(built.domains)}}
    header = statistics_header(CFG, described)
    assert header["unit"] == UNIT_DOCUMENT and "units" in header["interval"] and "units" in header["pvalue"]


def test_a_build_without_block_sources_falls_back_to_blocks_and_says_so(built: BlockStore, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(built.root, old)
    block_sources_path(old, "eval", "beta").unlink()
    units = eval_block_units(BlockStore.open(old))
    assert units.unit == UNIT_BLOCK and "beta.sources.npy missing" in units.note
    assert np.array_equal(units.of_block, np.arange(built.index("eval").shape[0]))
    # the training fixtures' stores never had sources or texts
    store = BlockStore.open(make_block_store(tmp_path / "fixture"))
    fallback = eval_block_units(store)
    assert fallback.unit == UNIT_BLOCK and np.array_equal(fallback.of_block, np.arange(store.index("eval").shape[0]))
    assert fallback.describe(np.arange(4), np.array([0, 0, 1, 1]), ["p", "q"])["n_units"] == {"p": 2, "q": 2}
    assert statistics_header(CFG)["unit"] == UNIT_BLOCK


def test_a_changed_or_inconsistent_sources_file_is_refused(built: BlockStore, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(built.root, changed)
    path = block_sources_path(changed, "eval", "alpha")
    sources = np.load(path)
    sources[0, 1] += 1
    np.save(path, sources)
    with pytest.raises(MoescopeError, match="alpha.sources.npy does not match its block_sources_sha256"):
        eval_block_units(BlockStore.open(changed))
    manifest = json.loads((changed / "manifest.json").read_text())
    del manifest["splits"]["eval"]["alpha"]["block_sources_sha256"]  # an older manifest: no digest to check
    (changed / "manifest.json").write_text(json.dumps(manifest))
    sources[0, 1] = 10_000
    np.save(path, sources)
    with pytest.raises(MoescopeError, match="a block starts in text 10000"):
        eval_block_units(BlockStore.open(changed))


def test_released_model_texts_take_the_document_or_the_text_of_each_blocks_first_token(built: BlockStore,
                                                                                         tmp_path: Path) -> None:
    from moescope.hf import texts

    class Words:
        """A tokenizer of one id per word, EOS 0."""

        eos_token_id = 0

        def __call__(self, batch, add_special_tokens=False):
            return {"input_ids": [[1 + len(w) for w in t.split()] for t in batch]}

    held = texts.read_data_dir_texts(built.root)
    assert held.unit_name == UNIT_DOCUMENT
    blocks = texts.pack_texts(held.texts, Words(), 16, unit_keys=held.unit_keys, unit_name=held.unit_name)
    # each block's first token, found by walking the texts word by word
    truth = []
    for domain, domain_texts in held.texts.items():
        owner = [i for i, t in enumerate(domain_texts) for _ in range(len(t.split()) + 1)]
        n = int((blocks.domain == list(held.texts).index(domain)).sum())
        truth += [(domain, held.unit_keys[domain][owner[16 * j]]) for j in range(n)]
    same = np.array([[x == y for y in truth] for x in truth])
    assert np.array_equal(same, blocks.unit[:, None] == blocks.unit[None, :]) and same.sum() > len(truth)

    rows = tmp_path / "texts.jsonl"
    rows.write_text("".join(json.dumps({"text": " ".join(["w"] * n), "domain": d}) + "\n"
                            for d, n in (("p", 20), ("p", 40), ("q", 7), ("q", 50))))
    held = texts.read_texts_file(rows)
    blocks = texts.pack_texts(held.texts, Words(), 8, unit_keys=held.unit_keys, unit_name=held.unit_name)
    # p: 21 + 41 tokens -> 7 blocks, starting in text 0 (blocks 0-2) and text 1 (3-6); q: 8 + 51 -> 7 blocks,
    # block 0 starts in text 0, blocks 1-6 in text 1
    assert held.unit_name == UNIT_TEXT
    assert blocks.unit.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3]

    # the same texts naming their documents: p's two rows are one document, q's rows stay apart
    rows.write_text("".join(json.dumps({"text": " ".join(["w"] * n), "domain": d, **doc}) + "\n"
                            for d, n, doc in (("p", 20, {"document": "a"}), ("p", 40, {"document": "a"}),
                                              ("q", 7, {"document": "a"}), ("q", 50, {}))))
    held = texts.read_texts_file(rows)
    blocks = texts.pack_texts(held.texts, Words(), 8, unit_keys=held.unit_keys, unit_name=held.unit_name)
    assert held.unit_name == UNIT_NAMED_DOCUMENT and resampled_units({"statistics": {"unit": held.unit_name}}) == \
        "source documents"
    assert blocks.unit.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    for bad in ('{"text": "w", "domain": "p", "document": 3}', '{"text": "w", "domain": "p", "document": ""}'):
        rows.write_text('{"text": "w w", "domain": "p"}\n' + bad + "\n")
        with pytest.raises(MoescopeError, match=rf"{rows}:2: \"document\" must be a non-empty string"):
            texts.read_texts_file(rows)


def test_a_record_is_its_document_or_its_own_when_it_names_none() -> None:
    from moescope.data.units import record_document

    assert record_document({"text": "a", "id": "x:1", "document": "file:x"}, 3) == "file:x"
    assert record_document({"text": "a", "id": "x:1"}, 3) == "text:x:1"
    # a hand-made texts file without ids: each line its own document, not one document for all
    assert record_document({"text": "a"}, 3) != record_document({"text": "a"}, 4)


def test_btx_paired_delta_resamples_documents() -> None:
    from moescope.btx.pipeline import paired_delta

    rng = np.random.default_rng(7)
    dom = np.repeat([0, 1], 12)
    nll, ref = rng.normal(400, 40, 24), rng.normal(400, 40, 24)
    once = paired_delta(nll, ref, 128, dom)
    doubled = dict(block_nll=np.repeat(nll, 2), ref_block_nll=np.repeat(ref, 2), tokens_per_block=128,
                   domain_ids=np.repeat(dom, 2))
    assert paired_delta(**doubled, block_unit=np.repeat(np.arange(24), 2)) == pytest.approx(once)
    assert width(paired_delta(**doubled)) < 0.85 * width(once)


def test_the_report_names_the_unit_it_resampled() -> None:
    from moescope.report.build import loss_table, paired_loss_sentences, routing_table, units_sentence

    table, doc_of_block = documents_table(np.random.default_rng(8))
    layer = summarize_layer(table, ["x", "y"], CFG, unit_of_block=doc_of_block)
    loss = {"domains": {"x": layer["load"]["load_cv"], "y": layer["load"]["load_cv"]},
            "token_weighted": layer["load"]["load_cv"], "domain_weighted": layer["load"]["load_cv"]}
    rng = np.random.default_rng(9)
    b = rng.normal(300, 20, 120)
    diff = stats.paired_loss_difference(b + 5, b, np.full(120, 100.0), doc_of_block // 3, 2,
                                        block_unit=doc_of_block, n_resamples=100, n_permutations=100)
    arms = {"moe": {"kind": "moe", "layers": {"1": layer}, "eval_loss": loss,
                    "eval_loss_vs_dense": {"reference": "dense", **diff.to_dict(["x", "y"])}}}
    by_document = {"domains": ["x", "y"], "arms": arms,
                   "statistics": statistics_header(CFG, {"unit": UNIT_DOCUMENT, "n_units": {"x": 3, "y": 3}})}
    by_block = {"domains": ["x", "y"], "arms": arms}  # a metrics file from before the unit was recorded
    assert "shuffling domain labels between source documents" in routing_table(by_document).caption
    assert "shuffling domain labels between blocks" in routing_table(by_block).caption
    assert "bootstrap over source documents" in loss_table(by_document).title
    assert "over the same 120 blocks (6 source documents)" in paired_loss_sentences(by_document)[0]
    assert units_sentence(by_document).endswith("source documents per domain: x 3, y 3.")
    assert "every held-out block as independent" in units_sentence(by_block)


def test_documents_joined_by_near_duplicates_are_one_unit() -> None:
    """The split keeps a near-duplicate group on one side because its documents are not independent; the
    analysis must not count them as independent either: a record's recorded group is its unit."""
    from moescope.data.split import GROUP_FIELD
    from moescope.data.units import record_document

    twin_a = {"text": "x", "id": "a", "document": "enc/a.py", GROUP_FIELD: "enc/a.py"}
    twin_b = {"text": "y", "id": "b", "document": "enc/b.py", GROUP_FIELD: "enc/a.py"}
    alone = {"text": "z", "id": "c", "document": "other.py"}
    assert record_document(twin_a, 1) == record_document(twin_b, 2) == "enc/a.py"
    assert record_document(alone, 3) == "other.py"
