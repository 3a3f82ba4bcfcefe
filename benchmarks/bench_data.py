"""Data pipeline throughput vs the raw tokenizer, and peak memory at two corpus sizes.

    .venv/bin/python benchmarks/bench_data.py [--small-mb 0.5] [--large-mb 3.0] [--rounds 3]

Texts: the built-in corpus (stdlib code, gensim prose, generated math), mixed. The tokenizer
is the build's own byte-level BPE (vocab 4096) trained once on the small corpus.

Columns
- raw encode:   tokenizer.backend_tokenizer.encode_batch on the texts in batches of 512
                (the library doing nothing but tokenize).
- pack stage:   what build_dataset runs per split/domain: JSONL write + sha256 + encode
                + EOS join + block cut + memmap write (moescope.data.build._write_split).
- raw_fast:     the same with encode_batch_fast (no offsets; what the pack stage calls).
- ratio:        pack / raw, per round, in process CPU time (single-threaded tokenizer, so CPU
                time is the cost and is robust to a loaded machine) and in wall time;
                the table shows medians over rounds (target <= 1.25). Throughputs use the
                best round's CPU time.
Variants are interleaved in rounds in one process so load from other processes on a
shared machine hits both alike.

Near-duplicates: CPU time of moescope.data.split.find_near_duplicates (MinHash signatures of
both sides, LSH index of the train side, queries) with 5% of the texts as the eval side.

Peak memory: each size is packed in a fresh spawned process that streams its texts from
a JSONL file; we report ru_maxrss after set-up and at the end (the growth is what packing
costs; it must not grow with corpus size). The whole build_dataset also holds the kept
texts in memory (they are split and hashed as lists), which is proportional to the size
target, and is reported on its own line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus(mb_per_domain: float, seed: int = 0) -> list:
    from moescope.data.config import DomainConfig
    from moescope.data.sources import load_domain_texts

    texts = []
    for name in ("code", "math", "prose"):
        texts += load_domain_texts(DomainConfig(name=name, target_mb=mb_per_domain), seed=seed)
    return texts


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pack_child(tok_dir: str, jsonl: str, out: str, q) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    from moescope.data.packing import encoder_for, pack_to_file

    tok = AutoTokenizer.from_pretrained(tok_dir)
    encode = encoder_for(tok)
    encode(["warm up the tokenizer"])
    base = rss_mb()

    def stream():
        with open(jsonl, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]

    stats = pack_to_file(stream(), encode, eos_id=tok.eos_token_id, block_size=512, dtype=np.dtype(np.uint16),
                         path=Path(out), batch_texts=512, batch_chars=250_000)
    q.put({"base_mb": base, "peak_mb": rss_mb(), "tokens": stats.n_tokens})


def time_raw(backend, texts: list[str], batch: int = 512, fast: bool = False) -> tuple[float, float]:
    """(wall s, CPU s) of encode_batch (or encode_batch_fast: no offsets) over the texts."""
    encode = backend.encode_batch_fast if fast else backend.encode_batch
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch):
        encode(texts[i : i + batch], add_special_tokens=False)
    return time.perf_counter() - w0, time.process_time() - c0


def time_pack(tmp: Path, items: list, tok, cfg) -> tuple[float, float]:
    from tqdm import tqdm

    from moescope.data.build import _write_split
    from moescope.data.packing import encoder_for

    encode = encoder_for(tok)
    w0, c0 = time.perf_counter(), time.process_time()
    with tqdm(disable=True) as bar:
        _write_split(tmp, "train", "all", items, encode, tok.eos_token_id, cfg, __import__("numpy").dtype("uint16"), bar)
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small-mb", type=float, default=0.5, help="MB per domain, small corpus (x3 domains)")
    ap.add_argument("--large-mb", type=float, default=3.0, help="MB per domain, large corpus (x3 domains)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from moescope.data.config import DataBuildConfig
    from moescope.data.tokenizer import train_bpe

    sizes = {"small": corpus(args.small_mb), "large": corpus(args.large_mb)}
    tok = train_bpe((t.text for t in sizes["small"]), vocab_size=4096)
    backend = tok.backend_tokenizer
    cfg = DataBuildConfig(block_size_tokens=512)
    mb = {k: sum(len(t.text.encode()) for t in v) / 1e6 for k, v in sizes.items()}

    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for name, items in sizes.items():
            texts = [t.text for t in items]
            time_raw(backend, texts[:200])  # warm-up
            raw, pack, wall_ratios, cpu_ratios, fast_ratios = [], [], [], [], []
            for _ in range(args.rounds):
                r = time_raw(backend, texts)
                f = time_raw(backend, texts, fast=True)
                p = time_pack(tmp, items, tok, cfg)
                raw.append(r[1])
                pack.append(p[1])
                wall_ratios.append(p[0] / r[0])
                cpu_ratios.append(p[1] / r[1])
                fast_ratios.append(p[1] / f[1])
            rows.append((name, mb[name], mb[name] / min(raw), mb[name] / min(pack), statistics.median(cpu_ratios),
                         statistics.median(wall_ratios), statistics.median(fast_ratios)))

        # peak memory of the streaming pack stage, fresh process per size
        tok_dir = tmp / "tok"
        tok.save_pretrained(str(tok_dir))
        mem = {}
        ctx = mp.get_context("spawn")
        for name, items in sizes.items():
            jsonl = tmp / f"{name}.jsonl"
            with open(jsonl, "w", encoding="utf-8") as fh:
                for t in items:
                    fh.write(json.dumps({"text": t.text}) + "\n")
            q = ctx.Queue()
            proc = ctx.Process(target=_pack_child, args=(str(tok_dir), str(jsonl), str(tmp / f"{name}.bin"), q))
            proc.start()
            mem[name] = q.get()
            proc.join()

        # cross-split near-duplicate removal (MinHash LSH), 5% of each corpus as the eval side
        near = {}
        for name, items in sizes.items():
            from moescope.data.split import find_near_duplicates

            n_eval = len(items) // 20
            c0 = time.process_time()
            found = find_near_duplicates(items[n_eval:], items[:n_eval])
            near[name] = (time.process_time() - c0, len(items), len(found.removed))

        # whole build (sources + split + BPE training + pack), default built-in config
        from moescope.data.build import build_dataset

        build_cfg = DataBuildConfig()
        t0 = time.perf_counter()
        store = build_dataset(build_cfg, tmp / "full")
        full_s = time.perf_counter() - t0
        full_mb = sum(store.manifest["splits"][s][d]["n_bytes"] for s in ("train", "eval") for d in store.domains) / 1e6
        timings = store.manifest["timings"]

    print(f"\nmachine: {os.cpu_count()} CPUs (shared with other agents), TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM')}, rounds={args.rounds}\n")
    print(f"{'corpus':8s} {'MB':>6s} {'raw MB/CPU-s':>13s} {'pack MB/CPU-s':>14s} {'pack/raw CPU':>13s} "
          f"{'pack/raw wall':>14s} {'pack/raw_fast CPU':>18s}")
    for name, size, raw_mbs, pack_mbs, cpu_ratio, wall_ratio, fast_ratio in rows:
        print(f"{name:8s} {size:6.2f} {raw_mbs:13.2f} {pack_mbs:14.2f} {cpu_ratio:13.3f} {wall_ratio:14.3f} "
              f"{fast_ratio:18.3f}")
    print(f"\n{'corpus':8s} {'MB':>6s} {'RSS after set-up MB':>20s} {'peak RSS MB':>12s} {'growth MB':>10s}")
    for name in sizes:
        m = mem[name]
        print(f"{name:8s} {mb[name]:6.2f} {m['base_mb']:20.1f} {m['peak_mb']:12.1f} {m['peak_mb'] - m['base_mb']:10.1f}")
    print(f"\n{'corpus':8s} {'MB':>6s} {'texts':>7s} {'near-dup CPU s':>15s} {'MB/CPU-s':>9s} {'found':>6s}")
    for name, (cpu, n, found) in near.items():
        print(f"{name:8s} {mb[name]:6.2f} {n:7d} {cpu:15.2f} {mb[name] / cpu:9.2f} {found:6d}")
    print(f"\nfull default build: {full_mb:.2f} MB of text in {full_s:.1f} s ({full_mb / full_s:.2f} MB/s); stage times (s): "
          + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
