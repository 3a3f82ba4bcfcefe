"""The GELU that moescope builds models with: torch's fused tanh GELU, not GPT-2's Python chain.

GPT-2's `gelu_new` (transformers' NewGELUActivation) is seven elementwise ops written in
Python (pow, mul, add, mul, tanh, add, mul), each a pass over the [rows, ff] buffer, and
autograd walks a similar chain back. `F.gelu(x, approximate="tanh")` (transformers'
"gelu_pytorch_tanh") computes the same function in one fused kernel; the two agree to
~1e-7 in float32 (tested), so every model moescope builds or loads uses the fused name
and a pretrained GPT-2 is mapped to it (logits within 1e-5, tested). The measured
speed-up is printed by benchmarks/bench_activation.py. The earlier cache-blocked
wrapper (the chain on row blocks) is gone: on the fused kernel it only added time.
"""

from __future__ import annotations

# GPT-2's Python chain -> torch's fused kernel of the same function.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
# Where transformers configs name their MLP activation: GPT-2's key, and everyone else's.
ACTIVATION_KEYS = ("activation_function", "hidden_act")


def fused_activation(name: str) -> str:
    """The fused op computing the same activation as `name` (unchanged if there is none)."""
    return FUSED_ACTIVATIONS.get(name, name)


def fuse_config_activation(config) -> bool:
    """Switch a transformers config's activation to its fused equivalent in place; True if changed.

    Call before a model is built from `config`: modules read the activation at init.
    """
    changed = False
    for key in ACTIVATION_KEYS:
        name = getattr(config, key, None)
        if isinstance(name, str) and fused_activation(name) != name:
            setattr(config, key, fused_activation(name))
            changed = True
    return changed
