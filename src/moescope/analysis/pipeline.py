"""`moescope analyze RUN`: capture every arm's routing on the eval split and write the study's numbers.

Orchestration (layer 3): it reads the run directory written by the trainer
(RUN/experiment.json, RUN/arms/ARM/final/, RUN/arms/ARM/snapshots/step_*/) and the
data directory, runs capture (layer 2) and the metric and statistics functions
(layer 1), and writes, atomically as a whole (built in a staging directory, then swapped in):

    RUN/analysis/metrics.json              every number, with intervals and p-values
    RUN/analysis/viewer.json               per-token routing of sample blocks (format: analysis/viewer.py)
    RUN/analysis/routing/ARM/LAYER.npz     the captured routing table of each MoE layer
    RUN/analysis/seeds.json                (`demo --seeds`, not analyze) kept from the previous analysis

metrics.json (IV = {"estimate", "low", "high"}, a 95% cluster-bootstrap interval over resampling units:
the source document of each eval block's first token, or the eval block for a data directory without
block sources (statistics.unit says which; moescope.data.units); LAYER = block index as a string;
entropies in nats, JS divergences in bits)::

    format_version, run, data_dir, domains [D], n_eval_blocks, block_size,
    statistics {n_resamples, n_permutations, confidence_level, seed, unit, n_units {DOMAIN: n},
                unit_note (why blocks, when they are the unit), ... how made},
    config (AnalyzeConfig), environment,
    arms.ARM.kind                      "moe" | "dense"
    arms.ARM.batch_order               "by_domain" | "mixed": which eval blocks shared a forward pass (config
                                       batch_order resolved for the arm; data/batch_order.py)
    arms.ARM.eval_loss                 {domains {DOMAIN: IV}, token_weighted IV, domain_weighted IV}
    arms.ARM.headline                  {best_layer, nmi IV, nmi_pvalue (of that layer alone), load_cv_max,
                                       max_fraction_max, n_layers (the layers the best was picked from);
                                       with a step-0 snapshot: nmi_start IV, nmi_change IV of the best layer}
    arms.ARM.eval_loss_vs_dense        (non-dense arms) {reference, domain_weighted IV, domains {DOMAIN: IV},
                                       pvalue, n_permutations, n_blocks, n_units, test}: ARM minus dense,
                                       nats/token, paired over the same eval blocks (resampled by unit)
    arms.ARM.layers.LAYER              n_tokens, n_blocks, n_units, n_experts, top_k, domains,
      specialization  nmi IV (equal domain weights), nmi_token_weighted IV, nmi_pvalue,
                      nmi_permutation {statistic, pvalue, n_permutations, null_mean, null_q95},
                      mutual_information, expert_given_domain [D][E], domain_given_expert [D][E],
                      max_expert_given_domain IV, normalized_domain_entropy {DOMAIN: IV},
                      domain_specialization [D][E] (OLMoE), domain_specialization_baseline (k/E),
                      domain_specialization_top IV (each domain's most-used expert, mean over domains),
                      nmi_first_choice IV + nmi_first_choice_pvalue (first choice only; = nmi for top-1),
                      coactivation [E][E] (top-k > 1 only; all pairs within a token's top-k),
                      arms with a step-0 snapshot (the upcycled model before its router was trained):
                      nmi_start IV (that model's NMI on the same tokens), nmi_change IV (nmi - nmi_start,
                      paired: the same resampled units for both), nmi_start_step (0)
      load            token_fraction [E], max_fraction IV (share of the expert busiest on the whole set),
                      load_cv IV, effective_experts IV, dropped_fraction;
                      expert choice only: unrouted_fraction IV (tokens no expert took),
                      experts_per_token_counts [E+1] (tokens taken by 0, 1, ..., E experts)
      entropy         router_entropy_token IV, router_entropy_of_mean IV, router_entropy_max (ln E)
      repetition      n_pairs, same_first_choice IV, baseline_uniform (1/E), baseline_load (sum f^2),
                      shared_topk IV + shared_topk_baseline_uniform (top-k > 1 only),
                      shared_assignment IV + shared_assignment_baseline (expert choice only: one expert
                      took both tokens; chance 1 - prod_e (1 - q_e^2) from each expert's take rate q_e)
      vocabulary      min_count, n_token_ids, mean, weighted_mean, baseline_shuffled, most_specialized [...]
    arms.ARM.token_types.LAYER         type_names, n_tokens, counts [types][E], expert_given_type, top_expert
                                       {TYPE: {expert, share, n_tokens}}, nmi IV (token-weighted)
    arms.ARM.format_test               divergence, markers, n_texts {DOMAIN: n}, layers.LAYER {n_tokens,
                                       js_divergence_of_means, mean_token_js_divergence IV, top1_changed_fraction IV,
                                       reference_token_js_divergence {"same domain", "different domains"},
                                       reference_domain_js_divergence {"A vs B"}}; its IVs resample the
                                       routed texts' source documents
    arms.ARM.saturation                {steps [T], n_tokens, baseline (k/E), layers {LAYER: [T]}; expert
                                        choice: counts = "assignments", baseline sum q^2 / sum q}
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moescope.analysis import capture, formattest, stats, tokentypes
from moescope.analysis.summary import (
    SummaryConfig, best_layer_nmi_test, label_expert_tokens, statistics_header, summarize_eval_loss, summarize_layer, summarize_start_nmi,
    summarize_token_types,
)
from moescope.analysis.viewer import choose_sample_rows, viewer_arm
from moescope.data.batch_order import BatchOrder, forward_order, resolve_batch_order, routes_by_batch
from moescope.data.blocks import BlockStore
from moescope.data.units import BlockUnits, eval_block_units, numbered, record_document
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_json
from moescope.io.config import bounded, check_fields
from moescope.io.jsonfile import json_ready, read_json_object
from moescope.io.lock import run_directory_lock
from moescope.io.names import check_path_name
from moescope.io.provenance import environment_info
from moescope.io.saved_model import load_saved_model, recorded_manifest_sha256, verify_saved_model
from moescope.moe.native import native_status
from moescope.moe.capture import record_routing
from moescope.moe.hf_model import WEIGHTS_NAME, read_moe_config, weight_shapes
from moescope.moe.model import moe_layers

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROBLEM_MARKER, SOLUTION_MARKER = "Problem: ", "Solution: "


@dataclass
class AnalyzeConfig:
    """What `moescope analyze` captures and how much of it."""

    max_blocks_per_domain: int | None = bounded(None, low=1)  # eval blocks per domain to capture (None = all)
    batch_blocks: int = bounded(8, low=1, high=2**20)  # blocks per forward pass
    # Which blocks share a forward pass (data/batch_order.py): "by_domain" (as stored), "mixed" (domains
    # interleaved evenly), "auto" = "mixed" for expert-choice arms, whose routing depends on the batch.
    batch_order: BatchOrder = "auto"
    viewer_samples_per_domain: int = bounded(3, low=0, high=1000)  # blocks per domain shown in the token viewer
    saturation_max_blocks_per_domain: int = bounded(16, low=1)  # blocks per domain routed through every snapshot
    format_test_domains: list[str] = field(default_factory=lambda: ["math", "code"])
    format_test_max_texts: int = bounded(32, low=0)  # eval texts per domain routed with and without markers
    token_type_domain: str = "code"  # the domain whose blocks get Python token types
    device: str = "auto"  # torch device for the forward passes; "auto" = cuda when available, else cpu
    statistics: SummaryConfig = field(default_factory=SummaryConfig)

    def __post_init__(self) -> None:
        check_fields(self, "analysis")  # configs built in code too, not only those read by from_dict


# --------------------------------------------------------------------------- run directory


def read_experiment(run_dir: Path) -> dict:
    path = run_dir / "experiment.json"
    if not path.is_file():
        raise MoescopeError(f"{run_dir}: not a moescope run directory (no experiment.json)")
    experiment = read_json_object(path, {"arms": dict, "experiment": dict})
    for name in experiment["arms"]:  # each names RUN/arms/NAME and analysis/routing/NAME
        check_path_name(name, f"{path}: arm")
    return experiment


def resolve_data_dir(run_dir: Path, experiment: dict, data_dir: str | Path | None) -> Path:
    candidate = Path(data_dir) if data_dir is not None else Path(experiment.get("experiment", {}).get("data_dir", ""))
    # as recorded (relative to the working directory), relative to the run, or beside it (demo layout)
    for path in (candidate, run_dir / candidate, run_dir.parent / candidate.name):
        if (path / "manifest.json").is_file():
            return path
    raise MoescopeError(
        f"data directory {str(candidate)!r} of run {run_dir} not found; pass --data DIR"
    )


def snapshot_dirs(arm_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every saved snapshot, by step."""
    out = []
    for path in (arm_dir / "snapshots").glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and path.is_dir():
            out.append((int(match.group(1)), path))
    return sorted(out)


def moe_settings(moe: Any) -> dict[str, Any] | None:
    """The MoE settings a model's routing is read by (None: dense), from a MoEConfig or its recorded dict;
    layers None (the default layers, resolved only with the model) is left out."""
    if moe is None:
        return None
    get = moe.get if isinstance(moe, dict) else lambda key: getattr(moe, key, None)
    out = {"n_experts": get("n_experts"), "top_k": get("top_k")}
    if isinstance(get("layers"), list):
        out["layers"] = sorted(get("layers"))
    return out


def recorded_moe_settings(experiment: dict, arm: str) -> tuple[bool, dict[str, Any] | None]:
    """(known, settings) of `arm` as experiment.json records its resolved config (known False: not recorded)."""
    config = experiment["arms"].get(arm)
    config = config.get("config") if isinstance(config, dict) else None
    if not isinstance(config, dict) or config.get("arch") not in ("dense", "moe"):
        return False, None
    if config["arch"] == "dense":
        return True, None
    return isinstance(config.get("moe"), dict), moe_settings(config.get("moe"))


def _same_settings(found: dict[str, Any] | None, expected: dict[str, Any] | None) -> bool:
    """Equal on the keys both name (a recorded config without explicit layers does not name them)."""
    if found is None or expected is None:
        return found is None and expected is None
    return all(found.get(key) == value for key, value in expected.items()) and found.keys() >= expected.keys()


def check_arm_models(run_dir: Path, name: str, experiment: dict) -> None:
    """Before anything of the analysis is replaced: the arm's final/ is the one training wrote, with the
    MoE settings experiment.json records for the arm, and every snapshot readable and of the final
    model's settings (a directory swapped in from another run would otherwise be analysed silently)."""
    arm_dir = run_dir / "arms" / name
    final = arm_dir / "final"
    if not final.is_dir():
        raise MoescopeError(f"{final} not found: arm {name!r} has not finished")
    verify_saved_model(final, recorded_manifest_sha256(final))
    final_settings = moe_settings(read_moe_config(final))
    known, recorded = recorded_moe_settings(experiment, name)
    if known and not _same_settings(final_settings, recorded):
        raise MoescopeError(f"{final}: MoE settings {final_settings or 'dense'} differ from those "
                            f"{run_dir / 'experiment.json'} records for arm {name!r} ({recorded or 'dense'}); "
                            "the model comes from another run")
    final_shapes = weight_shapes(final / WEIGHTS_NAME) if (final / WEIGHTS_NAME).is_file() else None
    # snapshots are read only for an MoE arm's router saturation, whose load verifies each one's manifest;
    # here their settings and header shapes, so that one from another run is refused before anything is written
    for _, snapshot in snapshot_dirs(arm_dir) if final_settings else ():
        settings = moe_settings(read_moe_config(snapshot))
        if settings != final_settings:
            raise MoescopeError(f"{snapshot}: MoE settings {settings or 'dense'} differ from the final model's "
                                f"({final_settings or 'dense'}, {final}); the snapshot comes from another run")
        weights = snapshot / WEIGHTS_NAME
        shapes = weight_shapes(weights) if weights.is_file() else None  # a truncated file: one line, here
        if shapes is not None and final_shapes is not None and shapes != final_shapes:
            key = min(set(shapes) ^ set(final_shapes) or {k for k in shapes if shapes[k] != final_shapes[k]})
            raise MoescopeError(f"{weights}: tensor {key} is {shapes.get(key, 'missing')}, in the final model "
                                f"{final_shapes.get(key, 'missing')} ({final}); the snapshot comes from another run")




# --------------------------------------------------------------------------- pieces of the analysis


def _pieces_for_rows(store: BlockStore, tokenizer, rows: list[int] | np.ndarray) -> dict[int, list[str]]:
    index = store.index("eval")
    tokens = store.gather("eval", index[np.asarray(rows, dtype=np.int64)])
    return {int(r): tokentypes.token_pieces(tokenizer, t) for r, t in zip(rows, tokens)}


def token_types_for_capture(store: BlockStore, tokenizer, res: capture.CaptureResult, domain: str) -> np.ndarray:
    """Python token type of every captured token (-1 outside ``domain`` and where unreliable).

    The domain's eval texts are re-tokenized and typed whole, packed the builder's
    way (text + EOS, cut into blocks), and each captured block is located in that
    stream by its exact token ids, so blocks cut mid-document get full-file types.
    A block that cannot be located (another packing) falls back to typing the
    document heads inside it, after an EOS (:func:`tokentypes.block_token_types`).
    """
    d = store.domains.index(domain)
    index = store.index("eval")
    size = store.block_size
    texts = [record["text"] for record in store.texts("eval", domain)]
    ids, types = tokentypes.stream_token_types(texts, tokenizer, store.eos_token_id)
    n_full = ids.size // size
    where = {ids[j * size : (j + 1) * size].tobytes(): j for j in range(n_full)}
    out = np.full(res.block_rows.size * size, -1, dtype=np.int64)
    n_fallback = 0
    for j, row in enumerate(res.block_rows):
        if index[row, 0] != d:
            continue
        block = store.gather("eval", index[row : row + 1])[0]
        found = where.get(block.astype(np.int64).tobytes())
        if found is not None:
            block_types = types[found * size : (found + 1) * size]
        else:
            n_fallback += 1
            # where the block starts inside its document is unknown: type only what follows an EOS
            pieces = tokentypes.token_pieces(tokenizer, block)
            block_types = tokentypes.block_token_types(pieces, block, store.eos_token_id, starts_document=False)
        out[j * size : (j + 1) * size] = block_types
    if n_fallback:
        log.warning("token types: %d %s blocks not found in the re-tokenized texts; typed per block", n_fallback,
                    domain)
    return out


def _split_content(text: str) -> tuple[str, str] | None:
    """(problem, solution) at the first blank line, or None."""
    head, sep, tail = text.partition("\n\n")
    return (head, tail) if sep and head.strip() and tail.strip() else None


@torch.no_grad()
def route_texts(model, tokenizer, texts: list[str], max_tokens: int, batch_texts: int = 16):
    """Route texts through the model: per text (offsets, {layer: (router_probs [T, E], first choice [T])}).

    Texts are right-padded into batches; with causal attention and default
    positions a real token never sees the padding, so its routing is the same as
    alone (the padding rows are dropped). Capture must be on in every MoE layer.
    """
    layers = moe_layers(model)
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False, truncation=True,
                    max_length=max_tokens)
    out = []
    for start in range(0, len(texts), batch_texts):
        ids = enc["input_ids"][start : start + batch_texts]
        width = max(len(x) for x in ids)
        x = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            x[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        model(input_ids=x.to(next(model.parameters()).device))
        routed = {}
        for i, layer in layers.items():
            rec = layer.last_record
            routed[i] = (rec.router_probs.float().view(len(ids), width, -1).cpu().numpy(),
                         rec.expert_index[:, 0].view(len(ids), width).cpu().numpy())
        for r, row in enumerate(ids):
            n = len(row)
            out.append((enc["offset_mapping"][start + r],
                        {i: (probs[r, :n], first[r, :n]) for i, (probs, first) in routed.items()}))
    return out


def run_format_test(model, tokenizer, store: BlockStore, cfg: AnalyzeConfig) -> dict:
    """Route eval texts plain ("P\\n\\nS", the training format) and marked ("Problem: P\\nSolution: S").

    Reports, per layer, how far the content tokens' routing moved (JS divergence in
    bits, first-choice changes) with a bootstrap over the texts' source documents (a problem worded
    twice is one document: moescope.data.units.record_document), next to reference
    scales: compare ``js_divergence_of_means`` with ``reference_domain_js_divergence``
    (mean routing of two domains) and ``mean_token_js_divergence`` with
    ``reference_token_js_divergence`` (randomly paired tokens, same / different domains).
    """
    layers = moe_layers(model)
    max_tokens = int(model.config.max_position_embeddings)  # every family; GPT-2 maps it to n_positions
    per_layer: dict[int, dict[str, list]] = {
        i: {"a": [], "b": [], "ta": [], "tb": [], "unit": [], "domain": []} for i in layers
    }
    cases: list[tuple[str, str, str, list]] = []  # (domain, plain, marked, segments)
    documents: list[tuple[str, str]] = []  # each case's (domain, source document): the bootstrap's unit
    n_texts: dict[str, int] = {}
    for domain in cfg.format_test_domains:
        if domain not in store.domains:
            continue
        n_texts[domain] = 0
        for line, record in enumerate(store.texts("eval", domain), 1):
            if n_texts[domain] >= cfg.format_test_max_texts:
                break
            parts = _split_content(record["text"])
            if parts is None:
                continue
            p, s = parts
            segments = [(0, len(PROBLEM_MARKER), len(p)),
                        (len(p) + 2, len(PROBLEM_MARKER) + len(p) + 1 + len(SOLUTION_MARKER), len(s))]
            cases.append((domain, f"{p}\n\n{s}", f"{PROBLEM_MARKER}{p}\n{SOLUTION_MARKER}{s}", segments))
            documents.append((domain, record_document(record, line)))
            n_texts[domain] += 1
    if not cases:
        return {"n_texts": n_texts, "layers": {}}
    with record_routing(layers):
        routed = route_texts(model, tokenizer, [t for c in cases for t in c[1:3]], max_tokens)
    plain_sums: dict[str, dict[int, np.ndarray]] = {}
    document_of_case = numbered(documents)
    for text_no, (domain, _, _, segments) in enumerate(cases):
        (off_a, routed_a), (off_b, routed_b) = routed[2 * text_no], routed[2 * text_no + 1]
        ia, ib = formattest.align_content_tokens(off_a, off_b, segments)
        if ia.size == 0:
            continue
        for i in layers:
            (pa, ea), (pb, eb) = routed_a[i], routed_b[i]
            acc = per_layer[i]
            for key, value in (("a", pa[ia]), ("b", pb[ib]), ("ta", ea[ia]), ("tb", eb[ib]),
                               ("unit", np.full(ia.size, document_of_case[text_no])),
                               ("domain", np.full(ia.size, store.domains.index(domain)))):
                acc[key].append(value)
            sums = plain_sums.setdefault(domain, {})
            sums[i] = sums.get(i, 0) + pa[ia].sum(axis=0)

    out: dict[str, Any] = {"divergence": "Jensen-Shannon divergence in bits (squared scipy jensenshannon, base 2)",
                           "markers": [PROBLEM_MARKER.strip(), SOLUTION_MARKER.strip()],
                           "n_texts": n_texts, "layers": {}}
    for i, acc in per_layer.items():
        if not acc["a"]:
            continue
        shift = formattest.measure_routing_shift(
            np.concatenate(acc["a"]), np.concatenate(acc["b"]), np.concatenate(acc["ta"]), np.concatenate(acc["tb"])
        )
        entry = shift.to_dict()
        unit = np.concatenate(acc["unit"])
        if np.unique(unit).size >= 2:
            _, sums = stats.sum_by_block(
                np.column_stack([shift.token_js_divergence, shift.token_top1_changed, np.ones(unit.size)]), unit
            )
            sc = cfg.statistics
            for key, col in (("mean_token_js_divergence", 0), ("top1_changed_fraction", 1)):
                iv = stats.bootstrap_interval(sums, lambda t, c=col: t[..., c] / t[..., 2], n_resamples=sc.n_resamples,
                                              confidence_level=sc.confidence_level, seed=sc.seed)
                entry[key] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high}
        # Scales to read the shift against: per-token JSD of randomly paired plain content
        # tokens (same domain / different domains), and JSD between domains' mean routing.
        plain_probs, token_domain = np.concatenate(acc["a"]), np.concatenate(acc["domain"])
        entry["reference_token_js_divergence"] = {
            "same domain": formattest.random_pair_js_divergence(plain_probs, token_domain, same_group=True,
                                                                seed=cfg.statistics.seed),
            "different domains": formattest.random_pair_js_divergence(plain_probs, token_domain, same_group=False,
                                                                      seed=cfg.statistics.seed),
        }
        names = sorted(plain_sums)
        if len(names) >= 2:
            entry["reference_domain_js_divergence"] = {
                f"{a} vs {b}": float(formattest.js_divergence(plain_sums[a][i], plain_sums[b][i]))
                for j, a in enumerate(names) for b in names[j + 1 :]
            }
        out["layers"][str(i)] = entry
    return out


def run_saturation(
    model_final, arm_dir: Path, store: BlockStore, cfg: AnalyzeConfig, progress: bool,
    final_capture: capture.CaptureResult | None = None, batch_order: str = "by_domain",
) -> dict:
    """OLMoE router saturation: top-k overlap of every snapshot's choices with the final model's.

    The final model's choices come from ``final_capture`` when it holds the blocks
    (no extra forward pass), else from a fresh pass. Under expert choice a token's
    experts depend on its batch, so there the final model and every snapshot see the
    same batches (in ``batch_order``) and the capture is not reused; and a curve point is the
    share of the final model's (token, expert) assignments that the snapshot also made (for top-k
    token choice the same number as the top-k overlap), its baseline that of independent
    experts taking the same shares of tokens.
    """
    from moescope.analysis import metrics

    snaps = snapshot_dirs(arm_dir)
    if not snaps:
        return {}
    rows = capture.select_eval_rows(store, max_blocks_per_domain=cfg.saturation_max_blocks_per_domain)
    index = store.index("eval")
    rows = rows[forward_order(index[rows, 0], batch_order)]
    x = torch.from_numpy(store.gather("eval", index[rows]))
    batches = list(torch.split(x, cfg.batch_blocks))
    position = {int(r): j for j, r in enumerate(final_capture.block_rows)} if final_capture is not None else {}
    by_batch = routes_by_batch(moe_layers(model_final).values())
    reuse = final_capture is not None and not by_batch
    if reuse and final_capture.tables and all(int(r) in position for r in rows):
        size = store.block_size
        take = np.concatenate([np.arange(position[int(r)] * size, (position[int(r)] + 1) * size) for r in rows])
        final = {i: t.expert_index[take] for i, t in final_capture.tables.items()}
    else:
        final = capture.capture_expert_choices(model_final, batches, assignments=by_batch)
    steps, curves = [], {i: [] for i in final}
    from tqdm.auto import tqdm

    for step, path in tqdm(snaps, desc="saturation", unit="snapshot", disable=not progress):
        model = load_snapshot(path, model_final)
        choices = capture.capture_expert_choices(model, batches, assignments=by_batch)
        steps.append(step)
        for i in final:
            if final[i].dtype == bool:  # expert choice: the experts' own selections
                curves[i].append(metrics.assignment_saturation(choices[i], final[i]))
            else:
                curves[i].append(float(metrics.router_saturation([choices[i]], final[i])[0]))
    first = next(iter(final))
    layer0 = moe_layers(model_final)[first]
    out = {
        "steps": steps,
        "n_tokens": int(x.numel()),
        "baseline": (metrics.assignment_saturation_baseline(final[first]) if final[first].dtype == bool
                     else metrics.specialization_baseline(layer0.n_experts, layer0.top_k)),
        "layers": {str(i): c for i, c in curves.items()},
    }
    if by_batch:
        out["counts"] = "assignments"  # expert choice: shares of the final model's (token, expert) assignments
    return out



def run_start_nmi(
    model_final, arm_dir: Path, store: BlockStore, cfg: AnalyzeConfig, progress: bool,
    final_capture: capture.CaptureResult, batch_order: str, unit_of_block: np.ndarray | None = None,
) -> dict[int, dict]:
    """Per MoE layer, NMI(domain; expert) of the arm's step-0 snapshot (the upcycled model, before its
    router was trained) on the same eval blocks in the same batches, and the change final - start
    (analysis/summary.py: summarize_start_nmi). Empty when the arm saved no step-0 snapshot."""
    snaps = dict(snapshot_dirs(arm_dir))
    if 0 not in snaps:
        return {}
    model = load_snapshot(snaps[0], model_final)
    start = capture.capture_routing(model, store, rows=final_capture.block_rows, batch_blocks=cfg.batch_blocks,
                                    progress=progress, desc="capture step 0", batch_order=batch_order)
    return {i: summarize_start_nmi(start.tables[i], table, store.domains, cfg.statistics,
                                   unit_of_block=unit_of_block)
            for i, table in final_capture.tables.items()}


def load_snapshot(path: Path, model_final):
    """A snapshot, on the final model's device, refused unless its MoE layers match the final model's."""
    model = load_saved_model(path, device=next(model_final.parameters()).device)
    found, expected = _expert_layout(model), _expert_layout(model_final)
    if found != expected:
        raise MoescopeError(f"{path}: MoE layers (layer: experts, top-k) {found} differ from the final "
                            f"model's {expected}")
    return model


def _expert_layout(model) -> dict[int, tuple[int, int]]:
    """{MoE layer: (experts, top-k)}: what a snapshot must share with the final model to be compared."""
    return {i: (int(layer.n_experts), int(layer.top_k)) for i, layer in moe_layers(model).items()}


def expert_parents(n_routed: int, granularity: int, n_shared: int) -> list[int]:
    """Coarse expert each routed fine-grained expert was sliced from: the coarse experts are cut into
    `granularity` slices each, the first `n_shared` slices became the shared experts
    (moe/designs.py: split_experts), and routed expert r is slice r + n_shared."""
    return [(r + n_shared) // granularity for r in range(n_routed)]

def headline(arm: dict) -> dict:
    """The numbers the demo's claims are judged by: best-layer NMI with CI and p, worst load CV."""
    layers = arm.get("layers", {})
    if not layers:
        return {}
    best = max(layers, key=lambda k: layers[k]["specialization"]["nmi"]["estimate"])
    spec = layers[best]["specialization"]
    out = {
        "best_layer": int(best),
        "nmi": spec["nmi"],
        "nmi_pvalue": spec["nmi_pvalue"],
        "load_cv_max": max(v["load"]["load_cv"]["estimate"] for v in layers.values()),
        "max_fraction_max": max(v["load"]["max_fraction"]["estimate"] for v in layers.values()),
        "n_layers": len(layers),
    }
    out.update({key: spec[key] for key in ("nmi_start", "nmi_change") if key in spec})
    if "nmi_best_of_layers" in arm:
        out["nmi_pvalue_best_of_layers"] = arm["nmi_best_of_layers"]["pvalue"]
    return out


def add_paired_loss_differences(metrics_out: dict, captures: dict[str, capture.CaptureResult], domains: list[str],
                                sc: SummaryConfig, unit_of_block: np.ndarray | None = None) -> None:
    """arms.ARM.eval_loss_vs_dense for every non-dense arm: its loss minus the dense arm's, block by block,
    resampled and sign-flipped by unit (``unit_of_block``: each eval row's unit; None = each block).

    The reference is the arm named "dense" (else the first dense arm). Every arm was
    captured on the same eval rows, which the paired test relies on (checked).
    """
    dense = [a for a, v in metrics_out["arms"].items() if v["kind"] == "dense" and a in captures]
    if not dense:
        return
    ref = "dense" if "dense" in dense else dense[0]
    r = captures[ref]
    for name, res in captures.items():
        if name == ref or metrics_out["arms"][name]["kind"] == "dense":
            continue
        if not np.array_equal(res.block_rows, r.block_rows):
            raise MoescopeError(f"arms {name} and {ref} were captured on different eval blocks")
        diff = stats.paired_loss_difference(
            res.block_loss_sum, r.block_loss_sum, res.block_tokens, res.block_domain, len(domains),
            block_unit=None if unit_of_block is None else unit_of_block[res.block_rows], n_resamples=sc.n_resamples, n_permutations=sc.n_permutations, confidence_level=sc.confidence_level,
            seed=sc.seed)
        metrics_out["arms"][name]["eval_loss_vs_dense"] = {
            "reference": ref, **diff.to_dict(domains),
            "test": "paired cluster bootstrap of units within domains (same units for both arms); p from sign "
                    "flips of whole units' differences, two-sided (unit: statistics.unit)",
        }


# --------------------------------------------------------------------------- the whole run


def analyze_run(
    run_dir: str | Path,
    cfg: AnalyzeConfig | None = None,
    *,
    arms: list[str] | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Analyse every (or the named) arm of a finished run; writes RUN/analysis/ and returns metrics."""
    cfg = cfg or AnalyzeConfig()
    run_dir = Path(run_dir)
    read_experiment(run_dir)  # not a run: refused before the lock creates anything in it
    # one process per run directory, as in training: a second analyze (or a train --resume) on RUN is
    # refused naming this one, instead of two swaps racing over RUN/analysis
    with run_directory_lock(run_dir):
        return _analyze_locked(run_dir, cfg, arms, data_dir, progress)


def _analyze_locked(run_dir: Path, cfg: AnalyzeConfig, arms: list[str] | None, data_dir: str | Path | None,
                    progress: bool) -> dict:
    from moescope.data.tokenizer import load_data_tokenizer

    experiment = read_experiment(run_dir)
    recorded = list(experiment["arms"])
    names = list(arms) if arms is not None else recorded
    unknown = [name for name in names if name not in recorded]
    if unknown or not names:
        problem = "no arm given" if not names else "an empty arm name" if not unknown[0] else f"unknown arm {unknown[0]!r}"
        raise MoescopeError(f"{problem}: the arms of {run_dir} are "
                            f"{', '.join(recorded) or 'none (its experiment.json lists no arm)'}")
    for name in names:  # every arm's models checked before anything of the analysis is replaced
        check_arm_models(run_dir, name, experiment)
    store = BlockStore.open(resolve_data_dir(run_dir, experiment, data_dir))
    store.verify_blocks(("eval",))  # a token id past the vocabulary is one line here, not an IndexError in a forward pass
    for domain in [d for d in store.domains if d in (cfg.token_type_domain, *cfg.format_test_domains)]:
        for _ in store.texts("eval", domain):  # a bad line refused before any routing table is replaced
            pass
    units = eval_block_units(store)  # before anything is written: a bad sources file is one line here
    if units.note:
        log.warning("analyze: eval blocks are the resampling unit: %s", units.note)
    tokenizer = load_data_tokenizer(store.root)
    final = run_dir / "analysis"
    # The whole analysis is built in a staging directory beside RUN/analysis and swapped in at the end
    # (io/atomic.py: atomic_directory): RUN/analysis is the complete old analysis or the complete new one,
    # never a mix; a killed analysis leaves a staging directory (or the old one's trash) that the next
    # analyze removes and that no reader opens (they read RUN/analysis/... only).
    with atomic_directory(final, overwrite=True, durable=True) as stage:
        metrics_out = write_analysis(stage, run_dir, names, cfg, store, units, tokenizer, progress)
        carry_over(final, stage)
    return metrics_out


# What `analyze RUN` writes into RUN/analysis/, replaced whole each time. Anything else there was put by
# another command after an analysis (today: seeds.json, the between-seed table of `demo --seeds`) and still
# belongs to the run: carry_over copies it into the new analysis rather than dropping it with the old one.
ANALYSIS_OUTPUTS = frozenset({"metrics.json", "viewer.json", "routing"})


def carry_over(old: Path, new: Path) -> list[str]:
    """Copy what other commands wrote into the old analysis directory `old` into `new` (not yet swapped in);
    dot-named entries are temporaries of killed writes, not results. Returns the names copied."""
    if not old.is_dir():
        return []
    copied = []
    for entry in sorted(old.iterdir()):
        if entry.name in ANALYSIS_OUTPUTS or entry.name.startswith(".") or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)
        copied.append(entry.name)
    if copied:
        log.info("analyze: kept %s of the previous analysis (written by other commands)", ", ".join(copied))
    return copied


def write_analysis(out_dir: Path, run_dir: Path, names: list[str], cfg: AnalyzeConfig, store: BlockStore,
                   units: BlockUnits, tokenizer, progress: bool) -> dict:
    """Capture and summarize every arm in `names`, writing metrics.json, viewer.json and routing/ into
    `out_dir` (the staging directory); returns metrics.json's content."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    rows = capture.select_eval_rows(store, max_blocks_per_domain=cfg.max_blocks_per_domain)

    metrics_out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "run": str(run_dir),
        "data_dir": str(store.root),
        "domains": store.domains,
        "n_eval_blocks": int(rows.size),
        "block_size": store.block_size,
        "statistics": statistics_header(cfg.statistics,
                                        units.describe(rows, store.index("eval")[rows, 0], store.domains)),
        "config": asdict(cfg),
        "environment": environment_info(),
        "arms": {},
    }
    viewer: dict[str, Any] = {"arms": {}}
    block_losses: dict[str, capture.CaptureResult] = {}
    for name in names:
        arm_dir = run_dir / "arms" / name
        model = load_saved_model(arm_dir / "final", device=device)
        is_moe = bool(moe_layers(model))
        order = resolve_batch_order(cfg.batch_order, routes_by_batch(moe_layers(model).values()))
        log.info("analyze: arm %s (%s), %s batches", name, "MoE" if is_moe else "dense", order)
        res = capture.capture_routing(model, store, rows=rows, batch_blocks=cfg.batch_blocks, capture=is_moe,
                                      progress=progress, desc=f"capture {name}", batch_order=order)
        arm: dict[str, Any] = {
            "kind": "moe" if is_moe else "dense",
            "batch_order": order,
            "eval_loss": summarize_eval_loss(res.block_loss_sum, res.block_tokens, res.block_domain, store.domains,
                                             cfg.statistics, block_unit=units.of_block[res.block_rows]),
        }
        if is_moe:
            arm["layers"] = {}
            # shared experts never go through the router: named per layer, kept out of NMI and load
            moe_cfg = getattr(model, "moe_config", None)
            n_shared = int(getattr(moe_cfg, "n_shared_experts", 0) or 0)
            granularity = int(getattr(moe_cfg, "expert_granularity", 1) or 1)
            nulls: list[np.ndarray] = []
            for i, table in res.tables.items():
                capture.save_table(table, out_dir / "routing" / name / f"{i}.npz")
                summary = summarize_layer(table, store.domains, cfg.statistics, n_shared_experts=n_shared,
                                          nmi_nulls=nulls, unit_of_block=units.of_block)
                label_expert_tokens(summary, tokenizer)
                if granularity > 1:  # fine-grained: the coarse expert each routed expert was sliced from
                    summary["expert_granularity"] = granularity
                    summary["expert_parent"] = expert_parents(table.n_experts, granularity, n_shared)
                arm["layers"][str(i)] = summary
            arm["nmi_best_of_layers"] = best_layer_nmi_test(arm["layers"], nulls)
            if cfg.token_type_domain in store.domains:
                types = token_types_for_capture(store, tokenizer, res, cfg.token_type_domain)
                if (types >= 0).any():
                    arm["token_types"] = {
                        str(i): summarize_token_types(types, t, list(tokentypes.TOKEN_TYPES), cfg.statistics,
                                                      unit_of_block=units.of_block)
                        for i, t in res.tables.items()
                    }
            arm["format_test"] = run_format_test(model, tokenizer, store, cfg)
            arm["saturation"] = run_saturation(model, arm_dir, store, cfg, progress, final_capture=res,
                                               batch_order=order)
            for i, start in run_start_nmi(model, arm_dir, store, cfg, progress, res, order, units.of_block).items():
                arm["layers"][str(i)]["specialization"].update(start, nmi_start_step=0)
            arm["headline"] = headline(arm)
            sample_rows = choose_sample_rows(res.block_rows, res.block_domain, cfg.viewer_samples_per_domain)
            viewer["arms"][name] = viewer_arm(res.tables, sample_rows, store.domains,
                                              _pieces_for_rows(store, tokenizer, sample_rows),
                                              n_shared_experts=n_shared)
        metrics_out["arms"][name] = arm
        block_losses[name] = dataclasses.replace(res, tables={})  # the losses only: routing tables are large
        del model

    add_paired_loss_differences(metrics_out, block_losses, store.domains, cfg.statistics, units.of_block)
    # after the forward passes: whether they ran the compiled grouped GEMM (unknown before the first one)
    metrics_out["environment"]["native_grouped_kernel"] = native_status()

    atomic_write_json(out_dir / "metrics.json", json_ready(metrics_out))
    atomic_write_json(out_dir / "viewer.json", json_ready(viewer), indent=None)
    return metrics_out
