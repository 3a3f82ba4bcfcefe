"""Where the dense MLP lives in each Hugging Face decoder family, and how it becomes an expert.

One small adapter per family, registered in `FAMILIES`; `decoder_family(model)` finds
the adapter from the loaded model's classes (isinstance against the family's
transformers base class, never the model's name), so a fine-tune or a renamed
checkpoint of a supported architecture works and an unsupported one fails with one
line listing what is supported.

An adapter answers four questions: which ModuleList holds the blocks (each block keeps
its FFN as `block.mlp`, which `install_moe` replaces), what kind of expert reproduces
the dense MLP ("gelu": moescope's GeluExpert, "swiglu": its SwiGLUExpert, both run by
the grouped path of moe/grouped.py), the dense MLP's tensors laid out as that expert's
parameters (with the axis that indexes the hidden units, for Drop-Upcycling), and the
dropout that GPT-2 applies inside its MLP (the MoE layer applies it once to its output).

Pure module inspection: no files, no printing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn

from moescope.errors import MoescopeError

# (expert parameter name, the dense tensor in that parameter's layout, hidden-unit axis or None)
ExpertTensors = list[tuple[str, torch.Tensor, int | None]]


@dataclass(frozen=True)
class DecoderFamily:
    """Adapter base: a family is named in errors and found by `base_class` (a transformers class name)."""

    name: str
    base_class: str  # e.g. "LlamaPreTrainedModel": every model class of the family derives from it
    blocks_attr: str  # attribute of model.base_model holding the blocks
    expert_type: str  # the dense MLP's kind: "gelu" or "swiglu"

    def matches(self, model: nn.Module) -> bool:
        cls = getattr(importlib.import_module("transformers"), self.base_class, None)
        return cls is not None and isinstance(model, cls)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = getattr(getattr(model, "base_model", model), self.blocks_attr, None)
        if not isinstance(blocks, nn.ModuleList):
            raise MoescopeError(f"{type(model).__name__}: no {self.blocks_attr} blocks where {self.name} keeps them")
        return blocks

    def activation(self, config) -> str:
        return config.hidden_act

    def output_dropout(self, config) -> float:
        return 0.0

    def dense_ff(self, mlp: nn.Module) -> int:
        raise NotImplementedError

    def check_mlp(self, mlp: nn.Module, config) -> None:
        """Raise unless `mlp` is the MLP this adapter knows how to copy."""

    def expert_tensors(self, mlp: nn.Module) -> ExpertTensors:
        raise NotImplementedError


@dataclass(frozen=True)
class GPT2Family(DecoderFamily):
    """GPT-2: Conv1D c_fc [d, ff] / c_proj [ff, d], the same layout as GeluExpert."""

    def activation(self, config) -> str:
        return config.activation_function

    def output_dropout(self, config) -> float:
        return float(config.resid_pdrop)

    def dense_ff(self, mlp: nn.Module) -> int:
        return int(mlp.c_fc.nf)

    def expert_tensors(self, mlp: nn.Module) -> ExpertTensors:
        return [("c_fc.weight", mlp.c_fc.weight, 1), ("c_fc.bias", mlp.c_fc.bias, 0),
                ("c_proj.weight", mlp.c_proj.weight, 0), ("c_proj.bias", mlp.c_proj.bias, None)]


@dataclass(frozen=True)
class GPTNeoXFamily(DecoderFamily):
    """GPT-NeoX / Pythia: nn.Linear dense_h_to_4h [ff, d] / dense_4h_to_h [d, ff] with biases,
    any elementwise activation; transposed into GeluExpert's Conv1D layout."""

    def dense_ff(self, mlp: nn.Module) -> int:
        return int(mlp.dense_h_to_4h.out_features)

    def expert_tensors(self, mlp: nn.Module) -> ExpertTensors:
        return [("c_fc.weight", mlp.dense_h_to_4h.weight.t(), 1), ("c_fc.bias", mlp.dense_h_to_4h.bias, 0),
                ("c_proj.weight", mlp.dense_4h_to_h.weight.t(), 0), ("c_proj.bias", mlp.dense_4h_to_h.bias, None)]


@dataclass(frozen=True)
class GatedFamily(DecoderFamily):
    """Llama-style SwiGLU MLP (gate_proj, up_proj, down_proj, SiLU, no biases): SwiGLUExpert's layout."""

    def dense_ff(self, mlp: nn.Module) -> int:
        return int(mlp.gate_proj.out_features)

    def check_mlp(self, mlp: nn.Module, config) -> None:
        act = self.activation(config)
        if act not in ("silu", "swish"):
            raise MoescopeError(f"{self.name} MLP uses hidden_act={act!r}; SwiGLU experts compute SiLU gates only")
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise MoescopeError(f"{self.name} MLP has biases (mlp_bias=True); SwiGLU experts have none")

    def expert_tensors(self, mlp: nn.Module) -> ExpertTensors:
        return [("gate_proj.weight", mlp.gate_proj.weight, 0), ("up_proj.weight", mlp.up_proj.weight, 0),
                ("down_proj.weight", mlp.down_proj.weight, 1)]


FAMILIES: tuple[DecoderFamily, ...] = (
    GPT2Family("GPT-2", "GPT2PreTrainedModel", "h", "gelu"),
    GatedFamily("Llama", "LlamaPreTrainedModel", "layers", "swiglu"),
    GatedFamily("Mistral", "MistralPreTrainedModel", "layers", "swiglu"),
    GatedFamily("Qwen2", "Qwen2PreTrainedModel", "layers", "swiglu"),
    GatedFamily("Qwen3", "Qwen3PreTrainedModel", "layers", "swiglu"),
    GPTNeoXFamily("GPT-NeoX", "GPTNeoXPreTrainedModel", "layers", "gelu"),
)


def supported_families() -> str:
    return ", ".join(f.name for f in FAMILIES)


def decoder_family(model: nn.Module) -> DecoderFamily:
    """The adapter for `model`'s architecture; MoescopeError naming the supported ones otherwise."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise MoescopeError(
        f"{type(model).__name__} is not a supported dense decoder for MoE upcycling "
        f"(supported: {supported_families()})"
    )
