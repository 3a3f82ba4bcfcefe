"""Parity: the captured top-k experts, weights and router entropies equal what each model's own MoE block used.

For every supported architecture a tiny random-weight model is saved with a
tokenizer, loaded back the way `moescope analyze --model` loads it, captured into
the on-disk stream, and compared with an independent forward pass of a separately
loaded copy whose experts modules are hooked directly (what they were dispatched),
and with the model's own ``output_router_logits`` (the router distribution).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_fixtures import (
    ARCHITECTURES,
    EXPECTED_MOE_LAYERS,
    GENERIC_ARCHITECTURES,
    corpus,
    make_tokenizer,
    save_model_dir,
)
from train_fixtures import one_thread  # noqa: F401

from moescope.analysis import capture
from moescope.hf import loading, texts
from moescope.hf.adapters import find_sites, recorded_routers, takes_routing
from moescope.hf.recorder import RoutingRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 24
# sigmoid scores, read off each family's transformers source; every other family here is a softmax router
SIGMOID_ROUTERS = {"deepseek_v3", "glm4_moe", "minimax_m2", "exaone_moe", "glm4_moe_lite", "llama4_text", "inkling_text"}
# routers whose recorded output is already their softmax (its entropy is taken as it is)
PROBABILITY_ROUTERS = {"gemma4_text"}
# blocks that run their experts on every token, weighted by the router's dense scores (no ids handed over)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _dispatched(model, tokens: torch.Tensor) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (ids, weights)} given to every experts module, hooked independently of moescope's adapters."""
    seen: dict[int, list] = {}
    handles = []
    for path, module in model.named_modules():
        if path.endswith(".shared_expert_gate"):
            layer = [int(p) for p in path.split(".") if p.isdigit()][-1]
            handles.append(module.register_forward_hook(
                lambda mod, args, out, layer=layer: seen.setdefault(("shared", layer), []).append(
                    (torch.sigmoid(out).reshape(-1).numpy(), None))))
        if path.endswith(".experts") and type(module).__name__.endswith("Experts") and takes_routing(module):
            layer = [int(p) for p in path.split(".") if p.isdigit()][-1]

            def hook(mod, args, kwargs, layer=layer):
                seen.setdefault(layer, []).append((args[1].reshape(-1, args[1].shape[-1]).numpy(),
                                                   args[2].reshape(-1, args[2].shape[-1]).float().numpy()))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=tokens, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    got = {layer: (np.concatenate([a for a, _ in v]), None if v[0][1] is None else np.concatenate([b for _, b in v]))
           for layer, v in seen.items()}
    if not seen:  # Llama 4: the router's top-k of its logits, each weighted by the sigmoid of its logit
        k = model.config.num_experts_per_tok
        layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.feed_forward, "router")]
        for layer, logits in zip(layers, out.router_logits):
            top = logits.float().topk(k, dim=-1)
            got[layer] = (top.indices.numpy(), torch.sigmoid(top.values).numpy())
    return got, out.router_logits


def _by_id(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights.astype(np.float64), order, 1)


@pytest.mark.parametrize("arch", ARCHITECTURES + GENERIC_ARCHITECTURES)
def test_capture_equals_dispatch(arch: str, tokenizer, tmp_path) -> None:
    import transformers

    model_dir = save_model_dir(tmp_path / "model", arch, tokenizer=tokenizer)
    plan = loading.plan_model(str(model_dir), "fp32", "cpu")
    blocks = texts.pack_texts(corpus(), loading.load_tokenizer(str(model_dir)), CONTEXT, max_blocks_per_domain=2)
    model = loading.load_model(plan)
    adapter, sites = find_sites(model)  # plan.sites belong to the empty copy; hook the loaded model
    assert adapter == plan.adapter
    assert (adapter.name == "generic") == (arch in GENERIC_ARCHITECTURES)
    stream = capture.RoutingStream(tmp_path / "stream")
    with RoutingRecorder(adapter, sites) as rec:
        capture.stream_routing(model, blocks.tokens, blocks.domain, blocks.domains, recorder=rec, stream=stream,
                               batch_blocks=2, progress=False)
    stream.close()
    assert [s.layer for s in sites] == EXPECTED_MOE_LAYERS.get(arch, [0, 1])
    assert [s.layer for s in plan.sites] == [s.layer for s in sites]

    reference = getattr(transformers, plan.auto_class).from_pretrained(model_dir, dtype=torch.float32).eval()
    dispatched, router_logits = _dispatched(reference, torch.from_numpy(blocks.tokens))
    assert sorted(k for k in dispatched if isinstance(k, int)) == [s.layer for s in sites]
    named = {cls for cls, _ in recorded_routers(model)}
    # the recorded module is the router, or (ERNIE-4.5-VL) the block holding the per-modality blocks
    recorded = [s.layer for s in sites if not named or type(s.router) in named
                or type(model.get_submodule(s.path.rsplit(".", 1)[0])) in named]
    logits_of = dict(zip(recorded, router_logits))
    assert len(recorded) == len(router_logits)
    for site in sites:
        table = capture.streamed_table(stream, site.layer, blocks.tokens, blocks.domain, site.n_experts)
        assert table.n_experts == 8 and table.top_k == site.top_k
        ids, weights = _by_id(np.asarray(table.expert_index), np.asarray(table.gate_weight))
        ref_ids, ref_weights = _by_id(*dispatched[site.layer])
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(weights, ref_weights, rtol=2e-3, atol=1e-4)  # stored as float16
        # first choice = the largest weight
        w = np.asarray(table.gate_weight, dtype=np.float64)
        assert np.all(w[:, 0] >= w.max(axis=1) - 1e-6)
        # router entropy against the model's own router logits (outputs ordered like the MoE layers whose
        # router class the model records: DeepSeek-V4's hash-routed layer has none)
        if site.layer in logits_of:
            logits = logits_of[site.layer].reshape(-1, 8).float()
            if arch in PROBABILITY_ROUTERS:
                p = logits / logits.sum(-1, keepdim=True)
            elif arch in SIGMOID_ROUTERS or arch == "deepseek_v4":
                p = torch.sigmoid(logits) if arch != "deepseek_v4" else torch.sqrt(torch.nn.functional.softplus(logits))
                p = p / p.sum(-1, keepdim=True)
            else:
                p = torch.softmax(logits, -1)
            ent = -(p * torch.log(p)).sum(-1).numpy()
            np.testing.assert_allclose(np.asarray(table.router_entropy), ent, rtol=1e-4, atol=1e-5)
        assert float(np.asarray(table.router_entropy).std()) > 0  # not a constant: the routers do differ per token
        shared = stream.columns(site.layer).get("shared_gate")
        assert (shared is not None) == (arch == "qwen2_moe")  # the only family here with a gated shared expert
        if shared is not None:
            np.testing.assert_allclose(shared, dispatched[("shared", site.layer)][0], rtol=1e-6)
