"""Human review of a built data directory: random samples, summary statistics, length plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moescope.data.blocks import SPLITS, BlockStore
from moescope.data.split import domain_seed


@dataclass
class Sample:
    split: str
    domain: str
    kind: str  # "text" or "block"
    index: int
    content: str
    meta: dict[str, Any] = field(default_factory=dict)


def text_lengths(store: BlockStore, split: str, domain: str) -> np.ndarray:
    return np.array([len(r["text"]) for r in store.texts(split, domain)], dtype=np.int64)


def summary_rows(store: BlockStore) -> list[dict[str, Any]]:
    """One row per (split, domain): counts from the manifest plus text length quantiles."""
    rows = []
    for split in SPLITS:
        for d in store.domains:
            n_blocks = store.n_blocks(split, d)  # a missing split: one error naming the manifest
            s = store.manifest["splits"][split][d]  # build statistics: a hand-made manifest may lack them
            lens = text_lengths(store, split, d)
            tokens, chars = s.get("n_tokens"), s.get("n_chars")
            rows.append({
                "split": split, "domain": d, "texts": s.get("n_texts"), "tokens": tokens,
                "blocks": n_blocks, "tail_dropped": s.get("tail_tokens_dropped"),
                "chars_p50": int(np.median(lens)) if len(lens) else 0,
                "chars_p95": int(np.percentile(lens, 95)) if len(lens) else 0,
                "tokens_per_char": round(tokens / max(1, chars), 3) if isinstance(tokens, int) and isinstance(chars, int) else None,
            })
    return rows


def leakage_lines(store: BlockStore) -> list[str]:
    """What the build did to keep eval held out (manifest keys; older builds lack some)."""
    m = store.manifest
    lines = []
    rule = m.get("split_rule", {}).get("level")
    if rule:
        lines.append(f"split by: {rule}")
    docs = {s: {d: m["splits"].get(s, {}).get(d, {}).get("n_documents") for d in store.domains} for s in SPLITS}
    if all(v is not None for s in SPLITS for v in docs[s].values()):
        lines.append("source documents: " + ", ".join(
            f"{d} {docs['train'][d]} train / {docs['eval'][d]} eval" for d in store.domains))
    near = m.get("near_duplicates")
    if near:
        lines.append(near_duplicates_line(near, store.domains))
    check = m.get("leakage_check")
    if check:
        lines.append(f"leakage check: {'passed' if check.get('passed') else 'FAILED'} "
                     f"(exact {check.get('raw_overlap')}, whitespace-normalized {check.get('normalized_overlap')}, "
                     f"shared documents {check.get('document_overlap', 'not checked')})")
    return lines


def near_duplicates_line(near: dict, domains: list[str]) -> str:
    """What the build did with near-duplicates: joined documents into groups (split rules >= 4), or
    removed held-out copies (builds before that)."""
    if "documents_joined" in near:
        joined = near["documents_joined"]
        return (f"documents joined by near-duplicate texts (Jaccard >= {near.get('threshold')}), kept on one side: "
                + ", ".join(f"{d} {joined.get(d, 0)}" for d in domains))
    removed = near.get("eval_removed", {})
    return (f"near-duplicates removed from eval (Jaccard >= {near.get('threshold')}): "
            + ", ".join(f"{d} {removed.get(d, 0)}" for d in domains))


def draw_samples(store: BlockStore, n: int, seed: int = 0) -> list[Sample]:
    """`n` random raw texts and `n` random decoded blocks per domain and split."""
    from moescope.data.tokenizer import load_data_tokenizer

    tok = load_data_tokenizer(store.root)
    out: list[Sample] = []
    for split in SPLITS:
        for d in store.domains:
            rng = np.random.default_rng(domain_seed(seed, f"inspect/{split}/{d}"))
            records = list(store.texts(split, d))
            for i in sorted(rng.choice(len(records), size=min(n, len(records)), replace=False)):
                rec = records[int(i)]
                meta = {k: v for k, v in rec.items() if k not in ("text",) and not isinstance(v, (dict, list))}
                out.append(Sample(split, d, "text", int(i), rec["text"], meta))
            blocks = store.blocks(split, d)
            for i in sorted(rng.choice(len(blocks), size=min(n, len(blocks)), replace=False)):
                out.append(Sample(split, d, "block", int(i), tok.decode(np.asarray(blocks[int(i)]).tolist())))
    return out


def plot_length_distribution(store: BlockStore, path: Path) -> Path:
    """Histogram of text lengths (characters, log scale) per domain, train and eval overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    from moescope.io.atomic import atomic_write_bytes

    domains = store.domains
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), squeeze=False)
    for ax, d in zip(axes[0], domains):
        all_lens = [text_lengths(store, s, d) for s in SPLITS]
        nonempty = [x for x in all_lens if len(x)]
        lo = max(1, min(int(x.min()) for x in nonempty)) if nonempty else 1
        hi = max(int(x.max()) for x in nonempty) if nonempty else 10
        bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 2)), 30)
        for split, lens in zip(SPLITS, all_lens):
            # each bar is the share of the split's texts, so train and eval compare directly
            weights = np.full(len(lens), 1.0 / max(1, len(lens)))
            ax.hist(lens, bins=bins, weights=weights, alpha=0.6, label=f"{split} (n={len(lens)})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(d)
        ax.set_xlabel("text length (characters)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of texts")
    fig.suptitle(f"text lengths per domain: {store.root.name}")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
