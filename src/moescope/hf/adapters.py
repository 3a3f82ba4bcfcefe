"""Where the router of each MoE family sits and how its logits become the dispatched top-k (layer 1).

One :class:`Adapter` per architecture family, registered in :data:`ADAPTERS`. An
adapter is found from the loaded model's module classes (the router class that the
model's own ``_can_record_outputs["router_logits"]`` names, or moescope's
``MoELayer``), never from the model's name, so a fine-tune under any name works.

What is captured is what the block itself computes: in transformers 5 every MoE
block calls its experts module as ``experts(hidden, top_k_index, top_k_weights)``,
so a forward pre-hook on the experts module sees exactly the experts and weights
each token is dispatched to (after renormalization, sparsemixer, score-correction
bias, group limits and scaling, whatever the family does). The router's own
output (its logits) gives each token's router entropy; the adapter says which
distribution the logits define (softmax, or normalized sigmoid scores).
The selection rules below are documentation for readers; the parity tests
(tests/test_hf_parity.py) hold the capture equal to the experts' inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from moescope.errors import MoescopeError


@dataclass(frozen=True)
class Adapter:
    """One MoE family: its router classes, how logits become the dispatched top-k, its shared experts."""

    name: str
    router_classes: tuple[str, ...]  # class names of the router module (output[0] = router logits [N, E])
    selection: str  # how the router's logits become the experts and weights the block dispatches
    scores: str = "softmax"  # "softmax" | "sigmoid": the router distribution whose entropy is reported
    shared_attrs: tuple[str, ...] = ()  # attribute names of always-on shared experts on the MoE block
    experts_attr: str = "experts"  # the block's experts module, called as experts(hidden, index, weights)
    shared_gate_attr: str = ""  # a [hidden -> 1] module whose sigmoid scales the shared expert per token
    architectures: tuple[str, ...] = ()  # transformers model types known to use it (for messages and docs)


@dataclass
class MoESite:
    """One MoE layer of a loaded model."""

    layer: int  # decoder layer index (the integer in the module path)
    path: str  # module path of the MoE block
    n_experts: int
    top_k: int
    n_shared_experts: int = 0
    router: nn.Module | None = field(default=None, repr=False)
    experts: nn.Module | None = field(default=None, repr=False)
    block: nn.Module | None = field(default=None, repr=False)
    shared_gate: nn.Module | None = field(default=None, repr=False)


MOESCOPE = Adapter(
    name="moescope",
    router_classes=("MoELayer",),
    selection="moescope's own router (moescope.moe.layer): softmax, top-k, capacity drops give weight 0",
    experts_attr="",
    architectures=("moescope",),
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        "softmax-topk",
        ("MixtralTopKRouter", "OlmoeTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "JambaTopKRouter",
         "MiniMaxTopKRouter", "Qwen3NextTopKRouter"),
        "softmax over all experts, top-k, renormalized over the k when the config says so (norm_topk_prob)",
        shared_attrs=("shared_expert",),
        shared_gate_attr="shared_expert_gate",
        architectures=("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "jamba", "minimax", "qwen3_next"),
    ),
    Adapter(
        "dbrx", ("DbrxRouter",),
        "softmax over all experts, top-k, weights p-normalized (moe_normalize_expert_weights)",
        architectures=("dbrx",),
    ),
    Adapter(
        "phimoe-sparsemixer", ("PhimoeTopKRouter",),
        "sparsemixer: top-2 chosen one after another from masked softmaxes of the logits",
        architectures=("phimoe",),
    ),
    Adapter(
        "gpt-oss", ("GptOssTopKRouter",),
        "router with bias; top-k of the logits, then softmax over the k",
        architectures=("gpt_oss",),
    ),
    Adapter(
        "granite-moe",
        ("GraniteMoeTopKRouter", "GraniteMoeSharedTopKRouter", "GraniteMoeHybridTopKRouter"),
        "top-k of the logits, then softmax over the k",
        shared_attrs=("shared_mlp",),
        architectures=("granitemoe", "granitemoeshared", "granitemoehybrid"),
    ),
    Adapter(
        "deepseek-v2", ("DeepseekV2TopkRouter",),
        "softmax over all experts, greedy or group-limited top-k, times routed_scaling_factor",
        shared_attrs=("shared_experts",),
        architectures=("deepseek_v2",),
    ),
    Adapter(
        "deepseek-v3",
        ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter", "Dots1TopkRouter"),
        "sigmoid scores; e_score_correction_bias added for choosing only; group-limited top-k; the unbiased "
        "scores of the chosen experts, renormalized (norm_topk_prob), times routed_scaling_factor",
        scores="sigmoid",
        shared_attrs=("shared_experts",),
        architectures=("deepseek_v3", "glm4_moe", "dots1"),
    ),
    MOESCOPE,
)


def supported_architectures() -> list[str]:
    return sorted({a for adapter in ADAPTERS for a in adapter.architectures})


def _layer_number(path: str) -> int | None:
    numbers = [int(p) for p in path.split(".") if re.fullmatch(r"\d+", p)]
    return numbers[-1] if numbers else None


def _n_shared(owners: list[nn.Module], adapter: Adapter, config) -> int:
    """Shared experts on the MoE block or its decoder layer (Granite keeps shared_mlp on the layer)."""
    if not any(getattr(m, attr, None) is not None for m in owners for attr in adapter.shared_attrs):
        return 0
    n = getattr(config, "n_shared_experts", None)
    return int(n) if isinstance(n, int) and n > 0 else 1


def _looks_like_moe(model: nn.Module) -> bool:
    """Module classes or config keys that only MoE models have (for the 'unknown MoE' message)."""
    config = getattr(model, "config", None)
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return True
    return any(re.search(r"(Experts|Router|Gating|SparseMoe)", type(m).__name__) for m in model.modules())


def find_sites(model: nn.Module) -> tuple[Adapter, list[MoESite]]:
    """The model's adapter and its MoE layers in order.

    Raises MoescopeError for a model without MoE layers, and for an MoE model whose
    router no adapter knows (listing the supported architectures).
    """
    by_class = {cls: adapter for adapter in ADAPTERS for cls in adapter.router_classes}
    config = getattr(model, "config", None)
    found: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        adapter = by_class.get(type(module).__name__)
        if adapter is not None:
            found.setdefault(adapter.name, []).append((path, module))
    if not found:
        kind = type(config).__name__ if config is not None else type(model).__name__
        if _looks_like_moe(model):
            raise MoescopeError(
                f"unknown MoE architecture ({kind}, {type(model).__name__}): moescope can read the routers of "
                f"{', '.join(supported_architectures())}"
            )
        raise MoescopeError(f"{type(model).__name__} ({kind}) has no MoE layer: nothing to analyse")
    if len(found) > 1:
        raise MoescopeError(f"{type(model).__name__}: routers of several families {sorted(found)}; cannot analyse")
    (name, modules), = found.items()
    adapter = next(a for a in ADAPTERS if a.name == name)
    sites: list[MoESite] = []
    for n, (path, module) in enumerate(modules):
        layer = _layer_number(path)
        layer = n if layer is None else layer
        if adapter is MOESCOPE:
            sites.append(MoESite(layer, path, int(module.n_experts), int(module.top_k), router=module, block=module))
            continue
        block_path = path.rsplit(".", 1)[0] if "." in path else ""
        block = model.get_submodule(block_path)
        experts = getattr(block, adapter.experts_attr, None)
        if experts is None:
            raise MoescopeError(f"{path}: {type(block).__name__} has no {adapter.experts_attr!r} module to hook")
        n_experts = getattr(module, "num_experts", None) or getattr(experts, "num_experts", None)
        if n_experts is None and hasattr(module, "weight"):
            n_experts = module.weight.shape[0]
        top_k = (getattr(module, "top_k", None) or getattr(block, "top_k", None)
                 or getattr(config, "num_experts_per_tok", None))
        parent = model.get_submodule(block_path.rsplit(".", 1)[0]) if "." in block_path else model
        sites.append(MoESite(layer, block_path, int(n_experts), int(top_k), _n_shared([block, parent], adapter, config),
                             router=module, experts=experts, block=block,
                             shared_gate=getattr(block, adapter.shared_gate_attr, None) if adapter.shared_gate_attr
                             else None))
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise MoescopeError(f"{type(model).__name__}: two MoE blocks in one layer ({layers}); cannot analyse")
    return adapter, sites
