"""Grouped expert FFNs on expert-sorted rows: one matmul per expert, one activation for all.

Hand-written because no maintained library offers a CPU grouped GEMM with autograd
over separate per-expert parameters (torch._grouped_mm needs one 3-D parameter, whose
per-expert slices cost a full-size zero gradient each in backward).

Rows arrive sorted by expert, `sizes[e]` rows for expert e. Each linear writes its
slices straight into one preallocated output (no torch.cat), the activation and the
expert dropout run once over the whole [rows, ff] buffer (8 small elementwise passes
become one), and the backward fills preallocated gradients slice by slice. The
result equals running each expert module on its own slice.

On CPU the per-expert GEMMs of a linear run in the compiled kernel (moe/native.py,
csrc/grouped_gemm.cpp): whole GEMMs spread over torch's threads instead of one small
multi-threaded GEMM after another (benchmarks/bench_moe_layer.py prints the ratios;
DEVELOPERS.md keeps one measurement). The Python loop below is the fallback and the
reference the kernel is tested against.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from moescope.moe.experts import GeluExpert, SwiGLUExpert
from moescope.moe.native import grouped_kernels

# Slices shorter than this are computed zero-padded: BLAS uses other kernels (other
# rounding) for matrices of a few rows, and a token's output must not depend on how
# many other tokens share its expert (this keeps an upcycled model bit-equal to its
# dense parent). Costs nothing measurable.
MIN_EXPERT_ROWS = 16


def pad_rows(rows: torch.Tensor) -> torch.Tensor:
    """`rows` followed by zero rows up to MIN_EXPERT_ROWS (unchanged if it already has as many)."""
    missing = MIN_EXPERT_ROWS - rows.shape[0]
    return torch.cat([rows, rows.new_zeros(missing, rows.shape[1])]) if missing > 0 else rows


def _kernels(x: torch.Tensor, weights: tuple[torch.Tensor, ...]):
    """The compiled grouped GEMM when it applies here (CPU, one dtype, no autocast), else None.

    Its worker threads do not inherit autocast, so autocast runs take the Python loop.
    """
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    if any(w.dtype != x.dtype for w in weights):
        return None
    return grouped_kernels()


def _slices(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty slice."""
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _loop_forward(out, x, slices, weights, biases, conv1d: bool) -> None:
    """The forward of _GroupedLinear one expert after another (the kernel's reference)."""
    for e, s, t in slices:
        w = weights[e] if conv1d else weights[e].t()
        rows = x[s:t]
        if t - s < MIN_EXPERT_ROWS:
            rows = pad_rows(rows)
            res = torch.addmm(biases[e], rows, w) if biases else torch.mm(rows, w)
            out[s:t].copy_(res[: t - s])
        elif biases:
            torch.addmm(biases[e], rows, w, out=out[s:t])
        else:
            torch.mm(rows, w, out=out[s:t])


class _GroupedLinear(torch.autograd.Function):
    """out[s:t] = x[s:t] @ W_e (+ b_e) for each expert slice.

    `conv1d` says the weights are stored [in, out] (GPT-2's Conv1D) rather than
    [out, in] (nn.Linear). Experts with no rows get no gradient (None), as they would
    if called one by one.
    """

    @staticmethod
    def forward(ctx, x, sizes, conv1d, n_out, n_weights, *params):  # type: ignore[override]
        weights, biases = params[:n_weights], params[n_weights:]
        slices = _slices(sizes)
        out = x.new_empty(x.shape[0], n_out)
        kernels = _kernels(x, weights)
        if kernels is not None:
            kernels.grouped_rows_mm(out, x, list(weights), list(biases), list(sizes), not conv1d, MIN_EXPERT_ROWS)
        else:
            _loop_forward(out, x, slices, weights, biases, conv1d)
        ctx.save_for_backward(x, *weights)
        ctx.slices, ctx.conv1d, ctx.n_weights, ctx.has_bias = slices, conv1d, n_weights, bool(biases)
        ctx.sizes, ctx.native = list(sizes), kernels is not None
        return out

    @staticmethod
    @once_differentiable  # the gradients are computed with out= GEMMs, outside autograd
    def backward(ctx, grad):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        n_w = ctx.n_weights
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        if grad_x is not None and sum(t - s for _, s, t in ctx.slices) < x.shape[0]:
            grad_x.zero_()
        grad_w: list[torch.Tensor | None] = [None] * n_w
        grad_b: list[torch.Tensor | None] = [None] * n_w
        if ctx.native and (kernels := _kernels(grad, tuple(weights))) is not None:
            _native_backward(kernels, ctx, grad.contiguous(), x, weights, grad_x, grad_w, grad_b)
            tail = grad_b if ctx.has_bias else []
            return (grad_x, None, None, None, None, *grad_w, *tail)
        for e, s, t in ctx.slices:
            g, rows = grad[s:t], x[s:t]
            w = weights[e]
            if grad_x is not None:
                w_in = w.t() if ctx.conv1d else w
                if t - s < MIN_EXPERT_ROWS:  # padded like the forward (same kernels, same rounding)
                    grad_x[s:t] = pad_rows(g).mm(w_in)[: t - s]
                else:
                    torch.mm(g, w_in, out=grad_x[s:t])
            if ctx.needs_input_grad[5 + e]:
                grad_w[e] = rows.t().mm(g) if ctx.conv1d else g.t().mm(rows)
            if ctx.has_bias and ctx.needs_input_grad[5 + n_w + e]:
                grad_b[e] = g.sum(0)
        tail = grad_b if ctx.has_bias else []
        return (grad_x, None, None, None, None, *grad_w, *tail)


def _native_backward(kernels, ctx, grad, x, weights, grad_x, grad_w, grad_b) -> None:
    """Fills grad_x / grad_w / grad_b (in place) with the compiled kernels.

    Gradients are produced for the experts that received rows and whose parameters need
    them; the others stay None, as in the loop.
    """
    n_w, sizes = ctx.n_weights, ctx.sizes
    if grad_x is not None:
        kernels.grouped_rows_mm(grad_x, grad, list(weights), [], sizes, ctx.conv1d, MIN_EXPERT_ROWS)
    want_w = [bool(n) and ctx.needs_input_grad[5 + e] for e, n in enumerate(sizes)]
    want_b = [ctx.has_bias and bool(n) and ctx.needs_input_grad[5 + n_w + e] for e, n in enumerate(sizes)]
    if not any(want_w) and not any(want_b):
        return
    # Experts with rows get a fresh buffer each (the kernel fills all of them at once);
    # the empty placeholders of row-less experts are never touched.
    gw = [w.new_empty(w.shape) if n else w.new_empty(0) for w, n in zip(weights, sizes)]
    gb = [x.new_empty(grad.shape[1]) if n else x.new_empty(0) for n in sizes] if ctx.has_bias else []
    kernels.grouped_weight_grads(gw, gb, x, grad, sizes, ctx.conv1d)
    for e in range(n_w):
        grad_w[e] = gw[e] if want_w[e] else None
        if ctx.has_bias:
            grad_b[e] = gb[e] if want_b[e] else None


def grouped_linear(
    x: torch.Tensor, sizes: list[int], weights: list[torch.Tensor], biases: list[torch.Tensor] | None, *, conv1d: bool
) -> torch.Tensor:
    """Per-expert linear maps over expert-sorted rows (see module docstring)."""
    n_out = weights[0].shape[1] if conv1d else weights[0].shape[0]
    return _GroupedLinear.apply(x, sizes, conv1d, n_out, len(weights), *weights, *(biases or []))


def _act_kind(act: nn.Module) -> type:
    """The activation's own type."""
    return type(act)


def supports_grouped(experts: nn.ModuleList) -> bool:
    """True when all experts are moescope's GELU (same activation) or all SwiGLU experts."""
    first = experts[0]
    if all(type(e) is GeluExpert for e in experts):
        return all(_act_kind(e.act) == _act_kind(first.act) and e.dropout.p == first.dropout.p for e in experts)
    if all(type(e) is SwiGLUExpert for e in experts):
        return all(e.dropout.p == first.dropout.p for e in experts)
    return False


def run_grouped_experts(experts: nn.ModuleList, xs: torch.Tensor, sizes: list[int], training: bool) -> torch.Tensor:
    """All experts on their slices of expert-sorted `xs`; requires `supports_grouped(experts)`."""
    first = experts[0]
    p = first.dropout.p
    if isinstance(first, GeluExpert):
        h = grouped_linear(
            xs, sizes, [e.c_fc.weight for e in experts], [e.c_fc.bias for e in experts], conv1d=True
        )
        h = F.dropout(first.act(h), p, training) if p > 0 else first.act(h)
        return grouped_linear(
            h, sizes, [e.c_proj.weight for e in experts], [e.c_proj.bias for e in experts], conv1d=True
        )
    gate = grouped_linear(xs, sizes, [e.gate_proj.weight for e in experts], None, conv1d=False)
    up = grouped_linear(xs, sizes, [e.up_proj.weight for e in experts], None, conv1d=False)
    h = F.silu(gate) * up
    if p > 0:
        h = F.dropout(h, p, training)
    return grouped_linear(h, sizes, [e.down_proj.weight for e in experts], None, conv1d=False)
