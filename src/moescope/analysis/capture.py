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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from moescope.analysis.table import RoutingTable
from moescope.data.batch_order import forward_order
from moescope.data.blocks import BlockStore
from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_file
from moescope.moe.capture import record_routing
from moescope.moe.model import moe_layers


@dataclass
class CaptureResult:
    """Routing per MoE layer plus per-block loss, for the blocks that were run."""

    tables: dict[int, RoutingTable]  # {block_index_in_model: table}; empty for a dense model
    block_rows: np.ndarray  # [B] row in store.index(split): the block id used in the tables
    block_domain: np.ndarray  # [B] domain id
    block_loss_sum: np.ndarray  # [B] summed next-token cross-entropy (nats)
    block_tokens: np.ndarray  # [B] predicted tokens (block_size - 1)
    batch_order: str = "by_domain"  # which blocks shared a forward pass (data/batch_order.py)


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
    """Collects each forward's per-token routing of every MoE layer as numpy (inside record_routing)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self.parts: dict[int, dict[str, list[np.ndarray]]] = {
            i: {"expert_index": [], "gate_weight": [], "router_probs": []} for i in self.layers
        }

    def collect(self) -> None:
        """Keep the last forward's routing of every layer (compact dtypes: int16 experts, fp16 probs)."""
        for i, layer in self.layers.items():
            rec = layer.last_record
            part = self.parts[i]
            part["expert_index"].append(rec.expert_index.to(torch.int16).cpu().numpy())
            part["gate_weight"].append(rec.gate_weight.to(torch.float16).cpu().numpy())
            part["router_probs"].append(rec.router_probs.to(torch.float16).cpu().numpy())
            if rec.expert_mask is not None:  # expert choice: how many experts took each token (0 = unrouted)
                part.setdefault("experts_per_token", []).append(rec.expert_mask.sum(-1).to(torch.int16).cpu().numpy())
                part.setdefault("expert_mask", []).append(rec.expert_mask.to(torch.bool).cpu().numpy())

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
    batch_order: str = "by_domain",
) -> CaptureResult:
    """Forward the chosen blocks (default: all of the split) and record routing and loss.

    With ``capture=False`` only the losses are computed (dense models, or a plain
    baseline for the benchmark). ``batch_order`` ("by_domain" or "mixed", see
    data/batch_order.py) says which blocks share a forward pass; the result is in the
    order of ``rows`` either way.
    """
    index = store.index(split)
    rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise MoescopeError(f"{store.root}: no {split} blocks to analyse")
    block_domain = index[rows, 0]
    order = forward_order(block_domain, batch_order)  # positions in rows, as forwarded
    reordered = not np.array_equal(order, np.arange(rows.size))
    device = next(model.parameters()).device
    model.eval()
    block_size = store.block_size
    loss_sum = np.zeros(rows.size)
    recorder = _Recorder(model) if capture else None
    token_chunks = []
    with record_routing(recorder.layers) if recorder is not None else contextlib.nullcontext():
        for s in tqdm(range(0, rows.size, batch_blocks), desc=desc, unit="batch", disable=not progress):
            at = order[s : s + batch_blocks]
            part = rows[at]
            x_np = store.gather(split, index[part])
            x = torch.from_numpy(x_np).to(device)
            logits = model(input_ids=x).logits
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            )
            loss_sum[at] = ce.view(part.size, -1).sum(dim=1).cpu().numpy()
            if recorder is not None:
                recorder.collect()
                token_chunks.append(x_np)

    tables: dict[int, RoutingTable] = {}
    if recorder is not None and recorder.layers:
        tokens = np.concatenate(token_chunks)  # [B, T], as forwarded
        # token rows back to the order of `rows`: block at position p was forwarded as block where[p]
        take = None
        if reordered:
            where = np.argsort(order)
            take = (where[:, None] * block_size + np.arange(block_size)).reshape(-1)
            tokens = tokens[where]
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
            if take is not None:
                arrays = {name: value[take] for name, value in arrays.items()}
            tables[i] = RoutingTable(**common, **arrays)
    return CaptureResult(
        tables=tables,
        block_rows=rows,
        block_domain=block_domain,
        block_loss_sum=loss_sum,
        block_tokens=np.full(rows.size, block_size - 1, dtype=np.int64),
        batch_order=batch_order,
    )


@torch.no_grad()
def capture_expert_choices(
    model: nn.Module, batches: Iterable[torch.Tensor], *, assignments: bool = False
) -> dict[int, np.ndarray]:
    """Top-k expert choices per MoE layer [N, k] for a sequence of input batches (no loss, no probs).

    Used for router saturation: the same tokens through every saved snapshot. With
    ``assignments``, an expert-choice layer gives its selection mask [N, E] (bool: which
    experts took each token) instead of its stored expert.
    """
    model.eval()
    recorder = _Recorder(model)
    with record_routing(recorder.layers):
        for x in batches:
            model(input_ids=x.to(next(model.parameters()).device))
            recorder.collect()
    out = {}
    for i in recorder.layers:
        arrays = recorder.arrays(i)
        out[i] = arrays["expert_mask"] if assignments and "expert_mask" in arrays else arrays["expert_index"]
    return out


# --------------------------------------------------------------------------- files


def save_table(table: RoutingTable, path: str | Path) -> Path:
    """Write one layer's routing table as an uncompressed .npz, atomically.

    Written column by column into a temporary file beside ``path`` (then renamed),
    so memmapped columns are copied through without a second copy in memory.
    """
    with atomic_file(path) as fh:
        np.savez(fh, **table.arrays())
    return Path(path)


class RoutingStream:
    """Append-only per-layer routing columns on disk, so capture memory does not grow with the tokens.

    Each forward's rows are appended to raw files ``DIR/LAYER.COLUMN.bin`` (plain
    writes, not a memmap: the page cache, not this process, holds what was
    written). :meth:`columns` maps them back read-only once capture is done.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[tuple[int, str], Any] = {}
        self._layout: dict[tuple[int, str], tuple[np.dtype, tuple[int, ...]]] = {}
        self.rows: dict[int, int] = {}

    def append(self, layer: int, arrays: dict[str, np.ndarray]) -> None:
        n = None
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            key = (layer, name)
            if key not in self._files:
                self._files[key] = open(self.directory / f"{layer}.{name}.bin", "wb")
                self._layout[key] = (value.dtype, value.shape[1:])
            elif self._layout[key] != (value.dtype, value.shape[1:]):
                raise MoescopeError(f"layer {layer} column {name}: {value.dtype}{value.shape[1:]} after "
                                    f"{self._layout[key][0]}{self._layout[key][1]}")
            self._files[key].write(value.tobytes())
            n = value.shape[0] if n is None else n
        self.rows[layer] = self.rows.get(layer, 0) + int(n or 0)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()

    def columns(self, layer: int) -> dict[str, np.ndarray]:
        """Read-only memmaps of one layer's columns (call after :meth:`close`)."""
        out = {}
        for (lay, name), (dtype, tail) in self._layout.items():
            if lay == layer:
                shape = (self.rows[layer], *tail)
                path = self.directory / f"{layer}.{name}.bin"
                out[name] = (np.memmap(path, dtype=dtype, mode="r", shape=shape) if self.rows[layer]
                             else np.zeros(shape, dtype))
        return out


def load_table(path: str | Path) -> RoutingTable:
    """Read a table written by :func:`save_table`; the error names the file."""
    path = Path(path)
    try:
        with np.load(path) as data:
            return RoutingTable.from_arrays(data)
    except (OSError, KeyError, ValueError) as exc:
        raise MoescopeError(f"{path}: not a routing table ({exc})") from exc


@dataclass
class StreamedCapture:
    """What :func:`stream_routing` leaves: per-block loss in RAM, routing per layer in a RoutingStream."""

    block_loss_sum: np.ndarray  # [B] summed next-token cross-entropy (nats)
    block_tokens: np.ndarray  # [B] predicted tokens (context - 1)


def block_loss_sums(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of every row [B], one row at a time (a full-vocabulary float copy of
    the whole batch's logits would dominate memory for 100k+ vocabularies)."""
    tokens = tokens.to(logits.device)
    return torch.stack([
        F.cross_entropy(logits[b, :-1].float(), tokens[b, 1:], reduction="sum") for b in range(tokens.shape[0])
    ])


@torch.no_grad()
def stream_routing(
    model: nn.Module,
    tokens: np.ndarray,
    block_domain: np.ndarray,
    domains: list[str],
    *,
    recorder=None,
    stream: RoutingStream | None = None,
    input_device: torch.device | str = "cpu",
    batch_blocks: int = 8,
    progress: bool = True,
) -> StreamedCapture:
    """Forward every block (grouped by domain, one progress bar each) and append its routing to ``stream``.

    ``recorder`` (a :class:`moescope.hf.recorder.RoutingRecorder`, entered by the
    caller) gives each forward's routing per layer; without it only losses are
    computed (the plain baseline of benchmarks/bench_capture.py). Rows land in the
    stream in block order, so row r of a layer is token r % T of block r // T.
    """
    n_blocks, context = tokens.shape
    loss_sum = np.zeros(n_blocks)
    for d, domain in enumerate(domains):
        mine = np.flatnonzero(block_domain == d)
        if mine.size == 0:
            continue
        if mine.size and not np.array_equal(mine, np.arange(mine[0], mine[0] + mine.size)):
            raise MoescopeError("blocks must be grouped by domain")
        for s in tqdm(range(0, mine.size, batch_blocks), desc=domain, unit="batch", disable=not progress):
            rows = mine[s : s + batch_blocks]
            x = torch.from_numpy(np.ascontiguousarray(tokens[rows])).to(input_device)
            logits = model(input_ids=x).logits
            loss_sum[rows] = block_loss_sums(logits, x).cpu().numpy()
            if not np.isfinite(loss_sum[rows]).all():
                raise MoescopeError(_non_finite("loss", domain, _param_dtype(model)))
            if recorder is not None:
                for layer, routing in recorder.take().items():
                    if routing.expert_index.shape[0] != x.numel():
                        raise MoescopeError(f"MoE layer {layer} routed {routing.expert_index.shape[0]} tokens, "
                                            f"expected {x.numel()}")
                    for what in ("gate_weight", "router_entropy"):
                        if not np.isfinite(getattr(routing, what)).all():
                            raise MoescopeError(_non_finite(f"{what.replace('_', ' ')} in MoE layer {layer}", domain,
                                                            _param_dtype(model)))
                    columns = {"expert_index": routing.expert_index, "gate_weight": routing.gate_weight,
                               "router_entropy": routing.router_entropy}
                    if routing.shared_gate is not None:
                        columns["shared_gate"] = routing.shared_gate
                    stream.append(layer, columns)
    return StreamedCapture(loss_sum, np.full(n_blocks, context - 1, dtype=np.int64))


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _non_finite(what: str, domain: str, dtype: torch.dtype) -> str:
    """One line for a forward pass whose numbers are not finite (NaN / inf weights, or overflow in a narrow dtype)."""
    hint = "; fp16 overflows where bf16 and fp32 do not: try --dtype bf16 or fp32" if dtype == torch.float16 else ""
    return (f"the model's {what} is not finite on the {domain} texts (NaN or inf weights, or an overflow in "
            f"{str(dtype).removeprefix('torch.')}){hint}")


def streamed_table(stream: RoutingStream, layer: int, tokens: np.ndarray, block_domain: np.ndarray,
                   n_experts: int) -> RoutingTable:
    """One layer's RoutingTable over memmapped stream columns (top-k and entropy only, no router_probs)."""
    n_blocks, context = tokens.shape
    cols = stream.columns(layer)
    n = n_blocks * context
    if cols["expert_index"].shape[0] != n:
        raise MoescopeError(f"MoE layer {layer}: {cols['expert_index'].shape[0]} captured tokens, expected {n}")
    return RoutingTable(
        token_id=tokens.reshape(-1).astype(np.int32),
        block=np.repeat(np.arange(n_blocks, dtype=np.int32), context),
        position=np.tile(np.arange(context, dtype=np.int32), n_blocks),
        domain=np.repeat(block_domain.astype(np.int16), context),
        expert_index=cols["expert_index"],
        gate_weight=cols["gate_weight"],
        router_probs=None,
        router_entropy=cols["router_entropy"],
        expert_count=int(n_experts),
    )
