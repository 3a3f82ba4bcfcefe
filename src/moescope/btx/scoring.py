"""Held-out scores shared by every model of the comparison (dense, merged MoE, c-BTM ensemble).

Pure computation. Every model is scored on the same tokens: the positions after the
first `context_tokens` of each eval block, because c-BTM chooses its experts from that
context (it may not look at the tokens it is scored on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def target_logprobs(model: nn.Module, blocks: torch.Tensor, batch_sequences: int = 32) -> torch.Tensor:
    """[n, T-1] log p(x[t+1] | x[:t+1]) of each block under `model` (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, blocks.shape[0], batch_sequences):
            x = blocks[s : s + batch_sequences]
            logits = model(input_ids=x).logits[:, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, blocks.shape[1] - 1))


def continuation_losses(
    logprobs: torch.Tensor, domain_ids: np.ndarray, domains: Sequence[str], context_tokens: int
) -> dict:
    """Mean NLL (nats/token) per domain over predicted positions >= context_tokens,
    plus token- and domain-weighted averages."""
    scored = -logprobs[:, max(context_tokens - 1, 0) :].double()  # predicting token t+1 for t >= context-1
    per = {}
    for d, name in enumerate(domains):
        rows = np.flatnonzero(np.asarray(domain_ids) == d)
        if rows.size:
            part = scored[torch.from_numpy(rows)]
            per[name] = {"loss": float(part.mean()), "tokens": int(part.numel())}
    tokens = sum(v["tokens"] for v in per.values())
    return {
        "domains": per,
        "token_weighted": sum(v["loss"] * v["tokens"] for v in per.values()) / max(tokens, 1),
        "domain_weighted": sum(v["loss"] for v in per.values()) / max(len(per), 1),
    }


def forward_flops_per_token(model: nn.Module, context_tokens: int) -> float:
    """Forward multiply-adds x 2 per token at full context: every weight matrix a token passes through
    (an MoE layer's experts counted top_k / n_experts, its router in full; the tied unembedding once, the
    embedding lookups not at all) plus attention's scores and weighted sum, 2 x 2 x context x d_model
    per layer (Kaplan et al. 2020, with the unembedding kept because small models spend much of their
    compute there). Biases and norms are left out: they are O(d) per token."""
    from moescope.moe.model import moe_layers

    counted: set[int] = set()
    flops = 0.0
    for layer in moe_layers(model).values():
        share = layer.top_k / layer.n_experts
        for p in layer.experts.parameters():
            counted.add(id(p))
            if p.dim() >= 2:
                flops += 2 * p.numel() * share
    wpe = getattr(model.transformer, "wpe", None)
    skip = {id(model.transformer.wte.weight)} | ({id(wpe.weight)} if wpe is not None else set())
    for p in model.parameters():
        if id(p) in counted or id(p) in skip or p.dim() < 2:
            continue
        counted.add(id(p))
        flops += 2 * p.numel()
    head = model.get_output_embeddings()
    if head is None or id(head.weight) in skip:  # tied: the unembedding matmul still happens
        flops += 2 * model.transformer.wte.weight.numel()
    d_model = model.transformer.wte.weight.shape[1]
    flops += 4 * len(model.transformer.h) * context_tokens * d_model
    return float(flops)
