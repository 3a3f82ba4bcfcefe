"""`moescope analyze --model ID_OR_DIR`: the routing analysis of a released MoE model (orchestration).

Steps, each refusing bad input before anything is written under OUT:
the model's config and MoE layers on an empty copy (adapter found from its router
classes, memory estimate), its tokenizer, the held-out texts re-tokenized into
blocks of ``context`` tokens, then the weights; one forward pass per batch streams
every MoE layer's top-k, gate weights and router entropy to disk; each layer is
then summarized alone (the same statistics as for moescope's own runs) and the
report is built. Everything is written into a staging directory inside OUT and
moved into place at the end::

    OUT/experiment.json                   what was analysed (model, texts, config)
    OUT/analysis/metrics.json             pipeline.py's schema; arms.NAME.model says which model
    OUT/analysis/viewer.json              per-token routing of sample blocks
    OUT/analysis/routing/NAME/LAYER.npz   RoutingTable per MoE layer (top-k + entropy, no router_probs)
    OUT/report/report.html                the report (moescope.report.build)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moescope.analysis import capture, tokentypes
from moescope.analysis.pipeline import headline
from moescope.analysis.summary import (
    SummaryConfig,
    best_layer_nmi_test,
    label_expert_tokens,
    statistics_header,
    summarize_eval_loss,
    summarize_layer,
)
from moescope.analysis.viewer import choose_sample_rows, viewer_arm
from moescope.data.units import BlockUnits
from moescope.errors import MoescopeError, first_line, is_out_of_memory
from moescope.hf import loading, texts
from moescope.hf.adapters import find_sites
from moescope.hf.recorder import RoutingRecorder
from moescope.io.atomic import atomic_write_json, remove_stale_temporaries, temporary_prefix
from moescope.io.config import bounded, check_fields
from moescope.io.jsonfile import json_ready
from moescope.io.names import PATH_NAME_RULE, is_path_name
from moescope.io.provenance import environment_info
from moescope.report.build import build_report

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_RESULTS = ("analysis", "report", "experiment.json")  # what OUT holds, each replaced whole
DEFAULT_CONTEXT = 512
# Tokens per viewer sample: k experts and weights per token and layer make a 512-token
# block of an 80-layer model several MB; the first 256 tokens of each sample are shown.
VIEWER_MAX_TOKENS = 256


@dataclass
class ReleasedConfig:
    """What `moescope analyze --model` captures and how."""

    context_tokens: int | None = bounded(None, low=2, high=2**20)  # tokens per block; None = min(512, the model's context)
    max_blocks_per_domain: int | None = bounded(None, low=1)  # blocks per domain to analyse (None = all the texts give)
    batch_blocks: int = bounded(4, low=1, high=2**20)  # blocks per forward pass
    viewer_samples_per_domain: int = bounded(3, low=0, high=1000)  # blocks per domain shown in the token viewer
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 ("auto" = the checkpoint's dtype)
    device: str = "auto"  # auto | cpu | cuda (cuda: device_map="auto" over all visible GPUs)
    # hub branch, tag or commit of the model (e.g. one of OLMoE's pretraining checkpoints); hub ids only
    revision: str | None = None
    statistics: SummaryConfig = field(default_factory=SummaryConfig)

    def __post_init__(self) -> None:
        check_fields(self, "analysis")


def _model_info(adapter, sites, config, source: str, dtype: str, device: str, context: int) -> dict:
    return {
        "source": source,
        "architecture": (getattr(config, "architectures", None) or [None])[0],
        "model_type": getattr(config, "model_type", None),
        "adapter": adapter.name,
        "selection": adapter.selection,
        "router_scores": adapter.scores,
        "n_layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        "moe_layers": [s.layer for s in sites],
        "n_experts": sites[0].n_experts,
        "top_k": sites[0].top_k,
        "n_shared_experts": sites[0].n_shared_experts,
        "dtype": dtype,
        "device": device,
        "context_tokens": context,
    }


def _prepare_moescope(source: str, data_dir, cfg: ReleasedConfig):
    """A model trained by moescope (moe_config.json): its own loader; tokenizer beside it or the data dir's."""
    from moescope.data.blocks import tokenizer_dir
    from moescope.io.saved_model import load_saved_model

    device = loading.resolve_device(cfg.device)
    model = load_saved_model(source, device=device)
    tok_src = source if (Path(source) / "tokenizer_config.json").is_file() else (
        str(tokenizer_dir(data_dir)) if data_dir is not None else None)
    if tok_src is None:
        raise MoescopeError(f"{source}: no tokenizer beside the model; pass --data DIR of the data it was trained on")
    return model, loading.load_tokenizer(tok_src), model.config, loading.model_context(model.config), device


def analyze_released(
    model: str,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    texts_file: str | Path | None = None,
    name: str | None = None,
    cfg: ReleasedConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Analyse a released MoE causal LM on held-out texts; writes OUT/ and returns metrics.json's content."""
    cfg = cfg or ReleasedConfig()
    out = Path(out)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would break the one-line contract on errors
    if (data_dir is None) == (texts_file is None):
        raise MoescopeError("pass exactly one of --data DIR and --texts FILE.jsonl")
    source = str(model)
    given = name
    name = name or Path(source.rstrip("/")).name or "model"
    if not is_path_name(name):
        what = f"--name {name!r}" if given else f"the name {name!r} taken from {source} (pass --name)"
        raise MoescopeError(f"{what}: use {PATH_NAME_RULE}")
    check_out_dir(out)

    # ---- everything that can refuse, before a byte is written or a weight is read
    if cfg.revision is not None and Path(source).exists():
        raise MoescopeError(f"--revision {cfg.revision!r} names a hub revision; {source} is a local path "
                            "(check out the revision there instead)")
    held_out = texts.read_data_dir_texts(data_dir) if data_dir is not None else texts.read_texts_file(texts_file)
    if loading.is_moescope_dir(source):
        net, tokenizer, config, max_context, device = _prepare_moescope(source, data_dir, cfg)
        adapter, sites = _sites(net, source)
        dtype_name = str(next(net.parameters()).dtype).removeprefix("torch.")
        plan = None
    else:
        plan = loading.plan_model(source, cfg.dtype, cfg.device, cfg.revision)
        config, max_context, device = plan.config, plan.context, plan.device
        tokenizer = loading.load_tokenizer(source, cfg.revision)
        dtype_name = str(plan.dtype).removeprefix("torch.")
    context = cfg.context_tokens or min(DEFAULT_CONTEXT, max_context or DEFAULT_CONTEXT)
    if max_context is not None and context > max_context:
        raise MoescopeError(f"--context {context} is larger than the model's context ({max_context} tokens)")
    blocks = texts.pack_texts(held_out.texts, tokenizer, context, cfg.max_blocks_per_domain,
                              unit_keys=held_out.unit_keys, unit_name=held_out.unit_name)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(blocks.tokens.max()) >= int(vocab):
        raise MoescopeError(f"{source}: the tokenizer gives id {int(blocks.tokens.max())} but the model has "
                            f"{vocab} embeddings (tokenizer and model do not match)")
    if plan is not None:
        loading.check_memory(plan, force)
        net = loading.load_model(plan)
        adapter, sites = _sites(net, source)
    in_device = loading.input_device(net)
    info = _model_info(adapter, sites, config, source, dtype_name, device, context)
    if cfg.revision is not None:
        info["revision"] = cfg.revision
    log.info("analyze %s: %s, adapter %s, MoE layers %s, %d experts, top-%d, %d blocks of %d tokens", source,
             info["architecture"], adapter.name, info["moe_layers"], info["n_experts"], info["top_k"],
             len(blocks.domain), context)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for target in (out / "analyze", *(out / part for part in _RESULTS)):  # what a killed analysis left
        remove_stale_temporaries(target)
    staging_parent = Path(tempfile.mkdtemp(prefix=temporary_prefix(out / "analyze"), suffix=".tmp", dir=out))
    done = False
    try:
        stage = staging_parent / out.resolve().name  # the report names the directory it is built in
        stage.mkdir()
        metrics = _run(net, tokenizer, adapter, sites, blocks, info, stage, name, cfg, in_device, progress,
                       source=source, data_dir=data_dir, texts_file=texts_file)
        _swap_in(stage, out)
        done = True
    finally:
        shutil.rmtree(staging_parent, ignore_errors=True)
        if created and not done:  # a failed first analysis leaves no OUT behind
            with contextlib.suppress(OSError):
                out.rmdir()
    return metrics


def shared_expert_summary(n_shared: int, gate: np.ndarray | None, token_domain: np.ndarray,
                          domains: list[str]) -> dict:
    """Shared experts, reported beside (not among) the routed ones: how many, and their per-token gate if any."""
    out: dict[str, Any] = {"n_shared_experts": int(n_shared), "gate": None}
    if gate is not None:
        gate = np.asarray(gate, dtype=np.float64)
        out["gate"] = "sigmoid(shared_expert_gate(x)), multiplies the shared expert's output"
        out["gate_mean"] = float(gate.mean())
        out["gate_mean_by_domain"] = {d: float(gate[token_domain == i].mean()) for i, d in enumerate(domains)
                                      if (token_domain == i).any()}
    return out


def _sites(net, source: str):
    """find_sites, its refusals named by the model they are about."""
    try:
        return find_sites(net)
    except MoescopeError as exc:
        message = str(exc)
        raise MoescopeError(message if message.startswith(source) else f"{source}: {message}") from exc


def check_out_dir(out: Path) -> None:
    """Refuse an OUT that this analysis would write into wrongly, before any weight is read: a file, a
    directory that cannot be created, or one holding what `analyze --model` did not write (a training
    run, another tool's output), whose files the results would silently replace."""
    if out.is_symlink() and not out.exists():
        raise MoescopeError(f"--out {out}: a symlink to nothing")
    if out.exists() and not out.is_dir():
        raise MoescopeError(f"--out {out}: exists and is not a directory")
    if not out.exists():
        parent = next((p for p in out.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise MoescopeError(f"--out {out}: cannot create it ({parent} is not a writable directory)")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise MoescopeError(f"--out {out}: not writable")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _RESULTS and not p.name.startswith("."))
    described = out / "experiment.json"
    if described.is_file():
        try:
            experiment = json.loads(described.read_text(encoding="utf-8")).get("experiment")
            released = isinstance(experiment, dict) and isinstance(experiment.get("released_model"), dict)
        except (OSError, ValueError, AttributeError, RecursionError):  # ValueError: bad UTF-8 or JSON
            released = False
        if not released:
            foreign.insert(0, "experiment.json (not an `analyze --model` description)")
    if foreign:
        raise MoescopeError(f"--out {out}: holds files `analyze --model` did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); pass a new or empty directory")


def _set_aside(path: Path) -> Path | None:
    """Rename an old result to its trash name `.NAME.old` (removed by the next analysis if this one is
    killed: remove_stale_temporaries); None when there is none."""
    if not path.exists():
        return None
    trash = path.with_name(f".{path.name}.old")
    _discard(trash)
    os.replace(path, trash)
    return trash


def _discard(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _replace(src: Path, dst: Path) -> None:
    """Move a finished file or directory over an old one (old one removed only after the move)."""
    if src.exists():
        trash = _set_aside(dst)
        os.replace(src, dst)
        _discard(trash)


def _swap_in(stage: Path, out: Path) -> None:
    """Move the finished results from `stage` into OUT, OUT/analysis last. Readers (report, compare) start
    from OUT/analysis/metrics.json, so the old analysis is set aside first and the new one moved in last:
    a kill in between leaves OUT without analysis/ (readers say to run `moescope analyze`), never a new
    experiment.json or report beside the old analysis, nor the old ones beside the new analysis."""
    old_analysis = _set_aside(out / "analysis")
    for part in _RESULTS:
        if part != "analysis":
            _replace(stage / part, out / part)
    os.replace(stage / "analysis", out / "analysis")
    _discard(old_analysis)


def _run(net, tokenizer, adapter, sites, blocks: texts.TextBlocks, info: dict, stage: Path, name: str,
         cfg: ReleasedConfig, in_device, progress: bool, *, source, data_dir, texts_file) -> dict:
    analysis = stage / "analysis"
    stream = capture.RoutingStream(stage / "stream")
    with RoutingRecorder(adapter, sites) as recorder:
        try:
            res = capture.stream_routing(net, blocks.tokens, blocks.domain, blocks.domains, recorder=recorder,
                                         stream=stream, input_device=in_device, batch_blocks=cfg.batch_blocks,
                                         progress=progress)
        except (MoescopeError, OSError):  # moescope's checks, and the file system (a full disk) as it said it
            raise
        except Exception as exc:  # the model's own forward refused its config or input (one line, not a traceback)
            if is_out_of_memory(exc):
                raise
            raise MoescopeError(f"{name}: the model's forward pass failed ({type(exc).__name__}: "
                                f"{first_line(exc)}); its config or checkpoint does not run as transformers "
                                "builds it") from exc
    stream.close()
    del net

    block_rows = np.arange(len(blocks.domain))
    # each block's unit: the source document (data directory) or text (texts file) of its first token
    units = BlockUnits(blocks.unit, blocks.unit_name) if blocks.unit is not None else BlockUnits.blocks(block_rows.size)
    sample_rows = choose_sample_rows(block_rows, blocks.domain, cfg.viewer_samples_per_domain)
    sample_mask_blocks = np.zeros(len(block_rows), dtype=bool)
    sample_mask_blocks[sample_rows] = True
    arm: dict[str, Any] = {
        "kind": "moe",
        "model": info,
        "eval_loss": summarize_eval_loss(res.block_loss_sum, res.block_tokens, blocks.domain, blocks.domains,
                                         cfg.statistics, block_unit=units.of_block),
        "layers": {},
    }
    samples = {}
    nulls: list[np.ndarray] = []
    for site in sites:
        table = capture.streamed_table(stream, site.layer, blocks.tokens, blocks.domain, site.n_experts)
        capture.save_table(table, analysis / "routing" / name / f"{site.layer}.npz")
        arm["layers"][str(site.layer)] = summarize_layer(table, blocks.domains, cfg.statistics, nmi_nulls=nulls,
                                                         unit_of_block=units.of_block)
        label_expert_tokens(arm["layers"][str(site.layer)], tokenizer)
        if site.n_shared_experts:
            arm["layers"][str(site.layer)]["shared_expert"] = shared_expert_summary(
                site.n_shared_experts, stream.columns(site.layer).get("shared_gate"), table.domain, blocks.domains)
        keep = np.flatnonzero(sample_mask_blocks[table.block])
        samples[site.layer] = table.select(keep)
        del table
    shutil.rmtree(stage / "stream", ignore_errors=True)
    arm["nmi_best_of_layers"] = best_layer_nmi_test(arm["layers"], nulls)
    arm["headline"] = headline(arm)
    pieces = {int(r): tokentypes.token_pieces(tokenizer, blocks.tokens[r]) for r in sample_rows}
    n_shared = max((site.n_shared_experts for site in sites), default=0)
    viewer = {"arms": {name: viewer_arm(samples, sample_rows, blocks.domains, pieces,
                                        max_tokens=VIEWER_MAX_TOKENS, n_shared_experts=n_shared)}}

    metrics = {
        "format_version": FORMAT_VERSION,
        "run": str(source),
        "data_dir": str(data_dir) if data_dir is not None else None,
        "texts_file": str(texts_file) if texts_file is not None else None,
        "domains": blocks.domains,
        "n_eval_blocks": int(len(blocks.domain)),
        "block_size": int(blocks.tokens.shape[1]),
        "statistics": statistics_header(cfg.statistics, units.describe(block_rows, blocks.domain, blocks.domains)),
        "config": asdict(cfg),
        "environment": environment_info(),
        "arms": {name: arm},
    }
    atomic_write_json(analysis / "metrics.json", json_ready(metrics))
    atomic_write_json(analysis / "viewer.json", json_ready(viewer), indent=None)
    # what was analysed, in the place `moescope report` looks for a run's description
    atomic_write_json(stage / "experiment.json", json_ready({
        "experiment": {"released_model": info, "data_dir": metrics["data_dir"], "texts_file": metrics["texts_file"],
                       "config": asdict(cfg)},
        "arms": {name: {}},
    }))
    build_report(stage, stage / "report")
    return metrics
