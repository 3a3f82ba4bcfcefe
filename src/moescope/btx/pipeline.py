"""A branch / merge / ensemble study, stage by stage; every stage is skipped when already done.

Run directory::

    OUT/btx_config.json                 the resolved BTXConfig
    OUT/base/                           the dense base (trainer stage layout; final/ starts every branch)
    OUT/partitions/{strategy}/          `moescope partition` output of the corpus' train split
    OUT/branch_data/{strategy}/pNN/     block store of partition NN (train) + the corpus' eval split
    OUT/branches/{strategy}/pNN/        one dense branch per partition (trainer stage layout)
    OUT/merged/{strategy}/init/         the BTX MoE before fine-tuning, + router_init.json
    OUT/merged/{strategy}/finetune/     the BTX MoE after its brief fine-tune (trainer stage layout)
    OUT/dense/                          the dense baseline at matched training compute
    OUT/comparison.json, comparison.md  per-domain held-out loss of every model
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from moescope.btx.config import BTXConfig
from moescope.btx.data import EvalSet, load_eval_set, write_branch_data
from moescope.btx.ensemble import ensemble_weights, mix_target_logprobs
from moescope.btx.merge import (
    average_models,
    fit_router,
    merge_branches,
    mlp_input_moments,
    mlp_inputs,
    router_from_means,
    routing_shares,
)
from moescope.btx.scoring import continuation_losses, forward_flops_per_token, target_logprobs
from moescope.data.blocks import BlockStore
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_json, atomic_write_text
from moescope.io.jsonfile import json_ready
from moescope.io.config import from_dict, to_dict
from moescope.moe.config import MoEConfig
from moescope.io.saved_model import load_saved_model
from moescope.moe.hf_model import save_moe_model
from moescope.moe.model import moe_layers
from moescope.train.trainer import train_run
from moescope.report.fmt import fmt_interval

log = logging.getLogger(__name__)


def _final(stage_dir: Path) -> Path:
    return stage_dir / "final"


def run_base(cfg: BTXConfig, out: Path) -> Path:
    """The dense model every branch starts from (trained here when base_init is "scratch")."""
    if cfg.base_init != "scratch":
        return Path(cfg.base_init)
    run = cfg.stage_run(data_dir=cfg.data_dir, arch="dense", steps=cfg.base_steps)
    train_run(run, out / "base", init=None, name="base", resume=True)
    return _final(out / "base")


def run_partitions(cfg: BTXConfig, out: Path, strategy: str, *, embedding_cache: Path | None = None) -> Path:
    """Partition the corpus' train split (`moescope partition` with the study's settings)."""
    from moescope.partition.config import PartitionConfig
    from moescope.partition.io import read_data_dir_corpus, write_partitions
    from moescope.partition.partitioner import EmbeddingOptions, partition_texts, summarize_outcome

    dst = out / "partitions" / strategy
    if (dst / "report.json").is_file():
        return dst
    corpus = read_data_dir_corpus(cfg.data_dir, "train")
    pcfg = PartitionConfig(n_partitions=cfg.n_partitions, strategy=strategy, overlap_ratio=cfg.overlap_ratio,
                           seed=cfg.partition_seed)
    outcome = partition_texts(corpus.texts, pcfg, domains=corpus.domains,
                              embedding=EmbeddingOptions(cache_dir=embedding_cache))
    report = summarize_outcome(outcome)
    report["corpus"] = corpus.source
    write_partitions(outcome, [corpus.ids[i] for i in outcome.kept_index], dst, report=report, overwrite=True)
    return dst


def run_branches(cfg: BTXConfig, out: Path, strategy: str, base_dir: Path) -> list[Path]:
    """Train one dense branch per partition from the base, one at a time (memory freed between)."""
    from moescope.partition.io import partition_dirs

    finals = []
    for e, pdir in enumerate(partition_dirs(out / "partitions" / strategy)):
        data = write_branch_data(cfg.data_dir, pdir, out / "branch_data" / strategy / f"p{e:02d}")
        stage = out / "branches" / strategy / f"p{e:02d}"
        run = cfg.stage_run(data_dir=str(data.root), arch="dense", steps=cfg.branch_steps)
        train_run(run, stage, init=base_dir, name=f"branch-{strategy}-p{e:02d}", resume=True)
        gc.collect()
        finals.append(_final(stage))
    return finals


def _partition_batches(cfg: BTXConfig, out: Path, strategy: str, batch: int = 16) -> list[list[torch.Tensor]]:
    """Up to router_init_blocks train blocks of each partition, spread over it, in batches."""
    out_batches = []
    for e in range(cfg.n_partitions):
        store = BlockStore.open(out / "branch_data" / strategy / f"p{e:02d}")
        index = store.index("train")
        pick = np.unique(np.linspace(0, len(index) - 1, min(len(index), cfg.router_init_blocks)).round().astype(int))
        blocks = torch.from_numpy(store.gather("train", index[pick]))
        out_batches.append(list(blocks.split(batch)))
    return out_batches


def merge_moe_config(cfg: BTXConfig, n_blocks: int) -> MoEConfig:
    layers = list(cfg.moe_layers) if cfg.moe_layers is not None else list(range(n_blocks))
    return MoEConfig(n_experts=cfg.n_partitions, top_k=cfg.top_k, layers=layers, upcycle_noise_rel=0.0)


def run_merge(cfg: BTXConfig, out: Path, strategy: str, branch_dirs: list[Path]) -> Path:
    """Build the BTX MoE (router fitted to the partitions), then fine-tune it briefly with the LB loss."""
    init_dir = out / "merged" / strategy / "init"
    branches = None
    if not (init_dir / "model.safetensors").is_file():
        branches = [load_saved_model(d) for d in branch_dirs]
        moe_cfg = merge_moe_config(cfg, len(branches[0].transformer.h))
        batches = _partition_batches(cfg, out, strategy)
        router = None
        if cfg.router_init == "means":
            soup = average_models(branches)
            moments = [mlp_input_moments(soup, b, moe_cfg.layers) for b in batches]
            router = {
                i: router_from_means(torch.stack([m[i][0] for m in moments]),
                                     float(torch.stack([m[i][1] for m in moments]).mean()))
                for i in moe_cfg.layers
            }
            del soup
        merged = merge_branches(branches, moe_cfg, router)
        if cfg.router_init == "fit":
            # in block order: block i's inputs depend only on blocks < i, whose routers are already set
            for i in sorted(moe_cfg.layers):
                weight = fit_router([mlp_inputs(merged, b, i) for b in batches], l2=cfg.router_fit_l2)
                moe_layers(merged)[i].router.weight.data.copy_(weight)
        shares = routing_shares(merged, batches)
        save_moe_model(merged, init_dir)
        atomic_write_json(init_dir / "router_init.json", {
            "router_init": cfg.router_init,
            "layers": moe_cfg.layers,
            # row p: where partition p's tokens go at step 0; the diagonal is "its own branch"
            "routing_shares": {str(i): s.tolist() for i, s in shares.items()},
            "own_expert_share": {str(i): float(s.diagonal().mean()) for i, s in shares.items()},
        })
        del merged, branches
        gc.collect()
    if cfg.finetune_steps > 0:
        moe_cfg = from_dict(MoEConfig, json.loads((init_dir / "moe_config.json").read_text())["moe"])
        run = cfg.stage_run(data_dir=cfg.data_dir, arch="moe", steps=cfg.finetune_steps, moe=moe_cfg,
                            lr=cfg.resolved_finetune_learning_rate())
        train_run(run, out / "merged" / strategy / "finetune", init=init_dir, name=f"btx-{strategy}", resume=True)
        return _final(out / "merged" / strategy / "finetune")
    return init_dir


def run_dense_baseline(cfg: BTXConfig, out: Path, base_dir: Path) -> Path:
    """The dense model trained from the same base for the same number of tokens as branches + fine-tune."""
    run = cfg.stage_run(data_dir=cfg.data_dir, arch="dense", steps=cfg.total_dense_steps())
    train_run(run, out / "dense", init=base_dir, name="dense", resume=True)
    return _final(out / "dense")


def _score(model_dir: Path, ev: EvalSet, cfg: BTXConfig) -> tuple[torch.Tensor, dict]:
    """(target log-probs, per-domain losses + the model's inference FLOPs per token at the eval context)."""
    model = load_saved_model(model_dir)
    lp = target_logprobs(model, torch.from_numpy(ev.blocks), cfg.train.eval_batch_sequences)
    flops = forward_flops_per_token(model, int(ev.blocks.shape[1]))
    del model
    gc.collect()
    return lp, {**continuation_losses(lp, ev.domain_ids, ev.domains, cfg.eval_context_tokens),
                "inference_flops_per_token": flops}


def domain_routing(model_dir: Path, ev: EvalSet, cfg: BTXConfig) -> dict:
    """{block: [domain][expert] share of eval tokens}: does a domain go to its branch's expert?"""
    model = load_saved_model(model_dir)
    blocks = torch.from_numpy(ev.blocks)
    by_domain = [list(blocks[torch.from_numpy(ev.domain_ids == d)].split(cfg.train.eval_batch_sequences))
                 for d in range(len(ev.domains))]
    shares = routing_shares(model, by_domain)
    del model
    return {str(i): [[round(float(v), 3) for v in row] for row in m] for i, m in shares.items()}


def cbtm_weights(cfg: BTXConfig, partition_dir: Path, ev: EvalSet, *, embedding_cache: Path | None = None) -> np.ndarray:
    """[n_blocks, N] c-BTM weights from each block's first eval_context_tokens tokens."""
    from moescope.data.tokenizer import load_data_tokenizer

    from moescope.partition.io import open_encoder, read_centroids

    tok = load_data_tokenizer(cfg.data_dir)
    contexts = tok.batch_decode(ev.blocks[:, : cfg.eval_context_tokens].tolist())
    encoder = open_encoder(partition_dir, cache_dir=embedding_cache)
    return ensemble_weights(encoder.encode(contexts), read_centroids(partition_dir), cfg.cbtm_temperature, cfg.cbtm_top_k)


def compare(cfg: BTXConfig, out: Path, *, embedding_cache: Path | None = None) -> dict:
    """Score every trained model on the same held-out tokens; write comparison.json / .md."""
    ev = load_eval_set(cfg.data_dir, cfg.eval_max_blocks_per_domain)
    store = BlockStore.open(cfg.data_dir)
    tokens_per_step = cfg.train.batch_sequences * store.block_size
    n, sb, sf = cfg.n_partitions, cfg.branch_steps, cfg.finetune_steps
    rows: list[dict] = []

    c = cfg.eval_context_tokens
    dense_lp, dense_res = _score(_final(out / "dense"), ev, cfg)
    dense_block_nll = -dense_lp[:, max(c - 1, 0):].double().sum(1).numpy()

    def add(name: str, scored: tuple[torch.Tensor, dict], train_steps: int, experts_per_token: float,
            note: str = "") -> None:
        lp, result = scored
        block_nll = -lp[:, max(c - 1, 0):].double().sum(1).numpy()
        rows.append({"model": name, **result, "train_tokens": train_steps * tokens_per_step,
                     "experts_per_token": experts_per_token, "note": note,
                     "delta_vs_dense": paired_delta(block_nll, dense_block_nll, lp.shape[1] - max(c - 1, 0),
                                                    ev.domain_ids, ev.unit)})

    base_dir = Path(cfg.base_init) if cfg.base_init != "scratch" else _final(out / "base")
    base_note = (f"shared starting point, trained {cfg.base_steps * tokens_per_step:,} tokens before every row"
                 if cfg.base_init == "scratch" else "shared starting point")
    add("dense base (start of all)", _score(base_dir, ev, cfg), 0, 1, base_note)
    add("dense baseline", (dense_lp, dense_res), n * sb + sf, 1)
    extra: dict = {}
    for strategy in cfg.strategies:
        init_dir = out / "merged" / strategy / "init"
        add(f"BTX merged ({strategy}), before fine-tune", _score(init_dir, ev, cfg), n * sb, cfg.top_k)
        merged_dir = init_dir
        if sf > 0:
            merged_dir = _final(out / "merged" / strategy / "finetune")
            add(f"BTX merged ({strategy})", _score(merged_dir, ev, cfg), n * sb + sf, cfg.top_k)
        extra[f"routing_by_domain_{strategy}"] = domain_routing(merged_dir, ev, cfg)
        extra[f"router_init_{strategy}"] = json.loads((init_dir / "router_init.json").read_text())["own_expert_share"]
        branch_lps = []
        for e in range(n):
            scored = _score(_final(out / "branches" / strategy / f"p{e:02d}"), ev, cfg)
            branch_lps.append(scored[0])
            branch_flops = scored[1]["inference_flops_per_token"]
            add(f"branch {e} alone ({strategy})", scored, sb, 1, "one partition's model on everything")
        pdir = out / "partitions" / strategy
        if (pdir / "centroids.npy").is_file():
            w = cbtm_weights(cfg, pdir, ev, embedding_cache=embedding_cache)
            mixed = mix_target_logprobs(torch.stack(branch_lps), torch.from_numpy(w))
            k = cfg.cbtm_top_k or n
            # k branches run on every token; the sentence embedding that picks them runs once per sequence
            add(f"c-BTM ensemble ({strategy}, T={cfg.cbtm_temperature})",
                (mixed, {**continuation_losses(mixed, ev.domain_ids, ev.domains, cfg.eval_context_tokens),
                         "inference_flops_per_token": k * branch_flops}), n * sb, k,
                "weights from the first context tokens' embedding (+ one embedding per sequence)")
            extra[f"cbtm_mean_weight_by_domain_{strategy}"] = {
                d: w[ev.domain_ids == i].mean(0).round(3).tolist() for i, d in enumerate(ev.domains)}
    result = {
        "config": to_dict(cfg),
        "eval": {"blocks": int(len(ev.blocks)), "context_tokens": cfg.eval_context_tokens, "unit": ev.unit_name,
                 "n_units": int(np.unique(ev.unit).size) if ev.unit is not None else int(len(ev.blocks)),
                 "scored_tokens_per_block": int(ev.blocks.shape[1] - cfg.eval_context_tokens)},
        "rows": rows,
        **extra,
    }
    atomic_write_json(out / "comparison.json", json_ready(result))
    atomic_write_text(out / "comparison.md", render_comparison(result))
    return result


def paired_delta(block_nll: np.ndarray, ref_block_nll: np.ndarray, tokens_per_block: int,
                 domain_ids: np.ndarray, block_unit: np.ndarray | None = None) -> dict:
    """Token-weighted loss difference to the reference on the same blocks, with a 95% cluster
    bootstrap interval over units (``block_unit``, the source document of each block's first token;
    None = each block alone), resampled within their domain (:func:`moescope.analysis.stats.mean_interval`)."""
    from moescope.analysis.stats import mean_interval

    unit = np.arange(len(block_nll)) if block_unit is None else block_unit
    iv = mean_interval((np.asarray(block_nll) - np.asarray(ref_block_nll)) / tokens_per_block, unit, strata=domain_ids)
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def render_comparison(result: dict) -> str:
    domains = list(result["rows"][0]["domains"])
    head = ("| model | " + " | ".join(domains) +
            " | token-weighted | domain-weighted | vs dense [95% CI] | train tokens after the base | inference FLOPs/token "
            "| experts/token |")
    lines = [
        "# Held-out loss (nats/token) after the first "
        f"{result['eval']['context_tokens']} tokens of {result['eval']['blocks']} eval blocks",
        "",
        head,
        "|---" * (len(domains) + 7) + "|",
    ]
    for r in result["rows"]:
        cells = [f"{r['domains'][d]['loss']:.4f}" if d in r["domains"] else "-" for d in domains]
        d = r["delta_vs_dense"]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['token_weighted']:.4f} | "
                     f"{r['domain_weighted']:.4f} | {fmt_interval(d, 4, signed=True)} | "
                     f"{r['train_tokens']:,} | {r['inference_flops_per_token'] / 1e6:.2f} M | {r['experts_per_token']} |")
    if "unit" in result["eval"]:
        lines += ["", f"95% CI: paired cluster bootstrap resampling whole units within their domain; unit: "
                      f"{result['eval']['unit']} ({result['eval']['n_units']} units)."]
    lines += [""] + [f"- {r['model']}: {r['note']}" for r in result["rows"] if r.get("note")]
    for key, value in result.items():
        if key.startswith(("router_init_", "cbtm_mean_weight", "routing_by_domain")):
            lines += ["", f"- {key}: {json.dumps(value)}"]
    return "\n".join(lines) + "\n"


def prepare_study(cfg: BTXConfig, out: Path) -> None:
    """Check the data directory and pin the config: a study directory holds one config only."""
    if not cfg.data_dir or not (Path(cfg.data_dir) / "manifest.json").is_file():
        raise MoescopeError(f"data_dir {cfg.data_dir!r} is not a built data directory (moescope data build)")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "btx_config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(to_dict(cfg))):
        raise MoescopeError(f"{cfg_path} holds another config; use the same config or a new --out")
    atomic_write_json(cfg_path, to_dict(cfg))


def branch_dirs(cfg: BTXConfig, out: Path, strategy: str) -> list[Path]:
    """The trained branches of a strategy; fails naming the first missing one."""
    dirs = [_final(out / "branches" / strategy / f"p{e:02d}") for e in range(cfg.n_partitions)]
    for d in dirs:
        if not (d / "model.safetensors").is_file():
            raise MoescopeError(f"branch {d} is not trained yet (run `moescope btx branch` first)")
    return dirs


def run_study(cfg: BTXConfig, out: Path, *, embedding_cache: Path | None = None) -> dict:
    """Every stage in order; a rerun resumes where the last one stopped."""
    prepare_study(cfg, out)
    timings = {}
    t0 = time.perf_counter()
    base = run_base(cfg, out)
    timings["base_s"] = time.perf_counter() - t0
    for strategy in cfg.strategies:
        t0 = time.perf_counter()
        run_partitions(cfg, out, strategy, embedding_cache=embedding_cache)
        timings[f"partition_{strategy}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        branches = run_branches(cfg, out, strategy, base)
        timings[f"branches_{strategy}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_merge(cfg, out, strategy, branches)
        timings[f"merge_{strategy}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_dense_baseline(cfg, out, base)
    timings["dense_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = compare(cfg, out, embedding_cache=embedding_cache)
    timings["compare_s"] = time.perf_counter() - t0
    atomic_write_json(out / "timings.json", {k: round(v, 1) for k, v in timings.items()})
    return result
