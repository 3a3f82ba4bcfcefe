"""Fine-tuning sentence encoders (dense or MoE) with sentence-transformers' trainer and losses.

The losses are sentence-transformers' own (MultipleNegativesRankingLoss, TripletLoss,
ContrastiveLoss, CosineSimilarityLoss); `MoEAuxLoss` wraps one of them and adds the MoE
layers' load-balancing and router z losses. The trainer sums the returned terms and logs
each (its loss-components feature), so the objective is task + lb + z with nothing
rewritten by hand. Negatives for the triplet / contrastive / cosine losses come from
sentence-transformers' `mine_hard_negatives`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moescope.embed.pairs import TextPair
from moescope.errors import MoescopeError
from moescope.io.config import bounded, check_fields
from moescope.moe.model import moe_layers, router_parameters, set_training_progress
from moescope.moe.layer import MoELayer, RoutingRecord
from moescope.moe.routing_sums import RoutingSums
from moescope.train.config import MAX_BATCH_SEQUENCES, MAX_SEED, MAX_STEPS

logger = logging.getLogger(__name__)

LossName = Literal["mnrl", "triplet", "contrastive", "cosine"]
LOSS_NAMES = ("mnrl", "triplet", "contrastive", "cosine")


@dataclass
class EmbedTrainConfig:
    """One fine-tuning run; the same config for every arm of a comparison (matched steps)."""

    loss: LossName = "mnrl"
    steps: int = bounded(60, low=1, high=MAX_STEPS)  # optimizer steps
    # (anchor, positive[, negative]) rows per step; in-batch negatives need two
    batch_size_pairs: int = bounded(16, low=2, high=MAX_BATCH_SEQUENCES)
    learning_rate: float = bounded(5e-5, low=0.0, low_open=True)
    router_learning_rate_mult: float = bounded(1.0, low=0.0)  # router learning rate = learning_rate x this
    warmup_fraction: float = bounded(0.1, low=0.0, high=1.0, high_open=True)
    weight_decay: float = bounded(0.01, low=0.0)
    # Per MoE layer, on the counts and router probabilities of the whole step (every text
    # of every forward pass the loss makes), summed over layers.
    load_balance_coef: float = bounded(0.01, low=0.0)
    z_loss_coef: float = bounded(0.001, low=0.0)
    seed: int = bounded(0, low=0, high=MAX_SEED)
    logging_steps: int = bounded(10, low=1)
    # Freeze the token embeddings and encoder layers below this index (None = train all).
    # On a CPU, training only the top layers (where the MoE layers sit) cuts a step's
    # backward pass and optimizer state by more than half; every arm freezes the same.
    freeze_below_layer: int | None = bounded(None, low=0)
    # Hard-negative mining (triplet / contrastive / cosine): skip the `negatives_range_min`
    # nearest candidates, which are often unlabeled positives.
    negatives_range_min: int = bounded(3, low=0)
    triplet_margin: float = bounded(0.3, low=0.0)  # in cosine distance: embeddings are L2-normalized
    contrastive_margin: float = bounded(0.5, low=0.0)
    # Validate every N steps (and after the last) with a sentence-transformers evaluator on
    # validation pairs; the best validated weights become the final model. None = off.
    eval_every_steps: int | None = bounded(None, low=1)

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise MoescopeError(f"embed train loss must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        check_fields(self, "train")


# --------------------------------------------------------------------------- aux losses


class MoEAuxLoss(nn.Module):
    """A sentence-transformers loss plus the MoE layers' auxiliary losses.

    Returns {"task": ..., "load_balance_loss": coef x sum over layers, "z_loss": coef x sum}
    (sentence-transformers' trainer adds the terms and logs each). Routing records are
    collected with forward hooks while the wrapped loss runs, so a loss that encodes
    anchors, positives and negatives in separate passes contributes all of them.
    For a dense model it returns the task loss alone.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, *, load_balance_coef: float, z_loss_coef: float) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef
        self._layers: dict[int, MoELayer] = moe_layers(model)
        self._records: dict[int, list[RoutingRecord]] | None = None
        self.last_counts: dict[int, torch.Tensor] = {}
        self.last_raw: dict[str, float] = {}
        self._hooks = [layer.register_forward_hook(self._make_hook(i)) for i, layer in self._layers.items()]

    def remove_hooks(self) -> None:
        """Detach from the MoE layers (the model outlives one training run)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _make_hook(self, i: int):
        def hook(module: MoELayer, inputs, output) -> None:
            if self._records is not None:
                self._records[i].append(module.last_record)

        return hook

    def forward(self, sentence_features, labels):
        if not self._layers:
            return self.loss(sentence_features, labels)
        self._records = {i: [] for i in self._layers}
        try:
            task = self.loss(sentence_features, labels)
            records, self._records = self._records, None
        finally:
            self._records = None
        lb_total, z_total = 0.0, 0.0
        for i, layer in self._layers.items():
            if not records[i]:
                continue
            # counts and probability sums of every forward pass first, then the loss: the balance is
            # asked of the whole step, not of each text or pass; differentiable, to train the routers
            sums = RoutingSums(layer.n_experts, layer.top_k, detach=False)
            for rec in records[i]:
                sums.add(rec)
            lb_total = lb_total + sums.load_balance_loss()
            z_total = z_total + sums.z_loss()
            self.last_counts[i] = sums.counts.detach().cpu()
        if isinstance(task, dict):  # a loss that already reports components
            out = dict(task)
        else:
            out = {"task": task}
        zero = torch.zeros((), device=next(iter(out.values())).device)
        lb_total = lb_total if isinstance(lb_total, torch.Tensor) else zero
        z_total = z_total if isinstance(z_total, torch.Tensor) else zero
        self.last_raw = {"load_balance_loss": float(lb_total.detach()), "z_loss": float(z_total.detach())}
        out["load_balance_loss"] = self.load_balance_coef * lb_total
        out["z_loss"] = self.z_loss_coef * z_total
        return out


def make_loss(name: LossName, model: nn.Module, cfg: EmbedTrainConfig) -> nn.Module:
    """sentence-transformers' loss for `name`, configured for L2-normalized embeddings."""
    from sentence_transformers import losses

    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    if name == "triplet":
        return losses.TripletLoss(
            model, distance_metric=losses.TripletDistanceMetric.COSINE, triplet_margin=cfg.triplet_margin
        )
    if name == "contrastive":
        return losses.ContrastiveLoss(model, margin=cfg.contrastive_margin)
    if name == "cosine":
        return losses.CosineSimilarityLoss(model)
    raise MoescopeError(f"unknown loss {name!r} (choose from {', '.join(LOSS_NAMES)})")


# --------------------------------------------------------------------------- datasets


def pairs_dataset(pairs: Sequence[TextPair]):
    """(anchor, positive) columns: the format of MultipleNegativesRankingLoss."""
    from datasets import Dataset

    if not pairs:
        raise MoescopeError("no training pairs")
    return Dataset.from_dict({"anchor": [p.anchor for p in pairs], "positive": [p.positive for p in pairs]})


def build_loss_dataset(pairs: Sequence[TextPair], loss: LossName, miner, cfg: EmbedTrainConfig):
    """The training dataset in the format `loss` expects.

    mnrl: (anchor, positive). triplet: (anchor, positive, negative). contrastive: (anchor,
    text, label 0/1). cosine: (anchor, text, float label). Negatives are mined with
    `miner` (a SentenceTransformer; pass the same untouched base model for every arm so all
    arms train on identical rows).
    """
    ds = pairs_dataset(pairs)
    if loss == "mnrl":
        return ds
    from sentence_transformers.util import mine_hard_negatives

    fmt = "triplet" if loss == "triplet" else "labeled-pair"
    mined = mine_hard_negatives(
        ds, miner, anchor_column_name="anchor", positive_column_name="positive",
        range_min=cfg.negatives_range_min, num_negatives=1, sampling_strategy="top",
        output_format=fmt, batch_size=32, verbose=False,
    )
    if loss == "cosine":
        mined = mined.cast_column("label", _float_feature())
    return mined


def _float_feature():
    from datasets import Value

    return Value("float32")


# --------------------------------------------------------------------------- trainer


def _progress_callback():
    from transformers import TrainerCallback

    class MoEProgressCallback(TrainerCallback):
        """Tells the MoE layers how far training is (router-noise annealing) before each step,
        and keeps per-step routing loads for the run's metrics."""

        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []
            self.aux: MoEAuxLoss | None = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and state.max_steps:
                set_training_progress(model, state.global_step / state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if self.aux is not None and self.aux.last_counts:
                row: dict[str, Any] = {"step": state.global_step, **self.aux.last_raw}
                for i, counts in self.aux.last_counts.items():
                    frac = counts.double() / counts.sum().clamp(min=1)
                    row[f"max_fraction_layer{i}"] = float(frac.max())
                    row[f"load_cv_layer{i}"] = float(frac.std(unbiased=False) / frac.mean())
                self.history.append(row)

    return MoEProgressCallback()


def _best_checkpoint_callback(evaluator, every: int):
    from transformers import TrainerCallback

    class BestCheckpoint(TrainerCallback):
        """Evaluates every `every` steps and after the last step, and keeps a copy of the
        weights with the best value of the evaluator's primary metric (in memory: the
        encoders are small, and nothing half-written can be picked up later)."""

        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []
            self.best_state: dict[str, torch.Tensor] | None = None
            self.best: dict[str, Any] | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps:
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            key = f"eval_{evaluator.primary_metric}"
            if not metrics or key not in metrics or model is None:
                return
            value = float(metrics[key])
            self.history.append({"step": state.global_step, "value": value})
            better = self.best is None or (value > self.best["value"] if evaluator.greater_is_better
                                           else value < self.best["value"])
            if better and math.isfinite(value):
                self.best = {"step": state.global_step, "value": value}
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return BestCheckpoint()


@dataclass
class TrainResult:
    """What a run leaves besides the trained model."""

    log_history: list[dict[str, Any]] = field(default_factory=list)
    routing_history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    n_train_rows: int = 0
    # with validation: {"metric", "history": [{"step", "value"}], "best_step", "best_value", "last_step"}
    validation: dict[str, Any] | None = None


def train_encoder(
    model,
    train_dataset,
    cfg: EmbedTrainConfig,
    *,
    output_dir: str | Path | None = None,
    show_progress_bar: bool = True,
    evaluator=None,
) -> TrainResult:
    """Fine-tune `model` (in place) with SentenceTransformerTrainer for exactly `cfg.steps` steps.

    With `cfg.eval_every_steps` and a sentence-transformers `evaluator` (see
    `validation_evaluator`), the evaluator runs every N steps and after the last; the weights
    of the best evaluation are loaded back into `model` at the end (the final model).
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    torch.manual_seed(cfg.seed)
    if cfg.freeze_below_layer is not None:
        freeze_lower_layers(model, cfg.freeze_below_layer)
    base_loss = make_loss(cfg.loss, model, cfg)
    loss = MoEAuxLoss(model, base_loss, load_balance_coef=cfg.load_balance_coef, z_loss_coef=cfg.z_loss_coef)
    callback = _progress_callback()
    callback.aux = loss if moe_layers(model) else None
    validate = bool(cfg.eval_every_steps) and evaluator is not None
    if bool(cfg.eval_every_steps) != (evaluator is not None):
        raise MoescopeError("train.eval_every_steps and a validation evaluator go together (one is missing)")
    callbacks = [callback]
    best = _best_checkpoint_callback(evaluator, cfg.eval_every_steps) if validate else None
    if best is not None:
        callbacks.append(best)

    with tempfile.TemporaryDirectory(prefix="moescope-embed-") as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(output_dir or tmp),
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch_size_pairs,
            learning_rate=cfg.learning_rate,
            warmup_steps=math.ceil(cfg.warmup_fraction * cfg.steps),
            weight_decay=cfg.weight_decay,
            lr_scheduler_type="linear",
            seed=cfg.seed,
            data_seed=cfg.seed,
            logging_steps=cfg.logging_steps,
            save_strategy="no",
            eval_strategy="steps" if validate else "no",
            eval_steps=cfg.eval_every_steps if validate else None,
            report_to="none",
            use_cpu=True,
            dataloader_drop_last=True,
            disable_tqdm=not show_progress_bar,
            batch_sampler=BatchSamplers.NO_DUPLICATES if cfg.loss == "mnrl" else BatchSamplers.BATCH_SAMPLER,
        )
        optimizers = (_optimizer(model, cfg), None) if cfg.router_learning_rate_mult != 1.0 and moe_layers(model) else (None, None)
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train_dataset, loss=loss, callbacks=callbacks, optimizers=optimizers,
            evaluator=evaluator if validate else None,
        )
        try:
            out = trainer.train()
        finally:
            loss.remove_hooks()
    validation = None
    if best is not None:
        if best.best_state is None:
            raise MoescopeError(f"validation gave no finite {evaluator.primary_metric} in {cfg.steps} steps")
        model.load_state_dict(best.best_state, strict=True)
        validation = {"metric": evaluator.primary_metric, "history": best.history, "best_step": best.best["step"],
                      "best_value": best.best["value"], "last_step": int(trainer.state.global_step)}
    model.eval()
    set_training_progress(model, 1.0)
    return TrainResult(
        log_history=list(trainer.state.log_history),
        routing_history=callback.history,
        train_seconds=float(out.metrics.get("train_runtime", float("nan"))),
        n_train_rows=len(train_dataset),
        validation=validation,
    )


def validation_evaluator(pairs: Sequence[TextPair], *, batch_size: int = 64):
    """sentence-transformers' InformationRetrievalEvaluator over validation pairs pooled across
    domains (queries compete against every domain's positives); primary metric nDCG@10."""
    from dataclasses import replace

    from moescope.embed.evaluate import EvalConfig, build_ir_tasks, make_ir_evaluator

    if not pairs:
        raise MoescopeError("no validation pairs")
    task = build_ir_tasks([replace(p, domain="validation") for p in pairs])["validation"]
    return make_ir_evaluator(task, EvalConfig(batch_size=batch_size))


def freeze_lower_layers(model: nn.Module, below: int) -> int:
    """Stop gradients to the embeddings and encoder layers < `below`; returns #frozen parameters."""
    bert = model[0].auto_model
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if layers is None:
        raise MoescopeError(f"cannot freeze layers of {type(bert).__name__}: no encoder.layer list")
    if not 0 <= below <= len(layers):
        raise MoescopeError(f"train.freeze_below_layer must be in 0..{len(layers)}, got {below}")
    frozen = 0
    for module in [bert.embeddings, *list(layers)[:below]]:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def _optimizer(model: nn.Module, cfg: EmbedTrainConfig) -> torch.optim.Optimizer:
    """AdamW with the routers at learning_rate x router_learning_rate_mult; no decay on biases/LayerNorms."""
    routers = {id(p) for p in router_parameters(model)}
    decay, no_decay, router = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in routers:
            router.append(p)
        elif p.ndim < 2 or "LayerNorm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.learning_rate},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.learning_rate},
        {"params": router, "weight_decay": 0.0, "lr": cfg.learning_rate * cfg.router_learning_rate_mult},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)
