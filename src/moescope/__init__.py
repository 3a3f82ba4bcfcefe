"""moescope: train mixture-of-experts language models and see what their experts learn.

The few things a researcher imports (see the README, "Use moescope as a library")::

    from moescope import MoELayer, MoEConfig, install_moe, record_routing, save_moe_model, load_moe_model

Layer and routing:
  MoELayer            a token-choice mixture of experts around any expert modules
  MoEConfig           the MoE layout of a model (experts, top-k, which blocks, noise, ...)
  RoutingRecord       what one forward of one MoELayer routed where
  load_balancing_loss, router_z_loss   the auxiliary losses the trainer adds
  record_routing      `with record_routing(model) as rec:` per-token routing of every MoE layer
  RoutingSums         routing statistics summed over many forwards (counts, losses, summary)
Models:
  install_moe         replace a dense decoder's MLPs with MoE layers (upcycled copies by default)
  moe_layers          {block index: MoELayer} of any model
  save_moe_model, load_moe_model       safetensors + JSON, no pickle
  generate_with_routing                `generate` plus the experts behind every new token
Data and training:
  BlockStore          a data directory built by `moescope data build`
  RunConfig, train_run                 one training run from Python
  MoescopeError       every error meant for a user (bad file, bad value)

Names are imported on first use (module `__getattr__`), so `import moescope` and
`moescope --help` load neither torch nor transformers.

Layers of the code (imports point downward only):
  1. computation  -- tensors/arrays in, tensors/arrays out (moe.layer, analysis.metrics, cluster.merge, ...)
  2. data and I/O -- files, formats, sources, checkpoints, plots, reports (data.*, io.*, report.*)
  3. orchestration -- CLI, trainer loop, experiments, demo (cli, commands.*, train.trainer, ...)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MoELayer": "moescope.moe.layer",
    "MoEConfig": "moescope.moe.config",
    "RoutingRecord": "moescope.moe.layer",
    "load_balancing_loss": "moescope.moe.layer",
    "router_z_loss": "moescope.moe.layer",
    "record_routing": "moescope.moe.capture",
    "RoutingView": "moescope.moe.capture",
    "RoutingSums": "moescope.moe.routing_sums",
    "install_moe": "moescope.moe.install",
    "moe_layers": "moescope.moe.model",
    "save_moe_model": "moescope.moe.hf_model",
    "load_moe_model": "moescope.moe.hf_model",
    "generate_with_routing": "moescope.moe.capture",
    "BlockStore": "moescope.data.blocks",
    "RunConfig": "moescope.train.config",
    "train_run": "moescope.train.trainer",
    "MoescopeError": "moescope.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moescope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
