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
