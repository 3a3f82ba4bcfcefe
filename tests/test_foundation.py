"""The shared I/O helpers and the CLI entry point."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from moescope.data.blocks import BlockStore, block_path, dtype_for_vocab
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_directory, atomic_write_json, atomic_write_text, temporary_prefix
from moescope.io.config import deep_merge, from_dict, load_config_file, parse_overrides, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    steps: int = 10
    name: str = "x"
    layers: list[int] | None = None
    inner: Inner = field(default_factory=Inner)


def test_config_round_trip_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('steps = 5\n[inner]\nlr = 2\nmode = "b"\n')
    merged = deep_merge(load_config_file(p), parse_overrides(["inner.lr=0.5", "layers=[1, 2]"]))
    cfg = from_dict(Outer, merged)
    assert cfg == Outer(steps=5, layers=[1, 2], inner=Inner(lr=0.5, mode="b"))
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_set_overrides_parse_exponent_numbers() -> None:
    """`--set optim.lr=1e4` was refused as "not a number": PyYAML reads 1e4 as a string."""
    got = parse_overrides(["inner.lr=1e4", "steps=2E3", "name=1e4x", "layers=[1, 2]", "inner.mode=b"])
    assert got == {"inner": {"lr": 10000.0, "mode": "b"}, "steps": 2000.0, "name": "1e4x", "layers": [1, 2]}
    assert parse_overrides(["inner.lr=-3e-4", "steps=.5e1", "name=12"]) == {
        "inner": {"lr": -3e-4}, "steps": 5.0, "name": 12}
    cfg = from_dict(Outer, parse_overrides(["inner.lr=1e4", "steps=1e4"]))
    assert cfg.inner.lr == 10000.0 and cfg.steps == 10000 and isinstance(cfg.steps, int)
    with pytest.raises(MoescopeError, match="expected an integer"):
        from_dict(Outer, parse_overrides(["steps=1.5e0"]))


def test_yaml_config_file_reads_exponent_numbers(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("steps: 1e3\ninner:\n  lr: 3e-4\n")
    assert from_dict(Outer, load_config_file(p)) == Outer(steps=1000, inner=Inner(lr=3e-4))


def test_set_exponent_through_a_command() -> None:
    from moescope.cli import build_parser
    from moescope.commands.data import build_config_from_args

    args = build_parser().parse_args(["data", "build", "--set", "eval_fraction=5e-2", "--set", "seed=1e1"])
    cfg = build_config_from_args(args)
    assert cfg.eval_fraction == 0.05 and cfg.seed == 10


def test_unknown_key_names_closest_valid_key() -> None:
    with pytest.raises(MoescopeError, match=r"inner\.lrr.*did you mean 'lr'"):
        from_dict(Outer, {"inner": {"lrr": 1.0}})
    with pytest.raises(MoescopeError, match="not one of"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(MoescopeError, match="expected an integer"):
        from_dict(Outer, {"steps": "ten"})


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "done.txt").write_text("done")
    assert (final / "done.txt").read_text() == "done"


DEAD_PID = 2**31 - 1  # above any pid_max: no process has it


def test_a_rewrite_removes_only_the_stale_temporaries_of_its_own_target(tmp_path: Path) -> None:
    """What a killed write of `out` left (a dead writer's temporary, the old copy being replaced, an older
    moescope's temporary without PID or host) goes at the next write of `out`; a live writer's temporary,
    one written from another machine (its PID is not this machine's), and temporaries of other names, stay."""
    import os

    from moescope.io.atomic import _HOST

    other_host = "0" * 8 if _HOST != "0" * 8 else "1" * 8
    stale = [tmp_path / f".out.{DEAD_PID}.abcdefgh.tmp", tmp_path / ".out.old", tmp_path / ".out.k2j_9x0a.tmp",
             tmp_path / f".out.{DEAD_PID}-{_HOST}.abcdefgh.tmp"]
    for p in stale:
        p.mkdir()
        (p / "half.bin").write_bytes(b"half")
    live = tmp_path / (temporary_prefix(tmp_path / "out") + "zzzzzzzz.tmp")
    others = [tmp_path / f".other.{DEAD_PID}.abcdefgh.tmp", tmp_path / ".out.txt", live,
              tmp_path / f".out.{DEAD_PID}-{other_host}.abcdefgh.tmp", tmp_path / f".out.{os.getpid()}-{other_host}.zzzzzzzz.tmp"]
    for p in others:
        p.write_text("keep")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("done")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)
    (tmp_path / f".note.txt.{DEAD_PID}.abcdefgh.tmp").write_text("half")
    atomic_write_text(tmp_path / "note.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "note.txt", *(p.name for p in others)])


def test_atomic_writes_get_the_permissions_of_an_ordinary_write(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_saved_model_weights_get_the_permissions_of_an_ordinary_write(tmp_path: Path) -> None:
    """safetensors creates its file 0600 by itself; a saved model's weights must be readable like its config."""
    import os

    from transformers import GPT2Config, GPT2LMHeadModel

    from moescope.moe.hf_model import save_moe_model

    umask = os.umask(0o022)
    os.umask(umask)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0,
                                       eos_token_id=0))
    out = save_moe_model(model, tmp_path / "m")
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        "model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


def test_block_store_reads_what_was_written(tmp_path: Path) -> None:
    dt = dtype_for_vocab(50257)
    assert dt == np.uint16 and dtype_for_vocab(70000) == np.uint32
    rng = np.random.default_rng(0)
    data = {d: rng.integers(0, 50257, size=(n, 8)).astype(dt) for d, n in [("code", 3), ("prose", 2)]}
    for d, arr in data.items():
        path = block_path(tmp_path, "train", d)
        path.parent.mkdir(parents=True, exist_ok=True)
        arr.tofile(path)
    atomic_write_json(tmp_path / "manifest.json", {
        "format_version": 1, "block_size": 8, "vocab_size": 50257, "eos_token_id": 50256,
        "dtype": "uint16", "domains": ["code", "prose"],
        "splits": {"train": {"code": {"n_blocks": 3}, "prose": {"n_blocks": 2}}},
    })
    store = BlockStore.open(tmp_path)
    idx = store.index("train")
    assert idx.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    got = store.gather("train", idx[[4, 0]])
    assert np.array_equal(got, np.stack([data["prose"][1], data["code"][0]]).astype(np.int64))
    with pytest.raises(MoescopeError, match="no manifest.json"):
        BlockStore.open(tmp_path / "nowhere")


def test_cli_help_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "moescope.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "moescope" in out.stdout


def _package(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "mod.py").write_text("y = 2\n")
    return pkg


def test_source_revision_outside_git_is_a_hash_of_the_sources_without_any_subprocess(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    from moescope.io import provenance

    pkg = _package(tmp_path)
    if any((p / ".git").exists() for p in pkg.parents):
        pytest.skip("the temporary directory lies inside a git checkout")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("no subprocess outside a git checkout")

    monkeypatch.setattr(provenance.subprocess, "run", no_subprocess)
    first = provenance.source_revision.__wrapped__(pkg)
    assert set(first) == {"sources_sha256"} and len(first["sources_sha256"]) == 64
    (pkg / "sub" / "mod.py").write_text("y = 3\n")
    assert provenance.source_revision.__wrapped__(pkg)["sources_sha256"] != first["sources_sha256"]


def test_source_revision_in_a_git_checkout_names_the_commit_and_dirty_flag(tmp_path: Path, monkeypatch) -> None:
    from moescope.io import provenance

    pkg = _package(tmp_path)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    try:
        subprocess.run([*git, "init", "-q"], check=True, capture_output=True)
        subprocess.run([*git, "add", "-A"], check=True, capture_output=True)
        subprocess.run([*git, "commit", "-q", "-m", "x"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    clean = provenance.source_revision.__wrapped__(pkg)
    assert clean["git_commit"] == head and clean["git_dirty"] is False
    (pkg / "sub" / "new.py").write_text("z = 1\n")  # an untracked module changes what runs: dirty
    assert provenance.source_revision.__wrapped__(pkg)["git_dirty"] is True

    def failing(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", 10)

    monkeypatch.setattr(provenance.subprocess, "run", failing)  # a failing git call never breaks a run
    assert set(provenance.source_revision.__wrapped__(pkg)) == {"sources_sha256"}


def test_environment_info_records_the_source_and_the_native_kernel_status(monkeypatch) -> None:
    from moescope.io.provenance import environment_info
    from moescope.moe import native

    info = environment_info()
    assert "sources_sha256" in info["source"]
    assert info["native_grouped_kernel"] in ("loaded", "unavailable", "not loaded yet", "off")
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert environment_info()["native_grouped_kernel"] == "off" and native.native_status() == "off"
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    for built, status in ((object(), "loaded"), (None, "unavailable")):  # stand-ins for the compiled module
        fake = functools.cache(lambda built=built: built)
        monkeypatch.setattr(native, "_build", fake)
        assert native.native_status() == "not loaded yet"  # reading the status never builds
        native.grouped_kernels()  # the first CPU MoE forward
        assert native.native_status() == status


def test_a_failed_write_names_its_target_and_other_errors_stay_as_they_were(tmp_path: Path) -> None:
    """A full disk's OSError names no file: the atomic writers name the target. An error of the caller's
    own work inside atomic_directory (a refused connection) is not dressed up as a write error."""
    import errno as errno_module

    with pytest.raises(OSError) as caught, atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a").write_text("x")
        raise OSError(errno_module.ENOSPC, "No space left on device")
    assert caught.value.filename == str(tmp_path / "out") and caught.value.errno == errno_module.ENOSPC
    with pytest.raises(ConnectionRefusedError) as caught, atomic_directory(tmp_path / "out"):
        raise ConnectionRefusedError(errno_module.ECONNREFUSED, "Connection refused")
    assert caught.value.filename is None
    assert not (tmp_path / "out").exists()
    # numpy's short write (np.save / tofile on a full disk) carries neither errno nor file name
    with pytest.raises(OSError, match=rf"^{tmp_path / 'out'}: 1632 requested and 496 written, a short write"), \
            atomic_directory(tmp_path / "out"):
        raise OSError("1632 requested and 496 written")
    with pytest.raises(OSError, match=r"^Can't load tokenizer$"), atomic_directory(tmp_path / "out"):
        raise OSError("Can't load tokenizer")  # a library's own OSError without errno is left as it was
    assert not (tmp_path / "out").exists()


def test_the_tokenizer_libraries_bare_write_error_is_the_oserror_it_was(tmp_path: Path) -> None:
    from moescope.data.tokenizer import save_tokenizer

    class Full:
        def save_pretrained(self, directory):
            raise Exception("File too large (os error 27)")

    with pytest.raises(OSError) as caught:
        save_tokenizer(Full(), tmp_path / "tok")
    assert caught.value.errno == 27 and caught.value.filename == str(tmp_path / "tok")
