"""A checkpoint's safetensors files, checked before transformers opens them (layer 2).

transformers names only the directory when a shard's header is damaged, blocks forever on a
shard that is a FIFO, and reads quantized tensors (fp8, packed 4-bit blocks, int8) as plain
numbers when config.json declares no quantization method it knows (it logs a warning and
skips the quantizer): an analysis of such weights runs to the end on numbers nobody trained.
Here every weight file is a regular file named inside the directory (a symlink, as in a hub snapshot,
is followed to its target) whose header safetensors reads
(moe/hf_model.safetensors_header, which names the file), and a checkpoint that stores quantized tensors must declare a method
transformers dequantizes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from moescope.errors import MoescopeError
from moescope.io.jsonfile import read_json_object
from moescope.moe.hf_model import safetensors_header

# Stored dtypes that hold quantized weights (fp8, fp4/fp6, packed integers), not values to compute with.
QUANTIZED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "U4", "I4"})
# Tensors that only a dequantizer reads: scales (fp8 / mxfp4 / bitsandbytes), packed GPTQ / AWQ weights.
QUANTIZATION_STATE = re.compile(
    r"(?:^|\.)(?:[^.]*_blocks|[^.]*_scales|weight_scale(?:_inv)?|input_scale|scale_inv|qweight|qzeros|g_idx|"
    r"absmax|quant_map|SCB)$"
)


def declared_quantization(config: Any, source: str) -> str | None:
    """The quantization method config.json declares (None: none); one that this transformers cannot
    dequantize is refused, since transformers would then read the packed weights as plain numbers."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, dict):
        raise MoescopeError(f"{source}: config.json's quantization_config must be an object, got {type(qc).__name__}")
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    method = qc.get("quant_method")
    if qc.get("load_in_8bit") or qc.get("load_in_4bit"):
        method = "bitsandbytes_4bit" if qc.get("load_in_4bit") else "bitsandbytes_8bit"
    if not isinstance(method, str) or method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        import transformers

        raise MoescopeError(f"{source}: config.json declares quantization method {method!r}, which transformers "
                            f"{transformers.__version__} cannot dequantize (its packed weights would be read as numbers)")
    return method


def checkpoint_directory(source: str, revision: str | None = None) -> Path | None:
    """Where the checkpoint's files are: the local directory, or the hub cache's snapshot holding its
    config.json (None when the hub files are not cached yet)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 -- not a repo id the cache knows: transformers reports it when loading
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def weight_files(directory: Path, *, require: bool = True) -> list[Path]:
    """The safetensors files of `directory` (its index's shards, or model.safetensors), each a regular file
    inside it; with `require=False` files not there yet (a hub download to come) are skipped."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        values = list(read_json_object(index, {"weight_map": dict})["weight_map"].values())
        if not values or not all(isinstance(v, str) and v for v in values):
            raise MoescopeError(f"{index}: 'weight_map' must map tensor names to shard file names")
        names = sorted(set(values))
        shards = []
        for name in names:
            # lexical: a hub snapshot's shards are symlinks into the cache's blobs, outside the snapshot
            if Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == "..":
                raise MoescopeError(f"{index}: shard {name!r} is outside the model directory")
            if (directory / name).exists() or require:
                shards.append(directory / name)
        return shards
    single = directory / SAFE_WEIGHTS_NAME
    return [single] if single.exists() else []


def check_weight_files(directory: Path, quantization: str | None, *, require: bool = True) -> None:
    """Every weight file of `directory` readable (see module docstring); without a declared quantization
    method no tensor may be stored quantized."""
    files = weight_files(directory, require=require)
    for path in files:
        for name, (dtype, _) in safetensors_header(path).items():
            if quantization is not None:
                continue
            if QUANTIZATION_STATE.search(name):
                what = "is a quantization scale or packed weight"
            elif dtype in QUANTIZED_DTYPES and _is_weight(name):
                what = f"is stored quantized ({dtype})"
            else:
                continue
            raise MoescopeError(f"{path}: tensor {name!r} {what} but config.json declares no quantization method; "
                                "transformers would read the weights as plain numbers")


def _is_weight(name: str) -> bool:
    return name.endswith("weight") or name.endswith("_proj") or bool(QUANTIZATION_STATE.search(name))


def quantization_state_keys(keys) -> list[str]:
    """Of a load's unexpected keys, those only a dequantizer would have read (fp8 / mxfp4 scales, packed weights)."""
    return sorted(str(k) for k in keys if QUANTIZATION_STATE.search(str(k)))
