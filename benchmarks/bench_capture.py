"""Cost of routing capture against a plain eval forward (claim: at most +10%).

Both variants run the same blocks through the same model and compute the per-block
loss; "capture" additionally records every MoE layer's expert choices, gate weights
and router probabilities and builds the routing tables. The variants alternate in
rounds within one process, so load from other processes hits both alike; the table
shows the median and min over rounds of capture time / plain time.

The second table does the same for Hugging Face MoE models (`moescope analyze
--model`): plain = forward + per-block loss; capture = the same with the adapter's
hooks on and every layer's top-k, gate weights and router entropy streamed to disk
(moescope.analysis.capture.stream_routing). It also prints the peak RSS of the
capture phase (VmHWM, reset before) at two token counts: streaming keeps it flat.

    .venv/bin/python benchmarks/bench_capture.py [--rounds 15] [--only hf|moescope]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moescope.analysis.capture import RoutingStream, capture_routing, stream_routing
from moescope.data.blocks import FORMAT_VERSION, BlockStore, block_path, dtype_for_vocab
from moescope.moe.config import MoEConfig
from moescope.moe.install import install_moe

SIZES = {
    # the demo-scale model of anchors.md section 6: 4 layers, d=128, MoE in 2-3, 8 experts
    "demo d=128 L4 ctx128": dict(n_layer=4, n_embd=128, n_head=4, ctx=128, vocab=4096, layers=[2, 3]),
    "d=256 L6 ctx256": dict(n_layer=6, n_embd=256, n_head=4, ctx=256, vocab=8192, layers=[4, 5]),
}


def make_store(root: Path, vocab: int, block: int, n_blocks: int) -> BlockStore:
    rng = np.random.default_rng(0)
    dtype = dtype_for_vocab(vocab)
    splits = {"train": {}, "eval": {}}
    for name in ("code", "math", "prose"):
        for split in splits:
            path = block_path(root, split, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            rng.integers(0, vocab, size=(n_blocks, block)).astype(dtype).tofile(path)
            splits[split][name] = {"n_blocks": n_blocks}
    manifest = {"format_version": FORMAT_VERSION, "block_size": block, "vocab_size": vocab,
                "eos_token_id": vocab - 1, "dtype": dtype.name, "domains": ["code", "math", "prose"],
                "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return BlockStore.open(root)


# tiny-but-not-trivial HF MoE models: real block code, 16-64 experts, context 256
HF_SIZES = {
    "OLMoE d=256 L4 E64 k8": ("olmoe", dict(hidden_size=256, intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=4, num_experts=64,
                                             num_experts_per_tok=8)),
    "Qwen2-MoE d=256 L4 E16 k4": ("qwen2_moe", dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                                    shared_expert_intermediate_size=256, num_hidden_layers=4,
                                                    num_attention_heads=4, num_key_value_heads=4, num_experts=16,
                                                    num_experts_per_tok=4)),
}
HF_VOCAB, HF_CTX = 8192, 256


def bench_hf(rounds: int, blocks_per_domain: int) -> None:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from moescope.hf.adapters import find_sites
    from moescope.hf.recorder import RoutingRecorder
    from moescope.runtime import keep_freed_memory, proc_status_mb, reset_resident_peak

    keep_freed_memory()  # as the CLI does

    print(f"\nHF MoE models, fp32 CPU, batch 4 x {HF_CTX} tokens (capture = hooks + streaming to disk)")
    print(f"{'model':<28} {'tokens':>7} {'plain s':>8} {'capture s':>9} {'median ratio':>13} {'min ratio':>10}")
    rss_rows = []
    for label, (model_type, kw) in HF_SIZES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](vocab_size=HF_VOCAB,
                                                                             max_position_embeddings=HF_CTX, **kw))
        model.eval()
        adapter, sites = find_sites(model)
        rng = np.random.default_rng(0)

        def blocks(n_per_domain: int):
            tokens = rng.integers(0, HF_VOCAB, size=(3 * n_per_domain, HF_CTX))
            return tokens, np.repeat(np.arange(3), n_per_domain)

        tokens, domain = blocks(blocks_per_domain)
        domains = ["code", "math", "prose"]
        with tempfile.TemporaryDirectory() as tmp:
            def once(flag: bool, tokens=tokens, domain=domain, tag: str = "x") -> None:
                if not flag:
                    stream_routing(model, tokens, domain, domains, batch_blocks=4, progress=False)
                    return
                stream = RoutingStream(Path(tmp) / tag)
                with RoutingRecorder(adapter, sites) as rec:
                    stream_routing(model, tokens, domain, domains, recorder=rec, stream=stream, batch_blocks=4,
                                   progress=False)
                stream.close()

            once(True)
            once(False)  # warm-up
            plain, cap, ratios = [], [], []
            for r in range(rounds):
                took = {}
                for flag in ((False, True) if r % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    once(flag)
                    took[flag] = time.perf_counter() - t0
                plain.append(took[False])
                cap.append(took[True])
                ratios.append(took[True] / took[False])
            print(f"{label:<28} {tokens.size:>7} {statistics.median(plain):>8.3f} {statistics.median(cap):>9.3f} "
                  f"{statistics.median(ratios):>13.3f} {min(ratios):>10.3f}")
            # both counts fill whole batches of 4 blocks, so only the number of tokens differs
            base = 4 * max(1, blocks_per_domain // 4)
            for n_per_domain in (base, 8 * base):
                more, more_domain = blocks(n_per_domain)
                reset_resident_peak()
                before = proc_status_mb("VmRSS")
                once(True, more, more_domain, tag=f"rss{n_per_domain}")
                rss_rows.append((label, more.size, before, proc_status_mb("VmHWM")))
    print(f"\npeak RSS of the capture phase (MiB; routing streamed to disk, model and token ids in RAM)")
    print(f"{'model':<28} {'tokens':>8} {'RSS before':>11} {'peak':>8} {'peak - before':>14}")
    for label, n, before, peak in rss_rows:
        print(f"{label:<28} {n:>8} {before:>11.0f} {peak:>8.0f} {peak - before:>14.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--blocks-per-domain", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least disturbed by other jobs)")
    parser.add_argument("--only", choices=["hf", "moescope"], help="run one of the two tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; machine shared with other jobs")
    if args.only != "hf":
        bench_moescope(args)
    if args.only != "moescope":
        bench_hf(args.rounds, args.blocks_per_domain)


def bench_moescope(args) -> None:
    print(f"{'model':<24} {'tokens':>7} {'plain s':>8} {'capture s':>9} {'median ratio':>13} {'min ratio':>10}")
    for label, s in SIZES.items():
        model = GPT2LMHeadModel(GPT2Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                                           n_positions=s["ctx"], vocab_size=s["vocab"],
                                           bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1))
        install_moe(model, MoEConfig(n_experts=8, top_k=1, layers=s["layers"]))
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            store = make_store(Path(tmp), s["vocab"], s["ctx"], args.blocks_per_domain)
            run = dict(batch_blocks=8, progress=False)
            capture_routing(model, store, capture=True, **run)  # warm-up
            capture_routing(model, store, capture=False, **run)
            plain, cap, ratios = [], [], []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                took = {}
                for flag in order:
                    t0 = time.perf_counter()
                    capture_routing(model, store, capture=flag, **run)
                    took[flag] = time.perf_counter() - t0
                plain.append(took[False])
                cap.append(took[True])
                ratios.append(took[True] / took[False])
            n_tok = 3 * args.blocks_per_domain * s["ctx"]
            print(f"{label:<24} {n_tok:>7} {statistics.median(plain):>8.3f} {statistics.median(cap):>9.3f} "
                  f"{statistics.median(ratios):>13.3f} {min(ratios):>10.3f}")


if __name__ == "__main__":
    main()
