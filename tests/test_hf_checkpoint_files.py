"""Released checkpoints in the formats the hub ships them (sharded bf16, fp8 with block scales), and their
damaged or mislabelled variants: analysed right, or refused in one line naming the file, never read wrong."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_fixtures import build_model, make_tokenizer, write_texts_data_dir
from train_fixtures import one_thread  # noqa: F401

from moescope.analysis.capture import load_table
from moescope.cli import main
from moescope.errors import MoescopeError
from moescope.hf.checkpoint_files import check_weight_files

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--no-progress", "--context", "32", "--max-blocks-per-domain", "4",
        "--set", "statistics.n_resamples=20", "--set", "statistics.n_permutations=20"]
FP8_BLOCK = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_texts_data_dir(tmp_path_factory.mktemp("data") / "data")


def _published(arch: str, root: Path, tokenizer) -> Path:
    """A tiny model saved as the hub ships big ones: bf16 shards with an index, config as published."""
    model = build_model(arch, len(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(root, max_shard_size="40KB")
    tokenizer.save_pretrained(root)
    config = json.loads((root / "config.json").read_text())
    config.update(torch_dtype="bfloat16", some_future_key={"kept": True})
    (root / "config.json").write_text(json.dumps(config))
    assert (root / "model.safetensors.index.json").is_file() and len(list(root.glob("model-*.safetensors"))) > 2
    return root


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory) -> Path:
    return _published("deepseek_v3", tmp_path_factory.mktemp("dsv3"), make_tokenizer())


def _fp8_copy(src: Path, dst: Path, quantization: dict | None) -> Path:
    """`src` with every 2-D projection stored as DeepSeek-V3 ships it: float8_e4m3fn values and a float32
    `weight_scale_inv` per 128 x 128 block (value = fp8 x scale). `src` is overwritten with the dequantized
    weights, so both copies hold the same numbers."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors, plain, exact = load_file(dst / shard), {}, {}
        for name, value in tensors.items():
            if value.dim() == 2 and name.endswith("proj.weight"):
                rows, cols = value.shape
                nb_r, nb_c = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
                padded = torch.zeros(nb_r * FP8_BLOCK, nb_c * FP8_BLOCK)
                padded[:rows, :cols] = value.float()
                blocks = padded.reshape(nb_r, FP8_BLOCK, nb_c, FP8_BLOCK)
                scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
                q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
                dequantized = (q.float() * scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
                plain[name] = q.reshape(padded.shape)[:rows, :cols].contiguous()
                plain[name + "_scale_inv"] = scale.contiguous()
                index["weight_map"][name + "_scale_inv"] = shard
                exact[name] = dequantized.to(torch.bfloat16)
            else:
                plain[name] = value
        save_file(plain, dst / shard, metadata={"format": "pt"})
        save_file({**tensors, **exact}, src / shard, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    if quantization is not None:
        config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))
    return dst


DEEPSEEK_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _analyze(model: Path, out: Path, data: Path, *extra: str) -> int:
    return main(["analyze", "--model", str(model), "--out", str(out), "--data", str(data), "--name", "m", *FAST,
                 *extra])


def _refused(capsys, model: Path, out: Path, data: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    capsys.readouterr()
    assert _analyze(model, out, data, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert not out.exists(), sorted(out.rglob("*"))
    return err[0]


def test_fp8_checkpoint_is_dequantized_and_routes_as_its_bf16_twin(dsv3: Path, data: Path, tmp_path: Path) -> None:
    """DeepSeek-V3's fp8 format, declared in its config: transformers dequantizes it, and every token goes to
    the same experts with the same weights as in the bf16 copy holding the dequantized values."""
    reference = shutil.copytree(dsv3, tmp_path / "ref")
    fp8 = _fp8_copy(reference, tmp_path / "fp8", DEEPSEEK_FP8)
    for model, out in ((reference, tmp_path / "out_ref"), (fp8, tmp_path / "out_fp8")):
        assert _analyze(model, out, data) == 0
    for layer in ("1", "2"):
        a = load_table(tmp_path / "out_ref" / "analysis" / "routing" / "m" / f"{layer}.npz")
        b = load_table(tmp_path / "out_fp8" / "analysis" / "routing" / "m" / f"{layer}.npz")
        assert np.array_equal(a.expert_index, b.expert_index)
        np.testing.assert_allclose(a.gate_weight, b.gate_weight, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("quantization, needles", [
    (None, ["is stored quantized (F8_E4M3)", "declares no quantization method"]),
    ({**DEEPSEEK_FP8, "quant_method": "fp8_blockwise"}, ["'fp8_blockwise'", "cannot dequantize"]),
])
def test_fp8_weights_without_a_known_quantization_method_are_refused(dsv3: Path, data: Path, tmp_path: Path, capsys,
                                                                     quantization, needles) -> None:
    """transformers would read the fp8 values as numbers (up to 448) and drop the scales, and the analysis would
    run to the end on weights nobody trained."""
    fp8 = _fp8_copy(shutil.copytree(dsv3, tmp_path / "ref"), tmp_path / "fp8", quantization)
    _refused(capsys, fp8, tmp_path / "out", data, *needles)


def test_quantized_dtype_without_scales_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)},
              tmp_path / "model.safetensors")
    with pytest.raises(MoescopeError, match=r"model\.safetensors: tensor .* is stored quantized \(F8_E4M3\)"):
        check_weight_files(tmp_path, None)
    check_weight_files(tmp_path, "fp8")


def _damage(model: Path, case: str) -> str:
    """Damage one file of a sharded checkpoint the way `case` says; returns the file a refusal must name."""
    index_path = model / "model.safetensors.index.json"
    shard = sorted(model.glob("model-*.safetensors"))[1]
    if case == "shard_missing":
        shard.unlink()
    elif case == "shard_fifo":
        shard.unlink()
        os.mkfifo(shard)
    elif case == "header_garbage":
        shard.write_bytes((64).to_bytes(8, "little") + b"\xff" * 64 + shard.read_bytes()[72:])
    elif case == "header_length_huge":
        shard.write_bytes((2**62).to_bytes(8, "little") + shard.read_bytes()[8:])
    elif case == "data_truncated":
        shard.write_bytes(shard.read_bytes()[:-16])
    elif case == "index_not_json":
        index_path.write_text("{ not json")
        return str(index_path)
    elif case == "index_outside":
        index = json.loads(index_path.read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "../elsewhere.safetensors"
        index_path.write_text(json.dumps(index))
        return str(index_path)
    return str(shard)


@pytest.mark.parametrize("case", ["shard_missing", "shard_fifo", "header_garbage", "header_length_huge",
                                  "data_truncated", "index_not_json", "index_outside"])
def test_a_damaged_shard_or_index_is_one_line_naming_it(dsv3: Path, data: Path, tmp_path: Path, capsys,
                                                        case: str) -> None:
    model = shutil.copytree(dsv3, tmp_path / "m")
    named = _damage(model, case)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on a weight file"))
    signal.alarm(120)  # a FIFO opened for reading blocks until a writer comes: it must never be opened
    try:
        _refused(capsys, model, tmp_path / "out", data, named)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case, needles", [
    ("config_missing", ["config.json: not found"]),
    ("dtype_not_torch", ["config.json", "'bf16'"]),
    ("dtype_fp8", ["dtype float8_e4m3fn", "--dtype"]),
    ("tokenizer_not_json", ["no usable tokenizer"]),
    ("nan_weights", ["not finite"]),
])
def test_mislabelled_or_broken_files_are_one_line(dsv3: Path, data: Path, tmp_path: Path, capsys, case: str,
                                                  needles: list[str]) -> None:
    """Each exits 2 with one line and creates no OUT (the NaN model is only found by running it)."""
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(dsv3, tmp_path / "m")
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    if case == "config_missing":
        config_path.unlink()
    elif case in ("dtype_not_torch", "dtype_fp8"):
        config["dtype"] = config["torch_dtype"] = "bf16" if case == "dtype_not_torch" else "float8_e4m3fn"
        config_path.write_text(json.dumps(config))
    elif case == "tokenizer_not_json":
        (model / "tokenizer.json").write_text('{"version": "1.0", "truncation": ')
    else:
        for shard in model.glob("model-*.safetensors"):
            tensors = load_file(shard)
            save_file({k: v.fill_(float("nan")) if k.endswith("mlp.gate.weight") else v for k, v in tensors.items()},
                      shard, metadata={"format": "pt"})
    _refused(capsys, model, tmp_path / "out", data, *needles)


def test_a_quantization_library_that_is_not_installed_is_one_line(dsv3: Path, data: Path, tmp_path: Path,
                                                                  capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    model = shutil.copytree(dsv3, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))
    _refused(capsys, model, tmp_path / "out", data, "cannot load the weights", "bitsandbytes")


def test_all_dense_blocks_of_an_moe_family_say_so(tmp_path: Path, data: Path, capsys) -> None:
    tok = make_tokenizer()
    model = build_model("qwen2_moe", len(tok))
    model.config.mlp_only_layers = list(range(model.config.num_hidden_layers))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(model.config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    _refused(capsys, tmp_path / "m", tmp_path / "out", data, "has no MoE layer", "num_experts")


def test_planning_a_published_size_config_allocates_no_weights(tmp_path: Path) -> None:
    """Mixtral-8x7B's dimensions (47B parameters): the empty copy the plan counts is built on the meta device,
    fused expert tensors included, so the memory refusal comes from the estimate, not from an allocation.
    Untouched torch.empty pages never show in RSS, so the plan runs in a process whose address space is
    capped 1.5 GiB above what it has after importing: one layer's experts (1.8 GB in float32) do not fit."""
    import subprocess
    import sys

    from transformers import MixtralConfig

    MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                  torch_dtype="bfloat16").save_pretrained(tmp_path)
    code = f"""
import resource, sys
import transformers, accelerate
from moescope.hf.loading import plan_model
with open("/proc/self/status") as fh:
    vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 1536 * 2**20, resource.RLIM_INFINITY))
plan = plan_model({str(tmp_path)!r}, device="cpu")
print(plan.weight_bytes)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 46.0e9 < int(done.stdout.split()[-1]) / 2 < 47.5e9  # bf16: 2 bytes a parameter


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-OSS's expert format for a [E, in, out] weight: per output row, groups of 32 inputs share a power-of-two
    scale (uint8, biased by 127) and each value is a 4-bit e2m1 code, two to a byte (low nibble first):
    (blocks [E, out, in/32, 16], scales [E, out, in/32], the dequantized [E, in, out])."""
    rows = weight.float().transpose(1, 2)
    groups = rows.reshape(*rows.shape[:2], rows.shape[2] // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-12) / 6.0)).clamp(-127, 127)
    scale = torch.ldexp(torch.ones_like(exponent), exponent.int())[..., None]
    codes = ((groups / scale)[..., None] - FP4_VALUES).abs().argmin(-1)
    dequantized = (FP4_VALUES[codes] * scale).reshape(rows.shape).transpose(1, 2)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8).contiguous(), dequantized


def test_mxfp4_checkpoint_is_dequantized_and_routes_as_its_bf16_twin(data: Path, tmp_path: Path) -> None:
    """GPT-OSS ships its experts in mxfp4 (uint8 blocks and scales, quant_method mxfp4): read on the CPU through
    transformers' dequantizer, it routes every token as the bf16 copy holding the dequantized experts."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hf_fixtures import config_for

    tok = make_tokenizer()
    config = config_for("gpt_oss", len(tok))
    config.intermediate_size = 32  # mxfp4 groups 32 inputs: down_proj's input width must divide by 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(0.0, 0.5)
    reference, packed = tmp_path / "ref", tmp_path / "mxfp4"
    model.to(torch.bfloat16).save_pretrained(reference)
    tok.save_pretrained(reference)
    shutil.copytree(reference, packed)
    weights = load_file(reference / "model.safetensors")
    stored, exact = {}, {}
    for name, value in weights.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"], dequantized = _mxfp4(value)
            exact[name] = dequantized.to(torch.bfloat16).contiguous()
        else:
            stored[name] = value
    assert len(exact) == 2 * config.num_hidden_layers
    save_file(stored, packed / "model.safetensors", metadata={"format": "pt"})
    save_file({**weights, **exact}, reference / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((packed / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (packed / "config.json").write_text(json.dumps(cfg))
    for model_dir in (reference, packed):
        assert _analyze(model_dir, tmp_path / f"out_{model_dir.name}", data) == 0
    for layer in range(config.num_hidden_layers):
        a = load_table(tmp_path / "out_ref" / "analysis" / "routing" / "m" / f"{layer}.npz")
        b = load_table(tmp_path / "out_mxfp4" / "analysis" / "routing" / "m" / f"{layer}.npz")
        assert np.array_equal(a.expert_index, b.expert_index)
        np.testing.assert_allclose(a.gate_weight, b.gate_weight, rtol=1e-2, atol=1e-3)
    (packed / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(MoescopeError, match="_blocks'.*declares no quantization method"):
        check_weight_files(packed, None)
