"""Load a released causal LM and its tokenizer through transformers, checking first that it can work (layer 2).

Order matters: config (no code from the repository, ever), then the MoE layers and
the memory need on an empty ("meta") copy of the model, then the tokenizer, and
only then the weights. A model that cannot be analysed is refused before
gigabytes are read.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moescope.errors import MoescopeError, first_line
from moescope.hf.adapters import Adapter, MoESite, find_sites
from moescope.hf.checkpoint_files import (
    check_weight_files,
    checkpoint_directory,
    declared_quantization,
    quantization_state_keys,
)
from moescope.io.saved_model import STRICT_CONFIG_ERRORS, config_error

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Weights plus activations, the logits of one batch and allocator slack.
MEMORY_OVERHEAD = 1.2
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def is_moescope_dir(source: str | Path) -> bool:
    from moescope.moe.hf_model import MOE_CONFIG_NAME

    return (Path(source) / MOE_CONFIG_NAME).is_file()


def read_config(source: str, revision: str | None = None) -> Any:
    """The model's transformers config (at hub `revision`, if given); refuses repositories that need their
    own code."""
    from transformers import AutoConfig

    if Path(source).is_dir():
        path = Path(source) / "config.json"
        if not path.exists():
            raise MoescopeError(f"{path}: not found (a model directory holds its config.json)")
        if not stat.S_ISREG(path.stat().st_mode):
            raise MoescopeError(f"{path}: not a regular file")
    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (*STRICT_CONFIG_ERRORS, AttributeError, KeyError) as exc:
        # AttributeError: a dtype name torch does not have ("bf16"), looked up while the config is set up
        raise config_error(Path(source) / "config.json" if Path(source).is_dir() else source, exc) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise MoescopeError(
                f"{source}: this model needs its own code from the repository (trust_remote_code); moescope does "
                "not run code from model repositories"
            ) from exc
        raise MoescopeError(f"{source}: cannot read the model config: {first_line(exc)}") from exc
    except OSError as exc:
        if Path(source).is_dir():
            raise MoescopeError(f"{Path(source) / 'config.json'}: cannot read the model config "
                                f"({first_line(exc)})") from exc
        raise MoescopeError(f"{source}: not a local model directory and not reachable on the hub "
                            f"({first_line(exc)})") from exc


def model_context(config: Any) -> int | None:
    """The longest sequence the model was built for (None when the config does not say)."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_dtype(name: str, config: Any) -> torch.dtype:
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise MoescopeError(f"--dtype {name!r}: choose auto, bf16, fp16 or fp32")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        return torch.float32
    if dtype not in DTYPES.values():
        raise MoescopeError(f"the model's config gives dtype {str(dtype).removeprefix('torch.')}, not one to compute "
                            "in; pass --dtype bf16, fp16 or fp32")
    return dtype


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise MoescopeError("--device cuda: no CUDA device is visible")
    if name not in ("cpu", "cuda"):
        raise MoescopeError(f"--device {name!r}: choose auto, cpu or cuda")
    return name


def available_bytes(device: str) -> int:
    """Memory the model may use: free RAM (MemAvailable), plus free memory of every GPU on cuda."""
    ram = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
    except OSError:
        ram = 0
    if device == "cuda":
        # device_map="auto" fills the GPUs first and may place the rest in RAM
        return ram + sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return ram


@dataclass
class ModelPlan:
    """What is known about a model before its weights are read."""

    source: str
    config: Any
    adapter: Adapter
    sites: list[MoESite]  # on the empty model; re-found on the loaded one
    weight_bytes: int
    dtype: torch.dtype
    device: str
    context: int | None
    auto_class: str = "AutoModelForCausalLM"  # the transformers auto class that builds and loads it
    revision: str | None = None  # hub branch, tag or commit (None: the default branch)


# Auto classes whose models take input_ids alone and return next-token logits, in order of preference:
# a vision-language MoE with no text-only class (Qwen3-VL-MoE) runs its language model on text this way,
# its vision tower idle.
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")


def auto_class_for(source: str, config: Any) -> str:
    """The first of AUTO_CLASSES that knows this config's class."""
    import transformers

    for name in AUTO_CLASSES:
        if type(config) in getattr(transformers, name)._model_mapping:
            return name
    raise MoescopeError(f"{source}: {type(config).__name__} is not a causal or image-text-to-text language model "
                        "transformers can build")


def plan_model(source: str, dtype: str = "auto", device: str = "auto", revision: str | None = None) -> ModelPlan:
    """Config, MoE layers and memory need of a model (at hub `revision`), from an empty copy (no weights read)."""
    import transformers
    from accelerate import init_empty_weights

    config = read_config(source, revision)
    declared_quantization(config, source)
    try:
        torch_dtype = resolve_dtype(dtype, config)
    except MoescopeError as exc:
        raise MoescopeError(f"{source}: {exc}") from None
    auto_class = auto_class_for(source, config)
    try:
        # include_buffers: tensors a constructor makes with torch.empty (fused 3-D experts) stay on meta
        # too; otherwise a large published config allocates its experts for real here
        with init_empty_weights(include_buffers=True):
            empty = getattr(transformers, auto_class).from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 -- any constructor failure (a negative size, an assert) is the config's
        if isinstance(exc, MoescopeError):
            raise
        raise MoescopeError(f"{source}: transformers cannot build a {type(config).__name__} model from this config "
                            f"({first_line(exc)})") from exc
    try:
        adapter, sites = find_sites(empty)
    except MoescopeError as exc:
        raise MoescopeError(f"{source}: {exc}") from exc
    for site in sites:
        if not 1 <= site.top_k <= site.n_experts:
            raise MoescopeError(f"{source}: layer {site.layer} routes each token to {site.top_k} of "
                                f"{site.n_experts} experts; the config is inconsistent")
    n_params = sum(p.numel() for p in empty.parameters())
    weight_bytes = n_params * torch.empty(0, dtype=torch_dtype).element_size()
    return ModelPlan(source, config, adapter, sites, int(weight_bytes), torch_dtype, resolve_device(device),
                     model_context(config), auto_class, revision)


def check_memory(plan: ModelPlan, force: bool = False) -> None:
    need = int(plan.weight_bytes * MEMORY_OVERHEAD)
    have = available_bytes(plan.device)
    if need > have and not force:
        raise MoescopeError(
            f"{plan.source}: needs about {need / 2**30:.1f} GiB ({plan.weight_bytes / 2**30:.1f} GiB of "
            f"{str(plan.dtype).removeprefix('torch.')} weights) but {have / 2**30:.1f} GiB is free on {plan.device}; "
            "use a smaller --dtype, a GPU, or --force to try anyway"
        )


def load_tokenizer(source: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 -- the tokenizers library raises a bare Exception for a damaged tokenizer.json
        raise MoescopeError(f"{source}: no usable tokenizer beside the model ({type(exc).__name__}: "
                            f"{first_line(exc) or 'no tokenizer files'})") from exc
    if tokenizer is None or not getattr(tokenizer, "is_fast", False) and not hasattr(tokenizer, "encode"):
        raise MoescopeError(f"{source}: no usable tokenizer beside the model")
    return tokenizer


def load_checkpoint(source: str, failure: str, auto_class: str = "AutoModelForCausalLM",
                    **kwargs: Any) -> torch.nn.Module:
    """`auto_class`.from_pretrained (one of AUTO_CLASSES) with moescope's rules; any problem is one
    MoescopeError line starting with `failure`.

    safetensors only (a pickle checkpoint is never opened), no code from the repository, and
    every parameter must come from the checkpoint: transformers fills missing or mis-shaped
    tensors with fresh random values and only logs a report, which would train or analyse
    weights nobody trained. The weight files are checked first (hf/checkpoint_files.py: readable
    headers, no quantized tensors unless the config declares a method transformers dequantizes).
    `kwargs` go to from_pretrained (config, dtype, device_map, revision).
    """
    import transformers
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    revision = kwargs.get("revision")
    quantization = declared_quantization(kwargs.get("config") or read_config(source, revision), source)
    directory = checkpoint_directory(source, revision)
    if directory is not None:  # a hub checkpoint not cached yet is checked once transformers has fetched it
        check_weight_files(directory, quantization, require=Path(source).is_dir())
    # mis-shaped tensors are collected (not raised) so that the error below can name them
    kwargs.update(trust_remote_code=False, use_safetensors=True, output_loading_info=True,
                  ignore_mismatched_sizes=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is a multi-line table; the checks below say it in one
    try:
        model, info = getattr(transformers, auto_class).from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError, AssertionError, ImportError, SafetensorError,
            *STRICT_CONFIG_ERRORS) as exc:
        # AssertionError: torch's own checks in a constructor (a padding index outside the vocabulary);
        # ImportError: a quantization method whose library is not installed
        raise MoescopeError(f"{failure}: {first_line(exc) or type(exc).__name__}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if not Path(source).is_dir():
        directory = checkpoint_directory(source, revision)
        if directory is not None:  # the hub files transformers fetched, scanned like a local directory's
            check_weight_files(directory, quantization, require=False)
    if directory is None and quantization is None and (
            state := quantization_state_keys(info.get("unexpected_keys") or ())):
        raise MoescopeError(f"{failure}: the checkpoint holds quantization state ({state[0]}"
                            f"{f' and {len(state) - 1} more' if len(state) > 1 else ''}) but its config declares "
                            "no quantization method; its weights would be read as plain numbers")
    for kind, what in (("missing_keys", "missing from"), ("mismatched_keys", "of another shape in")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise MoescopeError(f"{failure}: {len(keys)} tensor(s) {what} the checkpoint ({shown}); "
                                "moescope uses trained weights only")
    return model


def load_model(plan: ModelPlan) -> torch.nn.Module:
    """The weights, on the planned device and dtype (device_map="auto" over all visible GPUs on cuda)."""
    kwargs: dict[str, Any] = {"config": plan.config, "dtype": plan.dtype, "revision": plan.revision}
    if plan.device == "cuda":
        kwargs["device_map"] = "auto"
    model = load_checkpoint(plan.source, f"{plan.source}: cannot load the weights", plan.auto_class, **kwargs)
    model.eval()
    return model


def input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must go (the embedding's device under device_map)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and hasattr(embed, "weight"):
        return embed.weight.device
    return next(model.parameters()).device
