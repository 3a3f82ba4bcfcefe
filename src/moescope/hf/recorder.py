"""Listen to the MoE layers of a loaded model during a forward pass (layer 1: tensors in, arrays out).

``with RoutingRecorder(adapter, sites) as rec: model(x); routing = rec.take()`` gives,
per MoE layer, the experts and weights every token was dispatched to and its
router entropy, in flattened (batch, position) order. Hooks only read tensors, so
the model computes exactly what it computes without them.

Each token's k choices are ordered by weight, largest first (stable on ties), so
column 0 is the first choice even where the model's top-k is unsorted
(DeepSeek's ``sorted=False``); the set of experts and their weights is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moescope.errors import MoescopeError
from moescope.hf.adapters import MOESCOPE, Adapter, MoESite, zero_experts_message

# Names under which transformers' experts modules receive the dispatched ids / weights.
_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "topk_weights")


@dataclass
class LayerRouting:
    """One layer's routing of one forward pass (numpy, on the CPU)."""

    expert_index: np.ndarray  # int16 [N, k], first choice in column 0
    gate_weight: np.ndarray  # float16 [N, k], the weight each expert's output is multiplied by
    router_entropy: np.ndarray  # float32 [N], nats
    shared_gate: np.ndarray | None = None  # float32 [N]: sigmoid gate of the shared expert (Qwen2-MoE), if any


def router_entropy(logits: torch.Tensor, scores: str, score_fn=None) -> torch.Tensor:
    """Entropy (nats) of each row's router distribution: softmax of the logits, or the normalized scores of
    sigmoid (or of `score_fn`, another positive elementwise score function the router holds), or with
    scores="scores" the normalized values themselves (a router that returns its softmax / sigmoid)."""
    logits = logits.float()
    if scores in ("sigmoid", "scores") or score_fn is not None:
        s = (score_fn(logits) if score_fn is not None else torch.sigmoid(logits) if scores == "sigmoid"
             else logits.clamp_min(0.0))
        p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def order_by_weight(index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (index, weight) pairs sorted by weight, largest first."""
    weight, order = torch.sort(weight, dim=-1, descending=True, stable=True)
    return index.gather(-1, order), weight


def _argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...]) -> torch.Tensor:
    if len(args) > position:
        return args[position]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError(f"experts module called without its routing argument ({names[0]})")


class RoutingRecorder:
    """Forward hooks on every MoE site; :meth:`take` returns and clears the last forward's routing."""

    def __init__(self, adapter: Adapter, sites: list[MoESite]) -> None:
        self.adapter = adapter
        self.sites = sites
        self._handles: list = []
        self._pending: dict[int, dict[str, torch.Tensor]] = {}

    # hooks keep device tensors; take() moves everything to the CPU once per forward
    def _on_router(self, site: MoESite):
        def hook(module: nn.Module, args, output) -> None:
            logits = output[self.adapter.logits_index] if isinstance(output, (tuple, list)) else output
            if logits.shape[-1] != site.n_experts:  # zero / identity experts beside the real ones
                raise MoescopeError(zero_experts_message(site.path, int(logits.shape[-1]), site.n_experts))
            score_fn = getattr(module, self.adapter.score_attr) if self.adapter.score_attr else None
            ent = router_entropy(logits.detach().reshape(-1, logits.shape[-1]), self.adapter.scores, score_fn)
            pending = self._pending.setdefault(site.layer, {})
            pending["router_entropy"] = ent
            if self.adapter.dense_scores_index is not None:
                # the router's own choice (top-k of its logits), weighted by its dense scores
                flat = logits.detach().reshape(-1, logits.shape[-1])
                index = flat.topk(site.top_k, dim=-1).indices
                scores = output[self.adapter.dense_scores_index].detach().reshape(flat.shape)
                pending.update(**dict(zip(("expert_index", "gate_weight"),
                                          order_by_weight(index, scores.gather(-1, index)))))
        return hook

    def _on_experts(self, layer: int):
        def hook(module: nn.Module, args, kwargs) -> None:
            index = _argument(args, kwargs, 1, _INDEX_NAMES).detach()
            weight = _argument(args, kwargs, 2, _WEIGHT_NAMES).detach()
            index, weight = order_by_weight(index.reshape(-1, index.shape[-1]), weight.reshape(-1, weight.shape[-1]))
            self._pending.setdefault(layer, {}).update(expert_index=index, gate_weight=weight)
        return hook

    def _on_shared_gate(self, layer: int):
        def hook(module: nn.Module, args, output) -> None:
            self._pending.setdefault(layer, {})["shared_gate"] = torch.sigmoid(output.detach().float()).reshape(-1)
        return hook

    def _on_moescope_layer(self, layer: int):
        def hook(module: nn.Module, args, output) -> None:
            rec = module.last_record
            probs = rec.router_probs.float()
            ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)
            self._pending[layer] = {"expert_index": rec.expert_index, "gate_weight": rec.gate_weight,
                                    "router_entropy": ent}
        return hook

    def __enter__(self) -> "RoutingRecorder":
        self._previous_capture = {}
        for site in self.sites:
            if self.adapter is MOESCOPE:
                self._previous_capture[site.layer] = site.router.capture
                site.router.capture = True
                self._handles.append(site.router.register_forward_hook(self._on_moescope_layer(site.layer)))
            else:
                self._handles.append(site.router.register_forward_hook(self._on_router(site)))
                if self.adapter.dense_scores_index is None:
                    self._handles.append(
                        site.experts.register_forward_pre_hook(self._on_experts(site.layer), with_kwargs=True))
                if site.shared_gate is not None:
                    self._handles.append(site.shared_gate.register_forward_hook(self._on_shared_gate(site.layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for site in self.sites:
            if site.layer in self._previous_capture:
                site.router.capture = self._previous_capture[site.layer]

    def take(self) -> dict[int, LayerRouting]:
        """The last forward's routing per layer; raises if a layer did not run its experts."""
        out = {}
        for site in self.sites:
            got = self._pending.get(site.layer, {})
            expected = {"expert_index", "gate_weight", "router_entropy"} | (
                {"shared_gate"} if site.shared_gate is not None else set())
            if set(got) != expected:
                raise RuntimeError(f"MoE layer {site.layer} ({site.path}) recorded {sorted(got)} in this forward")
            out[site.layer] = LayerRouting(
                expert_index=got["expert_index"].to(torch.int16).cpu().numpy(),
                gate_weight=got["gate_weight"].to(torch.float16).cpu().numpy(),
                router_entropy=got["router_entropy"].to(torch.float32).cpu().numpy(),
                shared_gate=got["shared_gate"].cpu().numpy() if "shared_gate" in got else None,
            )
        self._pending = {}
        return out
