"""c-BTM (Gururangan et al. 2023): mix the branch models' next-token probabilities.

Pure computation. A context's weight on expert e is softmax(-d_e^2 / T) over the
experts, d_e the distance of the context's embedding to partition e's centroid,
optionally kept to the top-k experts and renormalized (c-BTM's sparse inference).
"""

from __future__ import annotations

import numpy as np
import torch


def ensemble_weights(
    context_vectors: np.ndarray, centroids: np.ndarray, temperature: float, top_k: int | None = None
) -> np.ndarray:
    """[n_contexts, n_experts] mixture weights (rows sum to 1)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = np.asarray(context_vectors, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    d2 = np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :], 0.0)
    logits = -d2 / temperature
    if top_k is not None and top_k < c.shape[0]:
        # keep the k nearest experts (ties by index), the rest get zero weight
        drop = np.argsort(d2, axis=1, kind="stable")[:, top_k:]
        np.put_along_axis(logits, drop, -np.inf, axis=1)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def mix_target_logprobs(target_logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_e w_e p_e(y): target_logprobs [E, n, T] (each expert's log p of the true token),
    weights [n, E] -> [n, T].

    Mixing only the true token's probability gives the mixture's exact log-likelihood, so
    each branch can be evaluated alone (one model in memory at a time).
    """
    logw = torch.log(weights.double().clamp_min(0)).T[:, :, None]  # [E, n, 1]; log 0 = -inf drops an expert
    return torch.logsumexp(target_logprobs.double() + logw, dim=0)
