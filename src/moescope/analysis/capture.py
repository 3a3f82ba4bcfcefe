"""Capture: run a trained model over eval blocks and keep where every token was routed (layer 2, I/O).

One pass gives, per MoE layer, a :class:`~moescope.analysis.table.RoutingTable`
(token-aligned arrays) plus each block's summed next-token loss, so the same
forward serves the routing analysis and the per-domain eval-loss intervals. Files:
``routing/LAYER.npz`` (one table per layer, written atomically).

Everything is read through ``BlockStore``; the model is a ``transformers`` GPT-2
with MoE layers (``moescope.moe``). The extra work of capture is copying each
layer's expert choices and router probabilities off the forward pass
(benchmarks/bench_capture.py measures it against a plain eval forward).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from moescope.analysis.table import RoutingTable
from moescope.data.blocks import BlockStore
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_bytes
from moescope.moe.gpt2 import moe_layers


@dataclass
class CaptureResult:
    """Routing per MoE layer plus per-block loss, for the blocks that were run."""

    tables: dict[int, RoutingTable]  # {block_index_in_model: table}; empty for a dense model
    block_rows: np.ndarray  # [B] row in store.index(split): the block id used in the tables
    block_domain: np.ndarray  # [B] domain id
    block_loss_sum: np.ndarray  # [B] summed next-token cross-entropy (nats)
    block_tokens: np.ndarray  # [B] predicted tokens (block_size - 1)


def select_eval_rows(store: BlockStore, split: str = "eval", max_blocks_per_domain: int | None = None) -> np.ndarray:
    """Rows of ``store.index(split)`` to analyse: all, or up to N per domain spread evenly over the split."""
    index = store.index(split)
    if max_blocks_per_domain is None:
        return np.arange(len(index))
    rows = []
    for d in range(len(store.domains)):
        mine = np.flatnonzero(index[:, 0] == d)
        if mine.size:
            take = np.unique(np.linspace(0, mine.size - 1, min(mine.size, max_blocks_per_domain)).round())
            rows.append(mine[take.astype(np.int64)])
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


class _Recorder:
    """Turns on capture in every MoE layer and collects each forward's records as numpy."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self.parts: dict[int, dict[str, list[np.ndarray]]] = {
            i: {"expert_index": [], "gate_weight": [], "router_probs": []} for i in self.layers
        }

    def __enter__(self) -> "_Recorder":
        self.previous = {i: layer.capture for i, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.capture = True
        return self

    def __exit__(self, *exc) -> None:
        for i, layer in self.layers.items():
            layer.capture = self.previous[i]

    def collect(self) -> None:
        """Keep the last forward's routing of every layer (compact dtypes: int16 experts, fp16 probs)."""
        for i, layer in self.layers.items():
            rec = layer.last_record
            part = self.parts[i]
            part["expert_index"].append(rec.expert_index.to(torch.int16).cpu().numpy())
            part["gate_weight"].append(rec.gate_weight.to(torch.float16).cpu().numpy())
            part["router_probs"].append(rec.router_probs.to(torch.float16).cpu().numpy())

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        return {name: np.concatenate(chunks) for name, chunks in self.parts[i].items()}


@torch.no_grad()
def capture_routing(
    model: nn.Module,
    store: BlockStore,
    *,
    split: str = "eval",
    rows: np.ndarray | None = None,
    batch_blocks: int = 8,
    capture: bool = True,
    progress: bool = True,
    desc: str = "capture",
) -> CaptureResult:
    """Forward the chosen blocks (default: all of the split) and record routing and loss.

    With ``capture=False`` only the losses are computed (dense models, or a plain
    baseline for the benchmark).
    """
    index = store.index(split)
    rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise MoescopeError(f"{store.root}: no {split} blocks to analyse")
    device = next(model.parameters()).device
    model.eval()
    block_size = store.block_size
    loss_sum = np.zeros(rows.size)
    recorder = _Recorder(model) if capture else None
    token_chunks = []
    with recorder if recorder is not None else contextlib.nullcontext():
        for s in tqdm(range(0, rows.size, batch_blocks), desc=desc, unit="batch", disable=not progress):
            part = rows[s : s + batch_blocks]
            x_np = store.gather(split, index[part])
            x = torch.from_numpy(x_np).to(device)
            logits = model(input_ids=x).logits
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            )
            loss_sum[s : s + part.size] = ce.view(part.size, -1).sum(dim=1).cpu().numpy()
            if recorder is not None:
                recorder.collect()
                token_chunks.append(x_np)

    block_domain = index[rows, 0]
    tables: dict[int, RoutingTable] = {}
    if recorder is not None and recorder.layers:
        tokens = np.concatenate(token_chunks)  # [B, T]
        n = tokens.size
        common = {
            "token_id": tokens.reshape(-1).astype(np.int32),
            "block": np.repeat(rows, block_size).astype(np.int32),
            "position": np.tile(np.arange(block_size, dtype=np.int16), rows.size),
            "domain": np.repeat(block_domain, block_size).astype(np.int8),
        }
        for i in recorder.layers:
            arrays = recorder.arrays(i)
            if arrays["expert_index"].shape[0] != n:
                raise MoescopeError(f"MoE layer {i} recorded {arrays['expert_index'].shape[0]} tokens, expected {n}")
            tables[i] = RoutingTable(**common, **arrays)
    return CaptureResult(
        tables=tables,
        block_rows=rows,
        block_domain=block_domain,
        block_loss_sum=loss_sum,
        block_tokens=np.full(rows.size, block_size - 1, dtype=np.int64),
    )


@torch.no_grad()
def capture_expert_choices(
    model: nn.Module, batches: Iterable[torch.Tensor]
) -> dict[int, np.ndarray]:
    """Top-k expert choices per MoE layer [N, k] for a sequence of input batches (no loss, no probs).

    Used for router saturation: the same tokens through every saved snapshot.
    """
    model.eval()
    with _Recorder(model) as recorder:
        for x in batches:
            model(input_ids=x.to(next(model.parameters()).device))
            recorder.collect()
    return {i: recorder.arrays(i)["expert_index"] for i in recorder.layers}


# --------------------------------------------------------------------------- files


def save_table(table: RoutingTable, path: str | Path) -> Path:
    """Write one layer's routing table as an uncompressed .npz, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **table.arrays())
    return atomic_write_bytes(path, buffer.getvalue())


def load_table(path: str | Path) -> RoutingTable:
    """Read a table written by :func:`save_table`; the error names the file."""
    path = Path(path)
    try:
        with np.load(path) as data:
            return RoutingTable.from_arrays(data)
    except (OSError, KeyError, ValueError) as exc:
        raise MoescopeError(f"{path}: not a routing table ({exc})") from exc
