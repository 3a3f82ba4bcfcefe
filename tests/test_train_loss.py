"""Load-balancing loss over the whole optimizer step, exactly, with gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moescope.moe.layer import load_balancing_loss
from moescope.train.config import resolve_arms
from moescope.train.trainer import Trainer
from train_fixtures import make_block_store, one_thread, tiny_experiment  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _step_grads(data: Path, arm: str = "moe", **over) -> tuple[dict[str, torch.Tensor], dict]:
    """Gradients of the first optimizer step (captured just before the optimizer update)."""
    cfg = tiny_experiment(data, **over)
    run = resolve_arms(cfg, [arm])[arm]
    trainer = Trainer(run, data.parent / "unused", name=arm, write=False)
    grads: dict[str, torch.Tensor] = {}
    finish = trainer._finish_step

    def capture(*args, **kwargs):
        for name, p in trainer.raw_model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
        return finish(*args, **kwargs)

    trainer._finish_step = capture
    out = trainer.train_step()
    return grads, out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol=1e-6, rtol=1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_block_store(tmp_path / "data")


COMMON = dict(moe__router_noise_std=0.0, loss__load_balance_coef=0.5, train__batch_sequences=4)


def test_step_scope_with_accumulation_equals_one_big_batch(data: Path) -> None:
    """f and P over all 4 sequences, whether they come as 1, 2 or 4 micro-batches, by either method."""
    whole, out1 = _step_grads(data, **COMMON, train__grad_accum_steps=1)
    router = [k for k in whole if "router" in k]
    assert router and whole[router[0]].abs().sum() > 0
    for accum in (2, 4):
        for method in ("prepass", "keep_graphs"):
            g, out = _step_grads(data, **COMMON, train__grad_accum_steps=accum, loss__load_balance_accumulation=method)
            _assert_close(whole, g)
            assert out["load_balance_loss"] == pytest.approx(out1["load_balance_loss"], rel=1e-6)


def test_prepass_replays_router_noise_and_dropout(data: Path) -> None:
    """With router noise and dropout the pre-pass must route exactly as the training pass does."""
    noisy = dict(COMMON, moe__router_noise_std=1.0, model__dropout=0.2, train__grad_accum_steps=2)
    a, _ = _step_grads(data, **noisy, loss__load_balance_accumulation="prepass")
    b, _ = _step_grads(data, **noisy, loss__load_balance_accumulation="keep_graphs")
    _assert_close(a, b)


def test_microbatch_scope_differs_and_sequence_scope_matches_it_for_one_sequence_micro_batches(data: Path) -> None:
    step, _ = _step_grads(data, **COMMON, train__grad_accum_steps=4)
    micro, _ = _step_grads(data, **COMMON, train__grad_accum_steps=4, loss__load_balance_scope="microbatch")
    seq, _ = _step_grads(data, **COMMON, train__grad_accum_steps=4, loss__load_balance_scope="sequence")
    router = next(k for k in step if "router" in k)
    # per-micro-batch balance is a different objective from balance over the step
    assert not torch.allclose(step[router], micro[router], atol=1e-6)
    # one sequence per micro-batch: per-sequence balance == per-micro-batch balance
    _assert_close(micro, seq)
    # and without the balance loss the three scopes give the same gradients
    nolb = {k: v for k, v in COMMON.items() if k != "loss__load_balance_coef"}
    a, _ = _step_grads(data, **nolb, loss__load_balance_coef=0.0, train__grad_accum_steps=2)
    b, _ = _step_grads(data, **nolb, loss__load_balance_coef=0.0, train__grad_accum_steps=2, loss__load_balance_scope="sequence")
    _assert_close(a, b)


def test_per_layer_coefficients_are_summed_not_averaged(data: Path) -> None:
    """Two MoE layers at coefficient c: layer 1's router gets c * grad(lb_1), not c / 2 * grad(lb_1)."""
    base = {k: v for k, v in COMMON.items() if k != "loss__load_balance_coef"}
    base.update(moe__layers=[0, 1], loss__z_loss_coef=0.0)
    g0, _ = _step_grads(data, **base, loss__load_balance_coef=0.0)
    g_half, out = _step_grads(data, **base, loss__load_balance_coef=0.5)
    g_only1, _ = _step_grads(data, **base, loss__load_balance_coef=0.0, loss__load_balance_coef_by_layer={"1": 1.0})
    key = next(k for k in g0 if ".h.1." in k and "router" in k)
    unit = g_only1[key] - g0[key]  # grad of lb_1 alone at coefficient 1
    assert unit.abs().max() > 1e-6
    torch.testing.assert_close(g_half[key] - g0[key], 0.5 * unit, atol=1e-7, rtol=1e-3)
    # the logged total is ce + sum over layers of coef * lb
    assert out["loss"] == pytest.approx(out["ce"] + 0.5 * sum(out["load_balance_loss"].values()), rel=1e-6)


def test_logged_step_balance_equals_the_formula_on_the_whole_batch(data: Path) -> None:
    """The logged lb is E * sum f_i P_i over the step's tokens (recomputed from one forward)."""
    cfg = tiny_experiment(data, **COMMON, train__grad_accum_steps=2)
    run = resolve_arms(cfg, ["moe"])["moe"]
    trainer = Trainer(run, data.parent / "unused", name="moe", write=False)
    x = torch.cat([b for b in trainer._micro_batches(0)])
    layer = trainer.layers[1]
    trainer.model.train()
    with torch.no_grad():
        trainer.raw_model(input_ids=x)
    rec = layer.last_record
    expected = float(load_balancing_loss(rec.tokens_per_expert, rec.prob_sum, rec.n_tokens, 1))
    out = trainer.train_step()
    assert out["load_balance_loss"]["1"] == pytest.approx(expected, rel=1e-5)


def test_balance_bias_update_uses_the_whole_steps_counts(data: Path) -> None:
    """Auxiliary-loss-free balancing: after a step, bias = rate * sign(mean - counts over all micro-batches)."""
    cfg = tiny_experiment(data, moe__balance_bias=True, loss__bias_update_rate=0.25, loss__load_balance_coef=0.0,
                          train__grad_accum_steps=2, train__batch_sequences=4)
    run = resolve_arms(cfg, ["moe"])["moe"]
    trainer = Trainer(run, data.parent / "unused", name="moe", write=False)
    seen: dict = {}
    finish = trainer._finish_step

    def capture(result):
        seen.update({i: s.counts.clone() for i, s in result.stats.items()})
        return finish(result)

    trainer._finish_step = capture
    trainer.train_step()
    counts = seen[1].double()
    assert int(counts.sum()) == trainer.tokens_per_step  # both micro-batches, not just the last
    expected = 0.25 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(trainer.layers[1].selection_bias.double(), expected)


def test_sequence_balance_terms_are_the_layer_loss_of_each_sequence() -> None:
    from moescope.train.step_loss import sequence_balance_terms, step_balance_term

    torch.manual_seed(0)
    b, t, e, k = 3, 5, 4, 2
    logits = torch.randn(b * t, e)
    idx = torch.topk(logits, k, dim=-1).indices
    per_seq = sequence_balance_terms(logits, idx, b, t, e, k)
    for s in range(b):
        rows = slice(s * t, (s + 1) * t)
        counts = torch.bincount(idx[rows].reshape(-1), minlength=e)
        ref = load_balancing_loss(counts, torch.softmax(logits[rows], dim=-1).sum(0), t, k)
        assert float(per_seq[s]) == pytest.approx(float(ref), rel=1e-6)
    # the step term: coefficient x layer loss, summed over layers, a zero coefficient left out
    counts = torch.bincount(idx.reshape(-1), minlength=e)
    probs = torch.softmax(logits, dim=-1).sum(0)
    total = step_balance_term({1: probs, 2: probs}, {1: counts, 2: counts}, {1: 0.5, 2: 0.0}, {1: k, 2: k},
                              world=1, n_step=b * t)
    assert float(total) == pytest.approx(0.5 * float(load_balancing_loss(counts, probs, b * t, k)), rel=1e-6)
