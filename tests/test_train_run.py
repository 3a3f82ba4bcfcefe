"""Whole runs on tiny models: layout, matched compute, evaluation, exact resume, collapse, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.moe.hf_model import load_moe_model
from moescope.moe.model import moe_layers
from moescope.train.config import resolve_arms
from moescope.train.experiment import run_experiment
from moescope.train.metrics_log import read_metrics
from moescope.train.trainer import NonFiniteLoss, Trainer, TrainingInterrupted, train_run
from train_fixtures import make_block_store, one_thread, tiny_experiment  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_block_store(tmp_path / "data")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(path, "train")]


def test_experiment_writes_every_arm_at_matched_compute(data: Path, tmp_path: Path) -> None:
    cfg = tiny_experiment(data, moe__upcycle_noise_rel=0.0, moe__router_noise_std=0.0)
    run = tmp_path / "run"
    summary = run_experiment(cfg, run)
    assert set(summary) == {"base", "dense", "moe", "moe-nolb"}
    for name in ("experiment.json", "environment.json", "data_manifest.json", "summary.json"):
        assert (run / name).is_file()
    env = json.loads((run / "environment.json").read_text())
    assert env["libraries"]["torch"] and env["seeds"]["train.seed"] == 0
    # the MoE arms' forward passes have decided whether the compiled experts kernel serves them
    assert summary["moe"]["native_grouped_kernel"] in {"loaded", "unavailable", "off"}
    assert json.loads((run / "data_manifest.json").read_text()) == json.loads((data / "manifest.json").read_text())
    base_final = load_moe_model(run / "base" / "final")
    assert not moe_layers(base_final)

    rows = {arm: _train_rows(run / "arms" / arm / "metrics.jsonl") for arm in ("dense", "moe", "moe-nolb")}
    for arm, r in rows.items():
        adir = run / "arms" / arm
        assert [x["step"] for x in r] == list(range(1, 7))
        assert [x["tokens_seen"] for x in r] == [64 * s for s in range(1, 7)]  # same tokens
        assert [x["learning_rate"] for x in r] == [x["learning_rate"] for x in rows["dense"]]  # same schedule
        assert sorted(p.name for p in (adir / "snapshots").iterdir()) == ["step_000000", "step_000003", "step_000006"]
        assert (adir / "checkpoints" / "latest").read_text().strip() == "step_000006"
        final = load_moe_model(adir / "final")
        assert bool(moe_layers(final)) == (arm != "dense")
        ev = read_metrics(adir / "metrics.jsonl", "eval")
        assert [e["step"] for e in ev] == [0, 3, 6]
        assert ev[-1]["peak_rss_mb"] > 0 and ev[-1]["tokens_per_s"] > 0
        assert ev[-1]["peak_rss_scope"] == ("stage" if Path("/proc/self/clear_refs").exists() else "process")
        if arm != "dense":
            routing = ev[-1]["routing"]["1"]
            for key in ("token_fraction", "max_fraction", "load_cv", "router_entropy_token",
                        "router_entropy_of_mean", "dropped_fraction", "load_balance_loss", "z_loss"):
                assert key in routing
            assert sum(routing["token_fraction"]) == pytest.approx(1.0, abs=1e-5)
    # Same start, same data: an exactly upcycled top-1 STE model computes the dense model's loss at
    # step 0 and its first step sees the same batch, so the first losses agree across arms.
    ev0 = {a: read_metrics(run / "arms" / a / "metrics.jsonl", "eval")[0]["loss"]["token_weighted"] for a in rows}
    base_last = read_metrics(run / "base" / "metrics.jsonl", "eval")[-1]["loss"]["token_weighted"]
    for a in rows:
        assert ev0[a] == pytest.approx(base_last, abs=1e-5)
        assert rows[a][0]["ce"] == pytest.approx(rows["dense"][0]["ce"], abs=1e-5)
    assert rows["moe"][0]["load_balance_loss"]["1"] > 0 and "load_balance_loss" not in rows["dense"][0]
    assert rows["moe-nolb"][-1]["ce"] != rows["moe"][-1]["ce"]  # the LB coefficient did change something
    # the arms' resolved configs differ exactly by their diffs
    exp = json.loads((run / "experiment.json").read_text())
    assert exp["arms"]["moe-nolb"]["diff"]["loss"]["load_balance_coef"] == 0.0


def test_eval_is_token_and_domain_weighted(tmp_path: Path) -> None:
    data = make_block_store(tmp_path / "data", n_eval={"code": 2, "math": 9, "prose": 5})
    cfg = tiny_experiment(data, train__eval_max_blocks_per_domain=None, train__eval_batch_sequences=4)
    run = resolve_arms(cfg, ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "x", name="moe", write=False)
    ev = trainer.evaluate()
    model = trainer.raw_model.eval()
    ref = {}
    with torch.no_grad():  # reference: transformers' own shifted LM loss, block by block
        for d_id, dom in enumerate(trainer.store.domains):
            x = torch.from_numpy(trainer.store.blocks("eval", dom).astype(np.int64))
            ref[dom] = float(model(input_ids=x, labels=x).loss)
    for dom, loss in ref.items():
        assert ev["domains"][dom]["loss"] == pytest.approx(loss, rel=1e-5)
        assert ev["domains"][dom]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    tokens = {"code": 2 * 15, "math": 9 * 15, "prose": 5 * 15}
    assert {d: v["tokens"] for d, v in ev["domains"].items()} == tokens
    tok = sum(ref[d] * tokens[d] for d in ref) / sum(tokens.values())
    assert ev["loss"]["token_weighted"] == pytest.approx(tok, rel=1e-5)
    assert ev["loss"]["domain_weighted"] == pytest.approx(sum(ref.values()) / 3, rel=1e-5)
    assert ev["routing"]["1"]["n_tokens"] == 16 * 16
    # evaluation does not move the training RNG
    state = torch.get_rng_state()
    trainer.evaluate()
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("bias_balancing", [False, True])
def test_sigterm_then_resume_equals_one_uninterrupted_run_bit_for_bit(data: Path, tmp_path: Path,
                                                                       bias_balancing: bool) -> None:
    over = dict(arms=["moe"], model__dropout=0.1, moe__router_noise_std=0.5, train__checkpoint_every_steps=0,
                train__grad_accum_steps=2, moe__expert_dropout=0.1)
    if bias_balancing:  # the selection bias is model state: it must survive the checkpoint exactly
        over.update(moe__balance_bias=True, loss__bias_update_rate=0.05)
    cfg = tiny_experiment(data, **over)
    straight = tmp_path / "straight"
    run_experiment(cfg, straight)

    interrupted = tmp_path / "interrupted"
    fired = []

    def send_sigterm(step: int, trainer) -> None:
        if trainer.name == "moe" and step == 3 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at step 3; checkpoint saved to .*step_000003"):
        run_experiment(cfg, interrupted, on_step=send_sigterm)
    assert not (interrupted / "arms" / "moe" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    run_experiment(tiny_experiment(data, **over), interrupted, resume=True)

    a = _train_rows(straight / "arms" / "moe" / "metrics.jsonl")
    b = _train_rows(interrupted / "arms" / "moe" / "metrics.jsonl")
    assert len(a) == 6 and a == b  # identical floats: ce, lb, z, grad norm, lr
    ea = [e["loss"] for e in read_metrics(straight / "arms" / "moe" / "metrics.jsonl", "eval")]
    eb = [e["loss"] for e in read_metrics(interrupted / "arms" / "moe" / "metrics.jsonl", "eval")]
    assert ea == eb
    ma, mb = load_moe_model(straight / "arms/moe/final"), load_moe_model(interrupted / "arms/moe/final")
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    if bias_balancing:
        bias = moe_layers(ma)[1].selection_bias
        assert bias.abs().sum() > 0 and torch.all(((bias / 0.05).round() * 0.05 - bias).abs() < 1e-6)  # whole steps
    # a finished experiment resumes as a no-op
    before = _tree(interrupted)
    run_experiment(tiny_experiment(data, **over), interrupted, resume=True)
    assert {k: v for k, v in _tree(interrupted).items() if k != "summary.json"} == \
        {k: v for k, v in before.items() if k != "summary.json"}


def test_collapse_is_detected_recorded_and_can_stop_early(data: Path, tmp_path: Path) -> None:
    cfg = tiny_experiment(data, arms=["moe-nolb"], collapse__threshold_share=0.26, collapse__window_evals=2,
                          collapse__early_stop=True, train__eval_every_steps=2)
    summary = run_experiment(cfg, tmp_path / "run")["moe-nolb"]
    metrics = tmp_path / "run" / "arms" / "moe-nolb" / "metrics.jsonl"
    collapse = read_metrics(metrics, "collapse")
    assert len(collapse) == 1 and collapse[0]["step"] == 4 and collapse[0]["layer"] == 1  # evals 2 and 4
    assert collapse[0]["share"] > 0.26 and summary["stopped_early"] and summary["steps"] == 4
    assert read_metrics(metrics, "eval")[-1]["collapsed_layers"] == [1]
    assert [e["event"] for e in read_metrics(metrics, "event")] == ["early_stop"]


def test_pretrained_base_directory_is_upcycled(data: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(base)
    cfg = tiny_experiment(data, arms=["dense", "moe", "moe-top2"], base__init=str(base), moe__upcycle_noise_rel=0.0,
                          train__steps=2, train__eval_every_steps=2)
    run = tmp_path / "run"
    run_experiment(cfg, run)
    assert not (run / "base").exists()
    ev0 = [read_metrics(run / "arms" / a / "metrics.jsonl", "eval")[0]["loss"]["token_weighted"]
           for a in ("dense", "moe", "moe-top2")]
    assert ev0[0] == pytest.approx(ev0[1], abs=1e-5)
    assert ev0[0] == pytest.approx(ev0[2], abs=1e-5)  # top-2 of identical experts, renormalized: same output
    top2 = load_moe_model(run / "arms" / "moe-top2" / "final")
    assert moe_layers(top2)[1].top_k == 2
    routing = read_metrics(run / "arms" / "moe-top2" / "metrics.jsonl", "eval")[-1]["routing"]["1"]
    assert sum(routing["token_fraction"]) == pytest.approx(1.0, abs=1e-5) and routing["max_fraction"] <= 1.0
    assert json.loads((run / "arms" / "moe" / "config.json").read_text())["init"] == str(base)

    small = tmp_path / "vocab100"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(small)
    with pytest.raises(MoescopeError, match=r"model vocabulary 100 != data vocabulary 96"):
        run_experiment(tiny_experiment(data, base__init=str(small)), tmp_path / "bad")
    short = tmp_path / "ctx8"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=8, n_embd=32, n_layer=2, n_head=2)).save_pretrained(short)
    with pytest.raises(MoescopeError, match=r"block size 16 tokens .* longer than the model's context of 8"):
        run_experiment(tiny_experiment(data, base__init=str(short)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_raise_clear_errors_and_overwrite_nothing(data: Path, tmp_path: Path) -> None:
    with pytest.raises(MoescopeError, match="data directory not found"):
        run_experiment(tiny_experiment(tmp_path / "nope"), tmp_path / "r0")
    with pytest.raises(MoescopeError, match=r"block size 16 tokens is longer than model.context_tokens=8"):
        run_experiment(tiny_experiment(data, model__context_tokens=8), tmp_path / "r0")
    assert not (tmp_path / "r0").exists()

    cfg = tiny_experiment(data, arms=["moe"], train__steps=3)
    run = tmp_path / "run"
    run_experiment(cfg, run)
    before = _tree(run)
    with pytest.raises(MoescopeError, match="already exists.*--resume"):
        run_experiment(cfg, run)
    with pytest.raises(MoescopeError, match=r"another experiment.*optim.learning_rate"):
        run_experiment(tiny_experiment(data, arms=["moe"], train__steps=3, optim__learning_rate=1e-2), run, resume=True)
    other = resolve_arms(tiny_experiment(data, arms=["moe"], train__steps=3, moe__n_experts=2), ["moe"])["moe"]
    with pytest.raises(MoescopeError, match=r"another config.*moe.n_experts"):
        train_run(other, run / "arms" / "moe", resume=True)
    # the data directory changed since the run started
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "note": "rebuilt"}))
    with pytest.raises(MoescopeError, match=r"another experiment: data manifest"):
        run_experiment(cfg, run, resume=True)
    (data / "manifest.json").write_text(json.dumps(manifest))
    # a checkpoint whose config differs from the run's (e.g. copied in from another run)
    arm_dir = run / "arms" / "moe"
    (arm_dir / "summary.json").rename(tmp_path / "summary.json")
    from moescope.train.checkpoint import write_manifest

    ckpt_dir = arm_dir / "checkpoints" / "step_000003"
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    state["config"]["moe"]["top_k"] = 2
    (ckpt_dir / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(ckpt_dir, 3)  # intact, but another run's
    with pytest.raises(MoescopeError, match=r"checkpoint .*step_000003 was written by another config.*moe.top_k"):
        train_run(resolve_arms(cfg, ["moe"])["moe"], arm_dir, resume=True)
    (tmp_path / "summary.json").rename(arm_dir / "summary.json")
    changed = {f"arms/moe/checkpoints/step_000003/{n}" for n in ("trainer_state.json", "manifest.json")}
    assert {k: v for k, v in _tree(run).items() if k not in changed} == \
        {k: v for k, v in before.items() if k not in changed}


def test_non_finite_loss_stops_naming_step_and_last_good_checkpoint(data: Path, tmp_path: Path) -> None:
    cfg = tiny_experiment(data, arms=["moe"], train__checkpoint_every_steps=2)

    def poison(step: int, trainer) -> None:
        if trainer.name == "moe" and step == 3:
            with torch.no_grad():
                trainer.raw_model.transformer.wte.weight[5:, :] = float("nan")

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"NaN/inf at step 4.*last good checkpoint: .*step_000002"):
        run_experiment(cfg, run, on_step=poison)
    ckpts = run / "arms" / "moe" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002" and not (ckpts / "step_000004").exists()
    assert not (run / "arms" / "moe" / "final").exists()
    assert read_metrics(run / "arms" / "moe" / "metrics.jsonl", "event")[-1]["event"] == "nonfinite_stop"


def test_cli_trains_one_arm_and_rejects_unknown_keys(data: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        f'data_dir = "{data}"\narms = ["dense", "moe"]\n[base]\nsteps = 2\n'
        '[model]\nn_layers = 2\nd_model = 32\nn_heads = 2\ncontext_tokens = 32\n'
        '[moe]\nn_experts = 4\nlayers = [1]\n'
        '[train]\nsteps = 2\nbatch_sequences = 4\neval_every_steps = 2\neval_max_blocks_per_domain = 2\n'
        '[tracking]\nprogress_bar = false\n'
    )
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--set", "tracking.tensorboard=true", "--out", str(out)]) == 0
    assert (out / "arms" / "moe" / "final").is_dir() and not (out / "arms" / "dense").exists()
    assert list((out / "arms" / "moe" / "tensorboard").glob("events.out.tfevents.*"))
    assert "moe" in capsys.readouterr().out
    assert main(["train", str(cfg), "--set", "train.eval_evry_steps=3", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.eval_evry_steps'; did you mean 'eval_every_steps'" in err
    assert not (tmp_path / "r2").exists()


def test_single_process_training_goes_through_accelerate(data: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    run = resolve_arms(tiny_experiment(data), ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "x", name="moe", write=False)
    assert isinstance(trainer.accelerator, Accelerator)
    assert trainer.accelerator.num_processes == 1 and trainer.accelerator.device.type == "cpu"
    assert trainer.accelerator.mixed_precision == "no"  # fp32 on CPU
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    before = trainer.raw_model.transformer.h[1].mlp.router.weight.detach().clone()
    out = trainer.train_step()
    out = trainer.train_step()  # step 0 has lr 0 (warmup); step 1 updates
    assert math.isfinite(out["loss"])
    assert not torch.equal(before, trainer.raw_model.transformer.h[1].mlp.router.weight)


@pytest.mark.parametrize("finishing", ["base", "moe"])
def test_sigterm_while_a_stage_finishes_stops_the_experiment_and_resume_equals_one_run(
        data: Path, tmp_path: Path, monkeypatch, finishing: str) -> None:
    """A signal during a stage's final evaluation/checkpoint/finish is not lost: that stage completes,
    no later stage starts, and --resume ends where one uninterrupted run does."""
    from moescope.train.rundir import StageDirectory

    over = dict(arms=["moe", "dense"], train__checkpoint_every_steps=2)
    straight = tmp_path / "straight"
    run_experiment(tiny_experiment(data, **over), straight)

    finish, fired = StageDirectory.finish, []

    def finish_under_sigterm(self, *args, **kwargs):
        if self.name == finishing and not fired:  # a SIGTERM arriving while final/ is written
            fired.append(self.name)
            os.kill(os.getpid(), signal.SIGTERM)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(StageDirectory, "finish", finish_under_sigterm)
    run = tmp_path / "interrupted"
    steps = 4 if finishing == "base" else 6
    with pytest.raises(TrainingInterrupted, match=rf"{finishing}: SIGTERM at step {steps}; .* saved to .*final"):
        run_experiment(tiny_experiment(data, **over), run)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored once, at the end
    stage = run / ("base" if finishing == "base" else "arms/moe")
    assert (stage / "summary.json").is_file()  # the finishing stage completed its finish
    assert read_metrics(stage / "metrics.jsonl", "event")[-1]["event"] == "interrupted"
    assert not (run / "arms" / ("moe" if finishing == "base" else "dense")).exists()  # no later stage began
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(StageDirectory, "finish", finish)
    run_experiment(tiny_experiment(data, **over), run, resume=True)
    for arm in ("moe", "dense"):
        assert _train_rows(run / "arms" / arm / "metrics.jsonl") == _train_rows(straight / "arms" / arm / "metrics.jsonl")
        a, b = load_moe_model(straight / "arms" / arm / "final"), load_moe_model(run / "arms" / arm / "final")
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka


def test_sigterm_between_stages_stops_before_the_next_stage(data: Path, tmp_path: Path, monkeypatch) -> None:
    """A signal after one stage's scope of checks ended and before the next stage began (here: as
    train_run returns) stops the run before the next stage writes anything."""
    import moescope.train.experiment as experiment

    def train_then_sigterm(cfg, out_dir, **kwargs):
        summary = train_run(cfg, out_dir, **kwargs)
        if kwargs["name"] == "moe":
            os.kill(os.getpid(), signal.SIGTERM)
        return summary

    monkeypatch.setattr(experiment, "train_run", train_then_sigterm)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="SIGTERM before stage dense"):
        run_experiment(tiny_experiment(data, arms=["moe", "dense"], train__steps=2, base__steps=2), run)
    assert (run / "arms" / "moe" / "summary.json").is_file() and not (run / "arms" / "dense").exists()


def test_resume_can_add_an_arm_to_a_finished_experiment(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_experiment(tiny_experiment(data, arms=["moe"], train__steps=2, base__steps=2), run)
    moe_before = _tree(run / "arms" / "moe")
    out = run_experiment(tiny_experiment(data, arms=["moe", "dense"], train__steps=2, base__steps=2), run, resume=True)
    assert set(out) == {"base", "moe", "dense"} and _tree(run / "arms" / "moe") == moe_before
    assert set(json.loads((run / "experiment.json").read_text())["arms"]) == {"moe", "dense"}
    assert set(json.loads((run / "summary.json").read_text())) == {"base", "moe", "dense"}


def test_sigint_saves_a_checkpoint_and_stops(data: Path, tmp_path: Path) -> None:
    run = resolve_arms(tiny_experiment(data, train__checkpoint_every_steps=0), ["moe"])["moe"]

    def send_sigint(step: int, trainer) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    trainer = Trainer(run, tmp_path / "arm", name="moe", on_step=send_sigint)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 2"):
        trainer.fit()
    assert (tmp_path / "arm" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored
    assert read_metrics(tmp_path / "arm" / "metrics.jsonl", "event")[-1]["signal"] == "SIGINT"


def _fake_eval(share: float) -> dict:
    return {"routing": {"1": {"max_fraction": share, "argmax_expert": 2}}}


@pytest.mark.parametrize("early_stop", [False, True])
def test_collapse_window_counts_consecutive_evals_warns_and_stops_only_when_asked(
        data: Path, tmp_path: Path, monkeypatch, caplog, early_stop: bool) -> None:
    cfg = tiny_experiment(data, collapse__threshold_share=0.6, collapse__window_evals=2,
                          collapse__early_stop=early_stop)
    trainer = Trainer(resolve_arms(cfg, ["moe"])["moe"], tmp_path / "x", name="moe", write=False)
    shares = iter([0.7, 0.5, 0.7, 0.7, 0.7])  # the 0.5 breaks the streak: collapse at the 4th eval
    monkeypatch.setattr(trainer, "evaluate", lambda: _fake_eval(next(shares)))
    collapsed = []
    with caplog.at_level("WARNING", logger="moescope.train.trainer"):
        for step in range(1, 6):
            trainer.step = step
            collapsed.append(trainer._eval_and_record(None)["collapsed_layers"])
            if step < 4:
                assert trainer._stop_reason is None
    assert collapsed == [[], [], [], [1], [1]]
    assert [(e["step"], e["layer"], e["share"]) for e in trainer.collapse.events] == [(4, 1, 0.7)]  # once
    assert sum("collapsed at step 4" in r.getMessage() for r in caplog.records) == 1
    assert (trainer._stop_reason is not None) == early_stop  # a warning only, unless early_stop


@pytest.mark.parametrize("clip", [1e-3, None])
def test_trainer_clips_the_gradients_the_optimizer_sees_and_logs_the_norm_before(
        data: Path, tmp_path: Path, clip: float | None) -> None:
    cfg = tiny_experiment(data, optim__grad_clip_norm=clip)
    trainer = Trainer(resolve_arms(cfg, ["moe"])["moe"], tmp_path / "x", name="moe", write=False)
    seen = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in trainer.raw_model.parameters() if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    out = trainer.train_step()
    if clip is None:
        assert "grad_norm" not in out and seen[0] > 1e-3
    else:
        assert out["grad_norm"] > 10 * clip  # logged: the norm before clipping
        assert seen[0] == pytest.approx(clip, rel=1e-3)  # the optimizer saw clipped gradients


def test_peak_memory_is_per_stage_not_inherited_from_earlier_stages() -> None:
    import mmap

    from moescope.runtime import peak_memory_mb, reset_peak_memory

    if not reset_peak_memory():
        pytest.skip("no resettable VmHWM here (not Linux /proc)")
    size = 256 * 2**20
    buf = mmap.mmap(-1, size)  # outside the allocator, so freeing it really returns the pages
    buf.write(b"\1" * size)
    buf.close()
    earlier = peak_memory_mb(True)
    assert earlier["peak_rss_scope"] == "stage"
    assert reset_peak_memory()
    later = peak_memory_mb(True)["peak_rss_mb"]
    assert later < earlier["peak_rss_mb"] - 200  # the next stage does not inherit the 256 MiB peak
    assert peak_memory_mb(False)["peak_rss_scope"] == "process"


def test_tensorboard_and_wandb_log_the_metrics_offline(data: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_experiment(data, arms=["moe"], base__steps=2, train__steps=3, tracking__tensorboard=True,
                          tracking__wandb=True)
    run_experiment(cfg, tmp_path / "run")
    arm = tmp_path / "run" / "arms" / "moe"
    evals = read_metrics(arm / "metrics.jsonl", "eval")
    tb = EventAccumulator(str(arm / "tensorboard"))
    tb.Reload()
    logged = [(e.step, e.value) for e in tb.Scalars("eval/loss/domain_weighted")]
    assert logged == [(e["step"], pytest.approx(e["loss"]["domain_weighted"], rel=1e-6)) for e in evals]
    # W&B offline: a local run (nothing sent anywhere) whose record log holds the same scalars
    (run_log,) = (arm / "wandb").glob("offline-run-*/run-*.wandb")
    blob = run_log.read_bytes()
    assert b"eval/loss/domain_weighted" in blob and b"train/ce" in blob and b"eval/routing/1/load_cv" in blob


def test_a_checkpoint_that_fails_mid_write_leaves_the_previous_one_whole(data: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    import moescope.train.checkpoint as ckpt

    run = resolve_arms(tiny_experiment(data), ["moe"])["moe"]
    trainer = Trainer(run, tmp_path / "arm", name="moe")
    for _ in range(3):
        trainer.train_step()
    first = trainer.save_checkpoint()
    good = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    trainer.train_step()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # the model is written, the trainer state fails
    with pytest.raises(MoescopeError, match=r"step 4 could not be written in \S+ \(No space left on device\).*step_000003"):
        trainer.save_checkpoint()
    root = tmp_path / "arm" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]  # no half-written step_000004
    assert ckpt.newest_intact_checkpoint(root)[0] == first and (root / "latest").read_text().strip() == first.name
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == good
    monkeypatch.undo()
    _, state = ckpt.load_checkpoint(first)
    assert state["step"] == 3
    trainer.metrics.close()


@pytest.mark.parametrize("cuda,precision,expected", [(True, "auto", "bf16"), (False, "auto", "no"),
                                                      (True, "fp32", "no"), (False, "bf16", "bf16")])
def test_precision_is_bf16_autocast_on_gpu_and_fp32_on_cpu(data: Path, monkeypatch, cuda: bool, precision: str,
                                                           expected: str) -> None:
    import accelerate

    from moescope.train.accelerator import make_accelerator

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: seen.update(kwargs) or "accelerator")
    run = resolve_arms(tiny_experiment(data, train__precision=precision), ["moe"])["moe"]
    assert make_accelerator(run) == "accelerator"
    assert seen["mixed_precision"] == expected and seen["cpu"] == (not cuda)


def test_hub_id_base_goes_to_transformers_and_fails_clearly_offline(monkeypatch) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.train.model import load_init_model

    from transformers import AutoConfig, AutoModelForCausalLM

    asked = []
    tiny = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name, *a, **k: asked.append(name) or tiny.config)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda name, *a, **k: asked.append(name) or (tiny, {"missing_keys": [], "mismatched_keys": []}))
    assert load_init_model("gpt2") is tiny and asked == ["gpt2", "gpt2"] and tiny.config.use_cache is False
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-moescope-hf-home")  # nothing cached
    with pytest.raises(MoescopeError, match="cannot load pretrained 'gpt2'.*local Hugging Face cache"):
        load_init_model("gpt2")


def test_cli_base_and_data_flags_start_the_arms_from_a_model_directory(data: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(base)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        'data_dir = "/nonexistent"\narms = ["dense", "moe"]\n'
        '[model]\nn_layers = 2\nd_model = 32\nn_heads = 2\ncontext_tokens = 32\n'
        '[moe]\nn_experts = 4\nlayers = [1]\nupcycle_noise_rel = 0.0\n'
        '[train]\nsteps = 2\nbatch_sequences = 4\neval_every_steps = 2\neval_max_blocks_per_domain = 2\n'
        '[tracking]\nprogress_bar = false\n'
    )
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--experiment", "--base", str(base), "--data", str(data), "--out", str(out)]) == 0
    assert not (out / "base").exists()  # no base stage: the arms start from the directory
    ev0 = [read_metrics(out / "arms" / a / "metrics.jsonl", "eval")[0]["loss"]["token_weighted"] for a in ("dense", "moe")]
    assert ev0[0] == pytest.approx(ev0[1], abs=1e-5)  # the exact upcycle of the same pretrained model
    resolved = json.loads((out / "arms" / "moe" / "config.json").read_text())
    assert resolved["config"]["data_dir"] == str(data) and resolved["init"] == str(base)


def test_a_collapse_streak_survives_a_resume(data: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_experiment(data, collapse__threshold_share=0.6, collapse__window_evals=3)
    run = resolve_arms(cfg, ["moe"])["moe"]
    first = Trainer(run, tmp_path / "arm", name="moe")
    monkeypatch.setattr(first, "evaluate", lambda: _fake_eval(0.7))
    for _ in range(2):  # two evals over the threshold, then the run stops
        first.train_step()
        first._eval_and_record(None)
    first.save_checkpoint()
    first.metrics.close()
    resumed = Trainer(run, tmp_path / "arm", name="moe", resume=True)
    assert resumed.step == 2 and resumed.collapse.streak == {"1": 2}
    monkeypatch.setattr(resumed, "evaluate", lambda: _fake_eval(0.7))
    resumed.train_step()
    assert resumed._eval_and_record(None)["collapsed_layers"] == [1]  # the third eval in a row, across the resume
    assert [e["step"] for e in resumed.collapse.events] == [3]
    resumed.metrics.close()
