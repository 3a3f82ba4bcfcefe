"""Clustering speed: a full MDL merge at scale, the one-row C update against recomputing C,
and the ensemble distances (component decomposition against one dense Hungarian solve).

Synthetic routing table: `--layers` x `--experts` (layer, expert) components (default
125 x 8 = 1,000), top-1, `--tokens` tokens (default 100,000); every token has a kind
that fixes its expert in each layer with probability 0.5 (an expert pathway) and
picks a random expert otherwise.  Compared variants run interleaved in rounds in
this one process; the table gives medians and the ratio of medians.

    .venv/bin/python benchmarks/bench_cluster.py [--tokens 100000] [--layers 125] [--members 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from moescope.cluster.distances import compute_distances, perm_invariant_hamming
from moescope.cluster.ensemble import normalize_ensemble
from moescope.cluster.merge import MergeConfig, compute_coactivation, merge_iteration, pack_masks, unpack_masks


def synthetic_masks(rng: np.random.Generator, n_tokens: int, n_layers: int, n_experts: int, follow: float = 0.5) -> np.ndarray:
    kind = rng.integers(0, n_experts, size=n_tokens)
    masks = np.zeros((n_tokens, n_layers * n_experts), dtype=bool)
    rows = np.arange(n_tokens)
    for layer in range(n_layers):
        expert = rng.permutation(n_experts)[kind]
        off = rng.random(n_tokens) >= follow
        expert[off] = rng.integers(0, n_experts, size=off.sum())
        masks[rows, layer * n_experts + expert] = True
    return masks


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def dense_hamming(x: np.ndarray, y: np.ndarray) -> int:
    """The plain way: one Hungarian solve on the full contingency table."""
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((xi.max() + 1, yi.max() + 1), dtype=np.int64)
    np.add.at(table, (xi, yi), 1)
    r, c = linear_sum_assignment(table, maximize=True)
    return int(x.size - table[r, c].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=125)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.layers * args.experts
    rows: list[tuple[str, str, str, str]] = []

    masks = synthetic_masks(rng, args.tokens, args.layers, args.experts)
    print(f"{n} components x {args.tokens:,} tokens, density {masks.mean():.4f}")

    # 1. one full merge down to k = 1 (incremental C update)
    full_t, hist = timed(lambda: merge_iteration(masks, MergeConfig(alpha=1.0)))
    rows.append(("full merge to k=1 (incremental C)", f"{full_t:.1f} s", "", f"{hist.n_steps} steps"))

    # 2. the C update of one merge step at k = n, on the real state, both variants interleaved:
    #    the one-row update merge_iteration does (AND + popcount of the packed group masks
    #    against the merged one) vs recomputing C = M_g^T M_g from the group masks (what
    #    MergeConfig(recompute_coactivation=True) does every step)
    packed = pack_masks(masks)
    a, b = (int(v) for v in hist.merges[0])
    merged = packed.copy()
    merged[a] |= merged[b]
    row_t, full_c_t = [], []
    for _ in range(args.rounds):
        t, row = timed(lambda: np.bitwise_count(merged & merged[a]).sum(axis=1, dtype=np.int64))
        row_t.append(t)
        t, c_full = timed(lambda: compute_coactivation(unpack_masks(merged, args.tokens)))
        full_c_t.append(t)
        assert np.array_equal(row, c_full[a])
    inc, rec = statistics.median(row_t), statistics.median(full_c_t)
    rows.append((f"C update at k={n}: one row (incremental)", f"{inc * 1e3:.1f} ms", "1.00x", ""))
    rows.append((f"C update at k={n}: recompute C", f"{rec * 1e3:.0f} ms", f"{rec / inc:.0f}x", "slower"))
    # recomputing costs ~ k^2 N per step, so over a whole run ~ sum_k (k/n)^2 of the step at k = n
    est = rec * sum((k / n) ** 2 for k in range(2, n + 1))
    rows.append(("full merge to k=1 with recompute (estimated)", f"{est + full_t:.0f} s", f"{(est + full_t) / full_t:.0f}x",
                 "full merge + sum_k (k/n)^2 x step above"))
    # and a real side-by-side at a size where recomputing every step finishes quickly
    small = masks[:, : min(n, 160)]
    inc_t, rec_t = [], []
    for _ in range(args.rounds):
        t, h_inc = timed(lambda: merge_iteration(small, MergeConfig(alpha=1.0)))
        inc_t.append(t)
        t, h_rec = timed(lambda: merge_iteration(small, MergeConfig(alpha=1.0, recompute_coactivation=True)))
        rec_t.append(t)
        assert np.array_equal(h_inc.assignments, h_rec.assignments)
    si, sr = statistics.median(inc_t), statistics.median(rec_t)
    rows.append((f"full merge, {small.shape[1]} components: incremental", f"{si:.2f} s", "1.00x", "measured"))
    rows.append((f"full merge, {small.shape[1]} components: recompute C", f"{sr:.2f} s", f"{sr / si:.1f}x", "measured, same history"))

    # 3. an ensemble: one merge per batch (fresh tokens, same pathways' statistics), then distances
    hists = [hist]
    member_t = []
    for m in range(1, args.members):
        batch = synthetic_masks(np.random.default_rng(100 + m), args.tokens, args.layers, args.experts)
        t, h = timed(lambda: merge_iteration(batch, MergeConfig(alpha=1.0, seed=m)))
        member_t.append(t)
        hists.append(h)
        del batch
    if member_t:
        rows.append((f"merge of each other member ({len(member_t)})", f"{statistics.median(member_t):.1f} s", "", "median"))
    t_norm, norm = timed(lambda: normalize_ensemble(hists))
    rows.append((f"normalize {args.members} members", f"{t_norm * 1e3:.0f} ms", "", f"{norm.n_steps + 1} steps"))
    n_pairs = args.members * (args.members - 1) // 2
    for method in ("perm_invariant_hamming", "pair_matching"):
        t, _ = timed(lambda: compute_distances(norm, method))
        rows.append((f"distances, {method}, all steps", f"{t:.1f} s", "", f"{n_pairs} pairs x {norm.n_steps + 1} steps"))

    # 4. perm-invariant Hamming: component decomposition vs one dense Hungarian solve, interleaved
    steps = np.linspace(0, norm.n_steps, 12).astype(int)
    pairs = [(0, j) for j in range(1, min(args.members, 4))]
    fast_t, dense_t = [], []
    for _ in range(args.rounds):
        for which in ("fast", "dense"):
            fn = perm_invariant_hamming if which == "fast" else dense_hamming
            t0 = time.perf_counter()
            vals = [fn(norm.assignments[i, s], norm.assignments[j, s]) for s in steps for i, j in pairs]
            (fast_t if which == "fast" else dense_t).append(time.perf_counter() - t0)
            if which == "fast":
                fast_vals = vals
            else:
                assert vals == fast_vals
    ft, dt = statistics.median(fast_t), statistics.median(dense_t)
    per = len(steps) * len(pairs)
    rows.append(("perm-invariant Hamming, decomposed", f"{ft / per * 1e3:.2f} ms", "1.00x", f"per pair-step, {per} samples"))
    rows.append(("perm-invariant Hamming, dense Hungarian", f"{dt / per * 1e3:.2f} ms", f"{dt / ft:.1f}x", "slower"))

    iu = np.triu_indices(args.members, 1)
    d = compute_distances(norm, steps=[int(s) for s in steps])
    print()
    print(f"{'measurement':<46} {'time':>10} {'ratio':>8}  note")
    for name, t, r, note in rows:
        print(f"{name:<46} {t:>10} {r:>8}  {note}")
    print("\nmean perm-invariant Hamming distance between members (fraction of components):")
    print("  k:    " + " ".join(f"{int(k):>6}" for k in norm.n_groups.mean(axis=0)[steps]))
    print("  dist: " + " ".join(f"{v:>6.3f}" for v in d[:, iu[0], iu[1]].mean(axis=1) / n))
    print("\nnote: 2-core machine shared with other jobs; variants interleaved in rounds, medians reported.")


if __name__ == "__main__":
    main()
