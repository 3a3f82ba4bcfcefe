"""Partitions on disk: one directory per partition (a `files` data source) plus the report.

Layout of a partition output directory::

    OUT/partition_00/texts.jsonl   {"text", "id", "source_domain", "copy": "own"|"overlap", "partition"}
    OUT/partition_01/texts.jsonl   ...
    OUT/assignment.npz             member [n, N] bool, primary, base_labels, weights (kept texts order)
    OUT/centroids.npy              [N, dim] for `clustered` (what c-BTM weighs contexts by)
    OUT/encoder.json               how texts were embedded (+ OUT/encoder.npz for the tf-idf fallback)
    OUT/report.json / report.md    sizes, overlaps, top terms, purity, ARI, timings, provenance
    OUT/partition_domains.png      texts of each domain per partition (when domains are known)

Each partition directory works as a data source:
``SourceConfig(backend="files", paths=[str(OUT / "partition_00")])``.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text
from moescope.io.jsonfile import read_json_object
from moescope.partition.embedding import SentenceEncoder, TfidfSvdEncoder

if TYPE_CHECKING:  # the outcome type only; this module does not run the partitioner
    from moescope.partition.partitioner import PartitionOutcome

REPORT_JSON = "report.json"
PARTITION_GLOB = "partition_*"


def partition_dir_name(p: int) -> str:
    return f"partition_{p:02d}"


@dataclass
class Corpus:
    """Texts to partition, with their ids and (optional) domain labels, in one order."""

    texts: list[str]
    ids: list[str]
    domains: list[str] | None
    source: dict  # provenance: where the texts came from

    def subsample(self, max_per_domain: int | None, seed: int) -> "Corpus":
        """At most `max_per_domain` texts of each domain (seeded), keeping the input order."""
        if max_per_domain is None:
            return self
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(self.domains or [""] * len(self.texts)):
            groups.setdefault(d, []).append(i)
        rng = random.Random(seed)
        keep = sorted(i for rows in groups.values() for i in (rows if len(rows) <= max_per_domain else rng.sample(rows, max_per_domain)))
        return Corpus(
            texts=[self.texts[i] for i in keep],
            ids=[self.ids[i] for i in keep],
            domains=[self.domains[i] for i in keep] if self.domains is not None else None,
            source={**self.source, "max_texts_per_domain": max_per_domain, "subsample_seed": seed},
        )


def read_data_dir_corpus(data_dir: str | Path, split: str = "train") -> Corpus:
    """The split texts of a built data directory, domain labels from the manifest."""
    from moescope.data.blocks import BlockStore

    store = BlockStore.open(data_dir)
    texts, ids, domains = [], [], []
    for domain in store.domains:
        for rec in store.texts(split, domain):
            texts.append(rec["text"])
            ids.append(str(rec.get("id", len(ids))))
            domains.append(domain)
    return Corpus(texts, ids, domains, {"kind": "data_dir", "path": str(data_dir), "split": split})


def read_source_corpus(build_cfg) -> Corpus:
    """Every domain of a `DataBuildConfig` through its source (builtin, hf or files)."""
    from moescope.data.sources import load_domain_texts

    texts, ids, domains = [], [], []
    for domain_cfg in build_cfg.domains:
        for st in load_domain_texts(domain_cfg, seed=build_cfg.seed):
            texts.append(st.text)
            ids.append(st.id)
            domains.append(domain_cfg.name)
    src = {"kind": "sources", "seed": build_cfg.seed,
           "domains": {d.name: {"backend": d.source.backend, "name": d.builtin_name if d.source.backend == "builtin"
                                else (d.source.name or d.source.paths)} for d in build_cfg.domains}}
    return Corpus(texts, ids, domains, src)


def write_partitions(
    outcome: PartitionOutcome,
    ids: Sequence[str],
    out_dir: str | Path,
    *,
    report: dict,
    overwrite: bool = False,
) -> Path:
    """Write every partition, the assignment, centroids, encoder and report, atomically.

    `ids` are the ids of the kept texts (outcome.texts order).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MoescopeError(f"{out_dir} already exists (pass --overwrite to replace it)")
    a = outcome.assignment
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for p in range(a.n_partitions):
            lines = []
            for i in np.flatnonzero(a.member[:, p]):
                rec = {
                    "text": outcome.texts[i],
                    "id": ids[i],
                    "source_domain": outcome.domains[i] if outcome.domains is not None else None,
                    "copy": "own" if a.primary[i] == p else "overlap",
                    "partition": p,
                }
                lines.append(json.dumps(rec, ensure_ascii=False))
            atomic_write_text(tmp / partition_dir_name(p) / "texts.jsonl", "\n".join(lines) + "\n")
        buf = io.BytesIO()
        np.savez(buf, member=a.member, primary=a.primary, base_labels=a.base_labels, weights=a.weights,
                 kept_index=outcome.kept_index)
        atomic_write_bytes(tmp / "assignment.npz", buf.getvalue())
        if a.centroids is not None:
            buf = io.BytesIO()
            np.save(buf, a.centroids.astype(np.float32))
            atomic_write_bytes(tmp / "centroids.npy", buf.getvalue())
        if outcome.embedding is not None:
            enc = outcome.embedding.encoder
            atomic_write_json(tmp / "encoder.json", enc.describe())
            if isinstance(enc, TfidfSvdEncoder):
                enc.save(tmp / "encoder.npz")
        atomic_write_json(tmp / REPORT_JSON, report)
        atomic_write_text(tmp / "report.md", render_report_markdown(report))
        if report.get("domain_counts"):
            plot_domain_counts(report, tmp / "partition_domains.png")
    return out_dir


def partition_dirs(out_dir: str | Path) -> list[Path]:
    """The partition directories of a partition output, in order."""
    dirs = sorted(p for p in Path(out_dir).glob(PARTITION_GLOB) if p.is_dir())
    if not dirs:
        raise MoescopeError(f"{out_dir}: no {PARTITION_GLOB} directories (not a `moescope partition` output)")
    return dirs


def read_partition_texts(part_dir: str | Path) -> list[dict]:
    path = Path(part_dir) / "texts.jsonl"
    if not path.is_file():
        raise MoescopeError(f"missing {path}")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_centroids(out_dir: str | Path) -> np.ndarray:
    path = Path(out_dir) / "centroids.npy"
    if not path.is_file():
        raise MoescopeError(f"{path} not found: only `clustered` partitions have centroids")
    return np.load(path)


def open_encoder(out_dir: str | Path, *, cache_dir: Path | None = None) -> SentenceEncoder | TfidfSvdEncoder:
    """The encoder that embedded the partitioned corpus, to embed new contexts the same way."""
    out_dir = Path(out_dir)
    path = out_dir / "encoder.json"
    if not path.is_file():
        raise MoescopeError(f"{path} not found: only `clustered` partitions record their encoder")
    desc = read_json_object(path, {"backend": str})
    if desc["backend"] == TfidfSvdEncoder.backend:
        return TfidfSvdEncoder.load(out_dir / "encoder.npz")
    return SentenceEncoder(desc["model"], cache_dir=cache_dir, max_tokens=desc.get("max_tokens"), show_progress=False)


def render_report_markdown(report: dict) -> str:
    """A short human-readable version of report.json."""
    cfg = report["config"]
    lines = [
        f"# Partitions: {cfg['strategy']}, N={cfg['n_partitions']}",
        "",
        f"- texts: {report['n_texts_kept']} kept of {report['n_texts_input']} "
        f"({report['n_dropped_short']} shorter than {cfg['min_article_length_chars']} chars dropped)",
        f"- overlap ratio {cfg['overlap_ratio']}, balance +-{cfg['balance_tolerance']:.0%} in "
        f"{report.get('balance_unit_chosen') or cfg['balance_unit']}: "
        f"{'met' if report['within_band'] else 'NOT met'}; {report['n_moved_by_rebalance']} texts moved",
    ]
    if "silhouette_by_unit" in report:
        sil = report["silhouette_by_unit"]
        lines.append(f"- balance unit auto: cosine silhouette {', '.join(f'{u} {v:.3f}' for u, v in sil.items())}; "
                     "the better-separated clustering is kept")
    if "adjusted_rand_index" in report:
        lines.append(
            f"- against domains {report['domains']}: ARI {report['adjusted_rand_index']:.3f} "
            f"(before rebalancing {report['adjusted_rand_index_before_rebalance']:.3f}), purity {report['purity']:.3f}"
        )
    if "embedding" in report:
        e = report["embedding"]
        lines.append(f"- embeddings: {e['backend']} {e.get('model', '')} in {e['seconds']:.1f} s "
                     f"({e['n_computed']} computed, {e['n_cached']} from cache)")
        if e.get("fallback_reason"):
            lines.append(f"- FALLBACK: {e['fallback_reason']}")
    lines += ["", "| partition | texts | own | overlap added | chars | top terms |", "|---|---|---|---|---|---|"]
    for p in range(cfg["n_partitions"]):
        lines.append(
            f"| {p} | {report['sizes'][p]} | {report['own_sizes'][p]} | {report['overlap_added'][p]} | "
            f"{report['sizes_chars'][p]} | {', '.join(report['top_terms'][p])} |"
        )
    if report.get("domain_counts"):
        doms = report["domains"]
        lines += ["", "| partition | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
        for p, row in enumerate(report["domain_counts"]):
            lines.append(f"| {p} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_domain_counts(report: dict, path: Path) -> Path:
    """Heatmap: share of each partition's texts per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(report["domain_counts"], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * counts.shape[1], 1.2 + 0.6 * counts.shape[0]))
    im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(counts):
        ax.text(c, r, f"{int(v)}", ha="center", va="center", color="white" if share[r, c] < 0.6 else "black")
    ax.set_xticks(range(counts.shape[1]), report["domains"])
    ax.set_yticks(range(counts.shape[0]), [f"partition {p}" for p in range(counts.shape[0])])
    ari = report.get("adjusted_rand_index")
    ax.set_title(f"{report['config']['strategy']}: texts per domain" + (f" (ARI {ari:.2f})" if ari is not None else ""))
    fig.colorbar(im, ax=ax, label="share of partition")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
