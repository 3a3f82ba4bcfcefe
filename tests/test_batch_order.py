"""Which held-out blocks share a forward pass (data/batch_order.py), in analysis capture and the trainer's
evaluation: the mixed order is a deterministic permutation whose batches hold every domain, results come
back in the blocks' stored order, and expert choice measures domain specialization only in mixed batches."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_fixtures import make_block_store, one_thread  # noqa: F401
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.analysis import capture
from moescope.analysis.summary import SummaryConfig, summarize_layer
from moescope.data.batch_order import forward_order, mixed_order, resolve_batch_order, routes_by_batch
from moescope.data.blocks import BlockStore
from moescope.errors import MoescopeError
from moescope.moe.config import MoEConfig
from moescope.moe.install import install_moe
from moescope.moe.model import moe_layers
from moescope.train.config import TrainConfig
from moescope.train.evaluator import eval_batches, evaluate_model

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = SummaryConfig(n_resamples=50, n_permutations=19, vocab_min_count=5)


def domains_of(counts) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


@pytest.mark.parametrize("counts", [(5, 5, 5), (7, 3, 12), (1, 9), (4,), (0, 6, 2)])
def test_mixed_order_is_a_permutation_keeping_each_domains_stored_order(counts) -> None:
    dom = domains_of(counts)
    order = mixed_order(dom)
    assert sorted(order.tolist()) == list(range(dom.size))  # no block lost or repeated
    for d in range(len(counts)):
        mine = order[dom[order] == d]
        assert mine.tolist() == np.flatnonzero(dom == d).tolist()  # stored order within a domain
    np.testing.assert_array_equal(order, mixed_order(dom.copy()))  # deterministic
    assert forward_order(dom, "by_domain").tolist() == list(range(dom.size))


def test_mixed_batches_hold_every_domain_in_proportion() -> None:
    # equal counts: plain round-robin, every batch of >= D blocks holds every domain
    dom = domains_of((6, 6, 6))
    assert dom[mixed_order(dom)].tolist() == [0, 1, 2] * 6
    # unequal counts: each domain spread over the whole order; a batch at least as long as the largest gap
    # between two blocks of the rarest domain (B / n_min + D) holds every domain
    dom = domains_of((40, 10, 20))
    seq = dom[mixed_order(dom)]
    batch = 70 // 10 + 3
    for s in range(0, seq.size - batch + 1, batch):
        assert set(seq[s : s + batch].tolist()) == {0, 1, 2}
    # in proportion: the first half of the order holds half of every domain
    assert np.bincount(seq[:35], minlength=3).tolist() == [20, 5, 10]
    # the by-domain order (what analyze did before) has single-domain batches
    assert all(len(set(dom[s : s + 8].tolist())) == 1 for s in (0, 8, 16, 24))


def test_auto_is_mixed_exactly_for_batch_dependent_routing() -> None:
    ec, tc = SimpleNamespace(routing="expert_choice"), SimpleNamespace(routing="token_choice")
    assert routes_by_batch([tc, ec]) and not routes_by_batch([tc]) and not routes_by_batch([])
    assert resolve_batch_order("auto", True) == "mixed"
    assert resolve_batch_order("auto", False) == "by_domain"
    assert resolve_batch_order("by_domain", True) == "by_domain"
    assert resolve_batch_order("mixed", False) == "mixed"
    with pytest.raises(MoescopeError, match="batch_order"):
        resolve_batch_order("random", False)


# --------------------------------------------------------------------------- capture


def domain_routed_ec_model(vocab: int, band: int, n_domains: int) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 whose expert-choice layer has one expert per domain and a router that scores a token
    for expert d exactly when it comes from domain d's band of the vocabulary: attention and positions add
    nothing (zeroed), so the MoE input is the token's embedding, which carries its domain as a one-hot."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=vocab))
    install_moe(model, MoEConfig(n_experts=n_domains, top_k=1, layers=[0], routing="expert_choice",
                                 capacity_factor=1.0))
    with torch.no_grad():
        block = model.transformer.h[0]
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        wte = model.transformer.wte.weight
        wte.mul_(0.01)
        for d in range(n_domains):
            wte[d * band : (d + 1) * band, d] += 1.0
        layer = moe_layers(model)[0]
        layer.router.weight.zero_()
        layer.router.weight[:, :n_domains] = 20.0 * torch.eye(n_domains)
    return model.eval()


def test_expert_choice_shows_domain_routing_only_in_mixed_batches(tmp_path: Path) -> None:
    """Each expert takes capacity = tokens / E of its batch. In one-domain batches every expert must take the
    same number of every domain's tokens, so NMI is 0 whatever the router does; in mixed batches (equal
    domains, round-robin) expert d takes domain d's tokens, so NMI is high."""
    store = BlockStore.open(make_block_store(tmp_path, vocab=97, block=16, n_eval=6))
    model = domain_routed_ec_model(97, 32, 3)
    by_domain = capture.capture_routing(model, store, batch_blocks=3, progress=False, batch_order="by_domain")
    mixed = capture.capture_routing(model, store, batch_blocks=3, progress=False, batch_order="mixed")
    spec_by_domain = summarize_layer(by_domain.tables[0], store.domains, CFG)["specialization"]
    spec_mixed = summarize_layer(mixed.tables[0], store.domains, CFG)["specialization"]
    assert spec_by_domain["nmi"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(spec_by_domain["expert_given_domain"], 1 / 3, rtol=0, atol=1e-6)
    # every band token of domain d is taken by expert d and by no other (each block's EOS, token 96, is in no
    # band: the experts fill their last places with EOS tokens of any domain)
    table = mixed.tables[0]
    band = table.token_id != 96
    np.testing.assert_array_equal(table.expert_mask[band], np.eye(3, dtype=bool)[table.domain[band]])
    assert spec_mixed["nmi"]["estimate"] > 0.7 and spec_mixed["nmi"]["low"] > 0.5
    assert mixed.batch_order == "mixed" and by_domain.batch_order == "by_domain"
    # the blocks keep their identities and stored order: per-block statistics pair across orders
    np.testing.assert_array_equal(mixed.block_rows, by_domain.block_rows)
    np.testing.assert_array_equal(mixed.block_domain, by_domain.block_domain)
    for name in ("token_id", "block", "position", "domain"):
        np.testing.assert_array_equal(getattr(mixed.tables[0], name), getattr(by_domain.tables[0], name))


def test_mixed_capture_of_token_choice_equals_by_domain_in_stored_order(tmp_path: Path) -> None:
    """Token choice routes each token alone: forwarding in mixed batches and putting the results back must give
    the by-domain capture's routing and per-block losses (a wrong un-permutation would misalign them)."""
    store = BlockStore.open(make_block_store(tmp_path, vocab=97, block=16, n_eval={"code": 5, "math": 3,
                                                                                    "prose": 4}))
    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=97))
    install_moe(model, MoEConfig(n_experts=4, top_k=2, layers=[0, 1]))
    for layer in moe_layers(model).values():
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    model.eval()
    a = capture.capture_routing(model, store, batch_blocks=4, progress=False, batch_order="by_domain")
    b = capture.capture_routing(model, store, batch_blocks=4, progress=False, batch_order="mixed")
    np.testing.assert_array_equal(a.block_rows, b.block_rows)
    np.testing.assert_allclose(b.block_loss_sum, a.block_loss_sum, rtol=1e-5)
    assert len(set(np.round(a.block_loss_sum, 3))) == a.block_loss_sum.size  # distinct: a swap would show
    for i in a.tables:
        np.testing.assert_array_equal(b.tables[i].token_id, a.tables[i].token_id)
        np.testing.assert_array_equal(b.tables[i].expert_index, a.tables[i].expert_index)
        np.testing.assert_allclose(b.tables[i].router_probs.astype(np.float32),
                                   a.tables[i].router_probs.astype(np.float32), atol=2e-3)


# --------------------------------------------------------------------------- the trainer's evaluation

CPU = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)


def reference_evaluation(model, store: BlockStore, t: TrainConfig) -> dict:
    """The trainer's evaluation as it was before batch orders: domain by domain, summed loss per batch."""
    out = {}
    for d, domain in enumerate(store.domains):
        n = store.n_blocks("eval", domain)
        rows = np.unique(np.linspace(0, n - 1, min(n, t.eval_max_blocks_per_domain)).round().astype(np.int64))
        loss, n_tok = 0.0, 0
        for s in range(0, rows.size, t.eval_batch_sequences):
            part = rows[s : s + t.eval_batch_sequences]
            x = torch.from_numpy(store.gather("eval", np.stack([np.full(part.size, d), part], 1)))
            with torch.no_grad():
                logits = model(input_ids=x).logits
            loss += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            n_tok += x[:, 1:].numel()
        out[domain] = loss / n_tok
    return out


def test_trainer_evaluation_by_domain_is_the_old_evaluation_bit_for_bit_and_mixed_agrees(tmp_path: Path) -> None:
    store = BlockStore.open(make_block_store(tmp_path, vocab=97, block=16, n_eval={"code": 7, "math": 3,
                                                                                    "prose": 5}))
    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=97))
    install_moe(model, MoEConfig(n_experts=4, top_k=1, layers=[1]))
    layers = moe_layers(model)
    t = TrainConfig(eval_max_blocks_per_domain=6, eval_batch_sequences=4)
    ref = reference_evaluation(model.eval(), store, t)
    auto = evaluate_model(model, layers, store, t, CPU)  # token choice: "auto" keeps the domain-by-domain order
    assert auto["batch_order"] == "by_domain"
    assert {d: v["loss"] for d, v in auto["domains"].items()} == ref  # exact equality
    mixed = evaluate_model(model, layers, store, TrainConfig(eval_max_blocks_per_domain=6, eval_batch_sequences=4,
                                                             eval_batch_order="mixed"), CPU)
    assert mixed["batch_order"] == "mixed"
    for d in store.domains:
        assert mixed["domains"][d]["loss"] == pytest.approx(ref[d], rel=1e-5)
        assert mixed["domains"][d]["tokens"] == auto["domains"][d]["tokens"]
    assert mixed["routing"]["1"]["max_fraction"] == pytest.approx(auto["routing"]["1"]["max_fraction"], abs=1e-9)


def test_trainer_eval_batches_mix_the_same_blocks(tmp_path: Path) -> None:
    store = BlockStore.open(make_block_store(tmp_path, n_eval=8))
    t = TrainConfig(eval_max_blocks_per_domain=6, eval_batch_sequences=6)
    by_domain, mixed = eval_batches(store, t, "by_domain"), eval_batches(store, t, "mixed")
    assert all(len(set(b[:, 0].tolist())) == 1 for b in by_domain)
    assert all(set(b[:, 0].tolist()) == {0, 1, 2} for b in mixed)
    key = lambda batches: sorted(map(tuple, np.concatenate(batches).tolist()))  # noqa: E731
    assert key(mixed) == key(by_domain) and len(key(mixed)) == 18


def test_trainer_evaluation_of_expert_choice_uses_mixed_batches(tmp_path: Path) -> None:
    store = BlockStore.open(make_block_store(tmp_path, vocab=97, block=16, n_eval=6))
    model = domain_routed_ec_model(97, 32, 3)
    t = TrainConfig(eval_max_blocks_per_domain=6, eval_batch_sequences=3)
    ev = evaluate_model(model, moe_layers(model), store, t, CPU)
    assert ev["batch_order"] == "mixed"
    forced = evaluate_model(model, moe_layers(model), store, TrainConfig(
        eval_max_blocks_per_domain=6, eval_batch_sequences=3, eval_batch_order="by_domain"), CPU)
    assert forced["batch_order"] == "by_domain"
    assert ev["loss"]["token_weighted"] != forced["loss"]["token_weighted"]  # expert choice sees the batch
