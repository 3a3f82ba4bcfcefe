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
distribution the logits define (softmax, or normalized sigmoid or other scores).
The selection rules below are documentation for readers; the parity tests
(tests/test_hf_parity.py) hold the capture equal to the experts' inputs.

A family with no adapter here is still read when it follows the transformers 5
convention (its ``_can_record_outputs["router_logits"]`` names a router class whose
parent block has an ``experts`` module called that way): :func:`generic_adapter`
builds its adapter from the model itself. Only the router distribution (for the
entropy) has to be inferred; the dispatched experts and weights are read exactly as
for the named families, i.e. as handed to the experts: a factor some blocks apply to
the experts' summed output afterwards (Laguna's routed_scaling_factor) is not in them.
Routers that also score identity ("zero") experts are refused: the block hands such
tokens to a real expert with weight 0, which would read as that expert's load.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass, field

from torch import nn

from moescope.errors import MoescopeError


@dataclass(frozen=True)
class Adapter:
    """One MoE family: its router classes, how logits become the dispatched top-k, its shared experts."""

    name: str
    router_classes: tuple[str, ...]  # class names of the router module (output[0] = router logits [N, E])
    selection: str  # how the router's logits become the experts and weights the block dispatches
    # the router distribution whose entropy is reported: "softmax" | "sigmoid" of the logits, or "scores":
    # the recorded output already holds non-negative scores (Gemma 4's router returns its softmax), normalized as they are
    scores: str = "softmax"
    shared_attrs: tuple[str, ...] = ()  # attribute names of always-on shared experts on the MoE block
    experts_attr: str = "experts"  # the block's experts module, called as experts(hidden, index, weights)
    shared_gate_attr: str = ""  # a [hidden -> 1] module whose sigmoid scales the shared expert per token
    architectures: tuple[str, ...] = ()  # transformers model types known to use it (for messages and docs)
    logits_index: int = 0  # which output of the router module holds its logits
    # The router output holding each token's dispatch weights over all experts ([N, E], 0 for the
    # experts it does not use), for blocks that call their experts without ids (Llama 4). None:
    # the ids and weights are read where the block hands them to its experts module.
    dense_scores_index: int | None = None
    # The router attribute holding an elementwise score function other than sigmoid / softmax
    # (DeepSeek-V4's sqrtsoftplus): the entropy is that of its scores normalized over the experts.
    score_attr: str = ""
    # blocks that only other modalities reach (ERNIE-4.5-VL's vision experts): idle on text, not analysed
    idle_blocks: tuple[str, ...] = ()


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
        "llama4", ("Llama4Router",),
        "top-k of the logits; each chosen expert's input is scaled by the sigmoid of its logit (the block "
        "runs every expert on every token, weighted 0 where not chosen)",
        scores="sigmoid",
        shared_attrs=("shared_expert",),
        architectures=("llama4", "llama4_text"),
        logits_index=1,
        dense_scores_index=0,
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


GENERIC_SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_mlp")
GENERIC_SELECTION = ("read from what the block hands its experts module (experts(hidden, top_k_index, "
                     "top_k_weights)): the family's own rule, whatever it is")
_SCORE_KINDS = ("sigmoid", "softmax")
# config / module attributes that may say which function scores the router (a string 'sigmoid' / 'softmax')
_SCORE_KEY_HINTS = ("scor", "select", "rout", "gat")


def recorded_routers(model: nn.Module) -> list[tuple[type, int]]:
    """(router class, index of its logits output) that the model's modules name in
    ``_can_record_outputs["router_logits"]`` (the outer model and its base may each name one)."""
    found: list[tuple[type, int]] = []
    for module in model.modules():
        spec = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(spec, "target_class", spec)
        if isinstance(target, type) and all(target is not cls for cls, _ in found):
            found.append((target, int(getattr(spec, "index", 0) or 0)))
    return found


def _named_score_kind(objs: list) -> str | None:
    """A 'sigmoid' / 'softmax' string value in the attributes of `objs` whose name hints at routing."""
    for obj in objs:
        for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
            if (isinstance(value, str) and value.lower() in _SCORE_KINDS and not key.startswith("_")
                    and any(h in key.lower() for h in _SCORE_KEY_HINTS)):
                return value.lower()
    return None


def _called_score_kinds(classes: list[type]) -> set[str]:
    """Which of sigmoid / softmax the routing methods of `classes` call (names in code, never comments)."""
    found: set[str] = set()
    for cls in classes:
        for name in ("forward", "route_tokens_to_experts"):
            fn = getattr(cls, name, None)
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            except (TypeError, OSError, SyntaxError):
                continue
            for node in ast.walk(tree):
                ident = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
                if ident in _SCORE_KINDS:
                    found.add(ident)
    return found


def _score_module(router: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute, module) of an activation the router holds as its score function (ACT2FN's classes)."""
    from transformers.activations import ACT2CLS

    kinds = tuple(v if isinstance(v, type) else v[0] for v in ACT2CLS.values()) + (nn.Softmax,)
    for name, child in router.named_children():
        if isinstance(child, kinds) and not any(True for _ in child.parameters()):
            return name, child
    return None


def _returned_score_kind(router_cls: type, index: int) -> str | None:
    """'softmax' / 'sigmoid' when the router's forward returns, at output `index`, a name it assigned from
    that call (the recorded output is then scores already, not logits); else None."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(router_cls.forward)))
    except (TypeError, OSError, SyntaxError):
        return None
    # every way each name gets a value: a plain `name = softmax(...)` / `sigmoid(...)` gives that kind;
    # anything else (a parameter, another call, a tuple or loop target, an augmented assignment) None
    kinds: dict[str, set] = {}
    scored: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            ident = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            for target in node.targets:
                if isinstance(target, ast.Name) and ident in _SCORE_KINDS:
                    kinds.setdefault(target.id, set()).add(ident)
                    scored.add(id(target))
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) or (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
                                         and id(node) not in scored):
            kinds.setdefault(node.arg if isinstance(node, ast.arg) else node.id, set()).add(None)
    made = {name: next(iter(k)) for name, k in kinds.items() if len(k) == 1 and None not in k}
    returned = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            elts = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            out = elts[index] if index < len(elts) else None
            returned.add(made.get(out.id) if isinstance(out, ast.Name) else None)
    return returned.pop() if len(returned) == 1 else None


def infer_scores(config, router: nn.Module, block: nn.Module, logits_index: int = 0) -> tuple[str, str, str]:
    """The router distribution of a family without an adapter and how it was told: (scores, how,
    score_attr). scores is 'sigmoid', 'softmax' or the name of another score function the router holds
    (then score_attr names that attribute).

    A score function the router holds as a module (DeepSeek-V4's score_fn) decides; then a setting that
    names sigmoid or softmax (Cohere2-MoE's expert_selection_fn, Inkling2's scoring_func in its text
    config); otherwise the function the router's and block's routing code calls, when it calls only one
    of them; softmax when the code calls both or neither. A router whose recorded output is itself the
    result of softmax / sigmoid (Gemma 4) gives "scores": applying the function again would flatten every
    distribution towards uniform.
    """
    returned = _returned_score_kind(type(router), logits_index)
    if returned is not None:
        return "scores", f"the router returns its {returned} scores, normalized as they are", ""
    held = _score_module(router)
    if held is not None:
        attr, module = held
        if isinstance(module, nn.Sigmoid):
            return "sigmoid", f"the router's {attr} module", ""
        if isinstance(module, nn.Softmax):
            return "softmax", f"the router's {attr} module", ""
        name = type(module).__name__.removesuffix("Activation").lower()
        return name, f"the router's {attr} module ({type(module).__name__})", attr
    configs = [c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None]
    named = _named_score_kind([router, block]) or _named_score_kind(configs)
    if named:
        return named, "named by the model's settings", ""
    called = _called_score_kinds([type(router), type(block)])
    if len(called) == 1:
        (kind,) = called
        return kind, "the only one of softmax / sigmoid its routing code calls", ""
    return "softmax", "assumed: its routing code calls " + (" and ".join(sorted(called)) or "neither softmax nor sigmoid"), ""


_ROUTER_ATTRS = ("gate", "router")


def routing_blocks(model: nn.Module, experts_attr: str = "experts") -> list[tuple[str, nn.Module]]:
    """(path, block) of every module whose `experts_attr` child is called with dispatched ids and weights."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(getattr(m, experts_attr, None), nn.Module) and takes_routing(getattr(m, experts_attr))]


def _sibling_routers(model: nn.Module, router_cls: type) -> list[tuple[str, nn.Module]]:
    """Routers of another class in blocks shaped like the recorded ones (DeepSeek-V4's hash-routed layers:
    a `gate` of its own class, the same experts(hidden, ids, weights) call, logits first)."""
    found = []
    for path, block in routing_blocks(model):
        if any(isinstance(child, router_cls) for child in block.children()):
            continue
        if (gate := _block_gate(block)) is not None:
            found.append((f"{path}.{gate[0]}" if path else gate[0], gate[1]))
    return found


def _modality_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the routing blocks directly under `module` when it holds one per modality
    (ERNIE-4.5-VL records its whole text + vision block), the one named for text first; [] for a router,
    a block, or blocks none or several of which are named for text."""
    if isinstance(getattr(module, "experts", None), nn.Module):
        return []
    inner = [(name, child) for name, child in module.named_children()
             if isinstance(getattr(child, "experts", None), nn.Module) and takes_routing(child.experts)
             and _block_gate(child) is not None]
    text = [nc for nc in inner if "text" in re.split(r"[^a-z]+", nc[0].lower())]
    return [text[0], *[nc for nc in inner if nc is not text[0]]] if len(text) == 1 else []


def _block_gate(block: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute, module) of the block's one router (`gate` or `router`), None when it has none or both."""
    gates = [(name, getattr(block, name)) for name in _ROUTER_ATTRS if isinstance(getattr(block, name, None), nn.Module)]
    return gates[0] if len(gates) == 1 else None


def generic_adapter(model: nn.Module) -> tuple[Adapter, list[tuple[str, nn.Module]]] | None:
    """An adapter built from the model's own router recording, and its router modules (None if it has none)."""
    for router_cls, index in recorded_routers(model):
        modules = [(path, m) for path, m in model.named_modules() if type(m) is router_cls]
        if modules:
            break
    else:
        return None
    idle: list[str] = []
    if all(_modality_blocks(m) for _, m in modules):
        # the recorded module holds one MoE block per modality: read the text block's own router (its
        # logits come first, as transformers' routers return them); the others stay idle on text
        gated = []
        for path, m in modules:
            (name, text_block), *others = _modality_blocks(m)
            gate_name, gate = _block_gate(text_block)
            gated.append((f"{path}.{name}.{gate_name}", gate))
            idle += [f"{path}.{other}" for other, _ in others]
        modules, router_cls, index = gated, type(gated[0][1]), 0
    path, router = modules[0]
    block = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    config = getattr(model, "config", None)
    scores, how, score_attr = infer_scores(config, router, block, index)
    siblings = _sibling_routers(model, router_cls)
    if siblings:  # in model order, with the recorded ones
        order = {p: i for i, (p, _) in enumerate(model.named_modules())}
        modules = sorted(modules + siblings, key=lambda pm: order[pm[0]])
    classes = (router_cls.__name__, *sorted({type(m).__name__ for _, m in siblings}))
    return Adapter(
        name="generic",
        router_classes=classes,
        selection=f"{GENERIC_SELECTION}; router distribution {scores} ({how})",
        scores=scores,
        shared_attrs=GENERIC_SHARED_ATTRS,
        shared_gate_attr="shared_expert_gate",
        architectures=(str(getattr(config, "model_type", type(model).__name__)),),
        logits_index=index,
        score_attr=score_attr,
        idle_blocks=tuple(idle),
    ), modules


_SHARED_COUNT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "n_experts")
_TOP_K_KEYS = ("top_k", "num_experts_per_tok", "moe_k", "moe_top_k", "moe_topk", "num_experts_per_token",
               "top_k_experts")


def takes_routing(experts: nn.Module) -> bool:
    """True when the experts module's forward takes (hidden, expert ids, weights), as transformers 5 blocks call it."""
    try:
        params = list(inspect.signature(experts.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _first_int(objs: list, keys: tuple[str, ...]) -> int | None:
    """The first positive int attribute among `keys` of the first object that has one (lists: their first)."""
    for obj in objs:
        for key in keys:
            value = getattr(obj, key, None)
            if isinstance(value, (list, tuple)) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def router_width(router: nn.Module) -> int | None:
    """How many choices the router scores, read off its own weight ([choices, hidden]) or the one linear
    layer inside it (None when it has neither or several: a router MLP, whose last layer is not known)."""
    weight = router._parameters.get("weight")
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    linears = [m for m in router.modules() if isinstance(m, nn.Linear)]
    return int(linears[0].out_features) if len(linears) == 1 else None


def zero_experts_message(path: str, width: int, n_experts: int) -> str:
    return (f"{path}: the router scores {width} choices for {n_experts} experts (zero or identity experts, as "
            "LongCat-Flash has): moescope cannot tell them from the experts the block hands its tokens to")


def _unrouted_blocks(model: nn.Module, sites: list[MoESite], adapter: Adapter) -> list[str]:
    """Paths of blocks whose experts module takes dispatched ids but whose router no site covers
    (DeepSeek-V4's hash-routed layers)."""
    covered = {s.path for s in sites} | set(adapter.idle_blocks)
    return [path for path, _ in routing_blocks(model, adapter.experts_attr or "experts") if path not in covered]


def _unknown_moe_message(model: nn.Module, kind: str, why: str = "") -> str:
    return (f"unknown MoE architecture ({kind}, {type(model).__name__}){': ' + why if why else ''}: moescope reads "
            f"the routers of {', '.join(supported_architectures())}, and of any transformers MoE decoder whose "
            "router is named in _can_record_outputs['router_logits'] and whose block calls "
            "experts(hidden, top_k_index, top_k_weights)")


def _layer_number(path: str) -> int | None:
    numbers = [int(p) for p in path.split(".") if re.fullmatch(r"\d+", p)]
    return numbers[-1] if numbers else None


def _n_shared(owners: list[nn.Module], adapter: Adapter, config) -> int:
    """Shared experts on the MoE block or its decoder layer (Granite keeps shared_mlp on the layer)."""
    if not any(getattr(m, attr, None) is not None for m in owners for attr in adapter.shared_attrs):
        return 0
    configs = [c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None]
    return _first_int(configs, _SHARED_COUNT_KEYS) or 1


def _moe_config_key(model: nn.Module) -> str | None:
    """A config key that only MoE models set (an expert count above 1), if any."""
    config = getattr(model, "config", None)
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return key
    return None


def _has_moe_modules(model: nn.Module) -> bool:
    """Module classes that only MoE models have (for the 'unknown MoE' message)."""
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
    if len(found) > 1:
        raise MoescopeError(f"{type(model).__name__}: routers of several families {sorted(found)}; cannot analyse")
    if found:
        (name, modules), = found.items()
        adapter = next(a for a in ADAPTERS if a.name == name)
    elif (generic := generic_adapter(model)) is not None:
        adapter, modules = generic
    else:
        kind = type(config).__name__ if config is not None else type(model).__name__
        if _has_moe_modules(model):
            raise MoescopeError(_unknown_moe_message(model, kind))
        if (key := _moe_config_key(model)) is not None:
            raise MoescopeError(f"{type(model).__name__} ({kind}) has no MoE layer moescope recognizes: its config "
                                f"sets {key} = {getattr(config, key)}, but no block built from it has an experts, "
                                "router or gating module (all blocks dense, or an MoE family moescope cannot read)")
        raise MoescopeError(f"{type(model).__name__} ({kind}) has no MoE layer: nothing to analyse")
    sites = sites_of(model, adapter, modules)
    if adapter is not MOESCOPE and (missed := _unrouted_blocks(model, sites, adapter)):
        raise MoescopeError(f"{type(model).__name__}: the MoE blocks at {', '.join(missed)} route through another "
                            f"router than {', '.join(adapter.router_classes)} (e.g. by token hash); moescope "
                            "cannot read them")
    return adapter, sites


def sites_of(model: nn.Module, adapter: Adapter, modules: list[tuple[str, nn.Module]]) -> list[MoESite]:
    """The MoE layers whose routers are `modules` ((path, module) in model order), read the adapter's way."""
    config = getattr(model, "config", None)
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
        if not isinstance(experts, nn.Module):
            raise MoescopeError(_unknown_moe_message(model, type(config).__name__, f"{type(block).__name__} at {path} "
                                                     f"has no {adapter.experts_attr!r} module to hook"))
        if adapter.dense_scores_index is None and not takes_routing(experts):
            raise MoescopeError(_unknown_moe_message(model, type(config).__name__, f"{type(experts).__name__} at "
                                                     f"{block_path}.{adapter.experts_attr} is not called with the "
                                                     "dispatched experts and weights"))
        n_experts = _first_int([module, experts, block], _EXPERT_COUNT_KEYS) or router_width(module)
        top_k = _first_int([module, block, config], _TOP_K_KEYS)
        if n_experts is None or top_k is None:
            missing = " and ".join(w for w, v in (("expert count", n_experts), ("top-k", top_k)) if v is None)
            raise MoescopeError(f"{path}: {type(module).__name__}, its block and the config give no positive "
                                f"{missing}; the config is inconsistent")
        parent = model.get_submodule(block_path.rsplit(".", 1)[0]) if "." in block_path else model
        n_shared = _n_shared([block, parent], adapter, config)
        # refused before any weight is read when the router scores more choices than the experts and the
        # shared experts it may also gate (Inkling's weight has a row for its shared expert); the recorder
        # checks the width of the logits it returns in any case
        width = router_width(module)
        if width is not None and width not in (n_experts, n_experts + n_shared):
            raise MoescopeError(zero_experts_message(path, width, n_experts))
        sites.append(MoESite(layer, block_path, int(n_experts), int(top_k), n_shared,
                             router=module, experts=experts, block=block,
                             shared_gate=getattr(block, adapter.shared_gate_attr, None) if adapter.shared_gate_attr
                             else None))
    layers = [s.layer for s in sites]
    if len(set(layers)) != len(layers):
        raise MoescopeError(f"{type(model).__name__}: two MoE blocks in one layer ({layers}); cannot analyse")
    return sites
