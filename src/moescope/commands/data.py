"""`moescope data build` and `moescope data inspect`."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="build or inspect a multi-domain token-block corpus")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")

    b = sub.add_parser("build", help="build a data directory (sources -> split -> tokenizer -> blocks + manifest)")
    b.add_argument("--out", default="runs/data", help="output data directory (default: runs/data)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing different build at --out")
    b.add_argument("--config", help="build config file (.toml/.yaml/.json) mapping onto DataBuildConfig")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set tokenizer.vocab_size=8192 (repeatable)")
    b.add_argument("--domains", help="comma-separated domains to build (built-in: code,math,prose)")
    b.add_argument("--block-size", type=int, help="tokens per block (default 512)")
    b.add_argument("--target-mb", type=float, help="size target per domain in MB of UTF-8 text (default 1.5)")
    b.add_argument("--target-texts", type=int, help="size target per domain in number of texts")
    b.add_argument("--tokenizer", choices=["bpe", "gpt2"], help="bpe: train on the train split; gpt2: pretrained")
    b.add_argument("--tokenizer-path", help="directory or hub id of the gpt2 tokenizer (default: gpt2)")
    b.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    b.add_argument("--seed", type=int, help="seed for sampling, splitting and balancing (default 42)")
    b.add_argument("--eval-fraction", type=float, help="eval share of each domain's texts (default 0.05, min 20 texts)")
    b.add_argument("--balance", action="store_true", help="truncate every domain to the smallest block count")
    b.add_argument("--files", action="append", default=[], metavar="DOMAIN=PATH[,PATH...]",
                   help="take DOMAIN from your .txt/.jsonl/.py files, directories or globs (repeatable)")
    b.add_argument("--hf", action="append", default=[], metavar="DOMAIN=DATASET[:CONFIG][@WEIGHT]",
                   help="take DOMAIN from a Hugging Face dataset, e.g. code=codeparrot/codeparrot-clean; repeat "
                        "for one domain to mix sources, weights are shares of its size target "
                        "(--hf math=mathqa@0.7 --hf math=openai/gsm8k@0.3; default equal)")
    b.add_argument("--hf-path", action="append", default=[], metavar="DOMAIN[:DATASET]=PATH",
                   help="local stand-in (file/dir/glob/zip) for DOMAIN's --hf dataset (DATASET picks one of several)")
    b.set_defaults(func=run_build)

    i = sub.add_parser("inspect", help="random samples, statistics and a length plot of a data directory")
    i.add_argument("dir", help="data directory built by `moescope data build`")
    i.add_argument("--samples", type=int, default=3, help="samples per domain, split and kind (default 3)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--max-chars", type=int, default=600, help="truncate printed samples (default 600)")
    i.add_argument("--png", help="length-distribution plot path (default DIR/inspect/length_distribution.png)")
    i.set_defaults(func=run_inspect)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    """DOMAIN=VALUE items in command-line order (a domain may repeat)."""
    from moescope.errors import MoescopeError

    out = []
    for item in items:
        if "=" not in item:
            raise MoescopeError(f"{flag} {item!r} must look like DOMAIN=VALUE")
        k, v = item.split("=", 1)
        if not k.strip() or not v.strip():
            raise MoescopeError(f"{flag} {item!r} must look like DOMAIN=VALUE")
        out.append((k.strip(), v.strip()))
    return out


def parse_hf_value(value: str) -> tuple[str, str | None, float | None]:
    """DATASET[:CONFIG][@WEIGHT] -> (dataset, config, weight); a URL keeps its ':'."""
    from moescope.errors import MoescopeError

    weight = None
    if "@" in value:
        value, _, raw = value.rpartition("@")
        try:
            weight = float(raw)
        except ValueError:
            raise MoescopeError(f"--hf weight {raw!r} is not a number (DOMAIN=DATASET[:CONFIG][@WEIGHT])") from None
        if not weight > 0:
            raise MoescopeError(f"--hf weight must be > 0, got {raw!r}")
    if value.startswith(("http://", "https://")):
        return value, None, weight
    ds, _, conf = value.partition(":")
    if not ds:
        raise MoescopeError(f"--hf value {value!r} names no dataset")
    return ds, conf or None, weight


def _hf_sources(args: argparse.Namespace) -> dict[str, list[Any]]:
    """Each domain's --hf sources in order, with their --hf-path stand-ins attached.

    `--hf-path DOMAIN=PATH` names the domain's only --hf dataset; with several, write
    `--hf-path DOMAIN:DATASET=PATH`. Every --hf-path must find its dataset.
    """
    from moescope.data.config import SourceConfig
    from moescope.errors import MoescopeError

    by_domain: dict[str, list[tuple[str, str | None, float | None]]] = {}
    for name, value in _pairs(args.hf, "--hf"):
        by_domain.setdefault(name, []).append(parse_hf_value(value))
    paths: dict[tuple[str, int], str] = {}
    for key, path in _pairs(args.hf_path, "--hf-path"):
        name, _, ds = key.partition(":")
        entries = by_domain.get(name, [])
        if not entries:
            raise MoescopeError(f"--hf-path {key}=...: domain {name!r} has no --hf dataset")
        if ds:
            hits = [i for i, e in enumerate(entries) if e[0] == ds]
            if not hits:
                raise MoescopeError(f"--hf-path {key}=...: domain {name!r} has no --hf dataset {ds!r} "
                                    f"(its --hf: {', '.join(e[0] for e in entries)})")
        elif len(entries) > 1:
            raise MoescopeError(f"--hf-path {key}=...: domain {name!r} has {len(entries)} --hf datasets; "
                                f"write --hf-path {name}:DATASET=PATH")
        else:
            hits = [0]
        for i in hits:
            if (name, i) in paths:
                raise MoescopeError(f"--hf-path given twice for {key}")
            paths[(name, i)] = path
    return {name: [SourceConfig(backend="hf", name=ds, config=conf, weight=w, path=paths.get((name, i)))
                   for i, (ds, conf, w) in enumerate(entries)]
            for name, entries in by_domain.items()}


def build_config_from_args(args: argparse.Namespace) -> Any:
    """Config file, then --set overrides, then the dedicated flags (last wins)."""
    import dataclasses

    from moescope.data.config import DataBuildConfig, DomainConfig, SourceConfig
    from moescope.io.config import Range, check_ranges, layered_config

    # flags set below through dataclasses.replace, past from_dict's checks
    check_ranges(args, {"target_mb": Range(low=0.0, low_open=True), "eval_fraction": Range(0.0, 1.0, True, True)},
                 {"target_mb": "--target-mb", "eval_fraction": "--eval-fraction"})
    cfg = layered_config(DataBuildConfig, args.config, args.overrides)

    # every source named on the command line, per domain: --files (paths merged) then each --hf
    given: dict[str, list[SourceConfig]] = {}
    for name, value in _pairs(args.files, "--files"):
        paths = [p for p in value.split(",") if p]
        if name in given:
            given[name][0].paths.extend(paths)
        else:
            given[name] = [SourceConfig(backend="files", paths=paths)]
    for name, srcs in _hf_sources(args).items():
        given.setdefault(name, []).extend(srcs)

    domains = list(cfg.domains)
    if args.domains:
        by_name = {d.name: d for d in domains}
        names = [n.strip() for n in args.domains.split(",") if n.strip()]
        # Domains named in --files/--hf are added below with their source; others must be built-in.
        domains = [by_name.get(n) or DomainConfig(name=n) for n in names if n in by_name or n not in given]
    for name, srcs in given.items():
        domains = _put_domain(domains, name, srcs)
    if args.target_mb is not None or args.target_texts is not None:
        domains = [dataclasses.replace(d, target_mb=args.target_mb if args.target_mb is not None else
                                       (None if args.target_texts is not None else d.target_mb),
                                       target_texts=args.target_texts if args.target_texts is not None else d.target_texts)
                   for d in domains]
    tok = cfg.tokenizer
    if args.tokenizer or args.tokenizer_path or args.vocab_size is not None:
        # `is not None`: --vocab-size 0 must reach the config's check, not fall back to the default
        tok = dataclasses.replace(
            tok, kind=args.tokenizer or ("gpt2" if args.tokenizer_path else tok.kind),
            name_or_path=args.tokenizer_path or tok.name_or_path,
            vocab_size=args.vocab_size if args.vocab_size is not None else tok.vocab_size)
    changes: dict[str, Any] = {"domains": domains, "tokenizer": tok}
    if args.block_size is not None:
        changes["block_size_tokens"] = args.block_size
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.eval_fraction is not None:
        changes["eval_fraction"] = args.eval_fraction
    if args.balance:
        changes["balance"] = True
    return dataclasses.replace(cfg, **changes)


def _put_domain(domains: list, name: str, sources: list) -> list:
    """The domain `name` with exactly `sources` (first is `source`, the rest are mixed in)."""
    import dataclasses

    from moescope.data.config import DomainConfig

    for i, d in enumerate(domains):
        if d.name == name:
            domains = list(domains)
            domains[i] = dataclasses.replace(d, source=sources[0], extra_sources=list(sources[1:]))
            return domains
    return [*domains, DomainConfig(name=name, source=sources[0], extra_sources=list(sources[1:]))]


def run_build(args: argparse.Namespace) -> int:
    from moescope.data.build import build_dataset
    from moescope.data.inspect import near_duplicates_line

    cfg = build_config_from_args(args)
    store = build_dataset(cfg, args.out, overwrite=args.overwrite)
    m = store.manifest
    print(f"built {store.root}  (block {store.block_size}, vocab {store.vocab_size}, {store.dtype.name})")
    for split in ("train", "eval"):
        for d in store.domains:
            s = m["splits"][split][d]
            print(f"  {split:5s} {d:10s} texts {s['n_texts']:7d}  tokens {s['n_tokens']:9d}  "
                  f"blocks {s['n_blocks']:6d}  tail dropped {s['tail_tokens_dropped']}")
    for w in m.get("warnings", []):
        print(f"  warning: {w}")
    print(f"  {near_duplicates_line(m['near_duplicates'], store.domains)}")
    print(f"  leakage check passed; manifest: {store.root / 'manifest.json'}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.data.blocks import BlockStore
    from moescope.data.inspect import draw_samples, leakage_lines, plot_length_distribution, summary_rows

    store = BlockStore.open(args.dir)
    for line in leakage_lines(store):
        print(line)
    rows = summary_rows(store)
    cols = list(rows[0])
    print("  ".join(f"{c:>14s}" for c in cols))
    for r in rows:
        print("  ".join(f"{'-' if r[c] is None else str(r[c]):>14s}" for c in cols))
    for s in draw_samples(store, args.samples, args.seed):
        text = s.content if len(s.content) <= args.max_chars else s.content[: args.max_chars] + " [...]"
        print(f"\n--- {s.split} / {s.domain} / {s.kind} #{s.index} {s.meta if s.meta else ''}")
        print(text)
    png = Path(args.png) if args.png else store.root / "inspect" / "length_distribution.png"
    plot_length_distribution(store, png)
    print(f"\nlength distribution plot: {png}")
    return 0
