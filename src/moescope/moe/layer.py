"""The MoE layer: router, top-k selection, dispatch to experts, combine; plus the aux losses.

Pure computation: tensors in, tensors out. Nothing here reads files or prints.

Dispatch (hand-written: no maintained library does dropless sort-based dispatch over
arbitrary expert modules on CPU): the (token, choice) assignments are sorted by expert
once, the routed rows are gathered in that order, each expert runs once on its
contiguous slice (split sizes come from one bincount, read on the host once), and the
results are scattered back with a single index_copy (top-1) / index_add (top-k). No
per-expert boolean masks, no calls on empty slices, no one-hot dispatch tensors.
moescope's own GELU and SwiGLU experts go through `grouped.py` (per-expert matmuls
into shared buffers, one activation pass); any other expert modules are called one
by one on their slices.

The routing probabilities are those of the (noisy, in training) logits that chose
the experts; `prob_sum` and the gate weights come from them, the z-loss from the
clean logits.

Capacity rule (when `capacity_factor` is set): an expert takes at most
C = ceil(capacity_factor * top_k * n_tokens / n_experts) assignments per forward pass.
Priority: all first choices before any second choice (GShard), and within a choice
rank, earlier tokens in the flattened input first (Switch's cumsum order). An
assignment over capacity is dropped: it contributes nothing, so a top-1 token that is
dropped has a layer output of exactly zero and passes through the residual.

Expert choice (`routing="expert_choice"`, Zhou et al. 2022) turns the selection around:
each expert takes its C highest-scoring tokens of the forward pass, so the experts'
loads are equal by construction and a token may be taken by 0..E experts. The rows are
already expert-sorted ([E, C] from one topk), so the same gather / grouped experts /
index_add combine runs them. Tokens no expert took have a zero output. The choice looks
at every token of the pass, later ones included: not causal (see MoEConfig).

Shared experts run on every token, outside the router, and are added to the routed output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moescope.moe.grouped import MIN_EXPERT_ROWS, pad_rows, run_grouped_experts, supports_grouped


@dataclass
class RoutingRecord:
    """What one forward pass routed where. Counts are of assignments (k per token).

    tokens_per_expert counts the router's choices including those later dropped by
    capacity (that is the f_i of the load-balancing loss); `dropped` counts dropped
    (token, expert) assignments (= dropped tokens for top-1).
    """

    tokens_per_expert: torch.Tensor  # LongTensor [E]
    dropped: torch.Tensor  # LongTensor []
    n_tokens: int
    prob_sum: torch.Tensor  # [E], differentiable sum over tokens of the router softmax
    z_loss: torch.Tensor  # [], differentiable mean(logsumexp(logits)^2)
    entropy_mean: torch.Tensor  # [], detached mean router entropy (nats)
    capacity: int | None = None  # assignments per expert, None = dropless
    # Filled only when layer.capture is True (detached, tokens in flattened input order):
    expert_index: torch.Tensor | None = None  # LongTensor [N, k]
    gate_weight: torch.Tensor | None = None  # [N, k] weight applied in the forward pass (0 if dropped)
    router_probs: torch.Tensor | None = None  # [N, E]
    # Expert choice: tokens no expert took (their MoE output is zero). 0 for token choice.
    unrouted: torch.Tensor | None = None  # LongTensor []
    # Shared experts: sums over tokens of the L2 norm of the shared / routed output rows
    # (detached), so shared / (shared + routed) is the share of the output they carry.
    shared_norm: torch.Tensor | None = None
    routed_norm: torch.Tensor | None = None
    # Expert choice with capture: which experts took each token ([N, E] bool). expert_index
    # then holds up to top_k of them per token (highest router probability first) and
    # gate_weight 0 where a token has fewer (an unrouted token: its router's first choice).
    expert_mask: torch.Tensor | None = None


def load_balancing_loss(
    tokens_per_expert: torch.Tensor, prob_sum: torch.Tensor, n_tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i for one layer.

    f_i = tokens_per_expert_i / (n_tokens * top_k) (fraction of assignments),
    P_i = prob_sum_i / n_tokens (mean router probability). A perfectly balanced layer
    scores 1.0 for any k. Pass counts and prob sums summed over all micro-batches of an
    optimizer step, so the loss sees the whole batch (not one sequence at a time).
    Equals transformers' Mixtral `load_balancing_loss_func` divided by top_k.
    """
    n_experts = prob_sum.shape[-1]
    f = tokens_per_expert.to(prob_sum.dtype) / (n_tokens * top_k)
    p = prob_sum / n_tokens
    return n_experts * torch.sum(f * p)


@torch.no_grad()
def update_balance_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step: bias_i += rate * sign(mean load - load_i), in place.

    Under-loaded experts become easier to choose, over-loaded ones harder, by a fixed step
    (DeepSeek-V3's update rule); an expert exactly at the mean load is left alone. Pass the
    assignment counts of a whole optimizer step (all micro-batches and processes).
    """
    counts = tokens_per_expert.to(bias.dtype)
    return bias.add_(rate * torch.sign(counts.mean() - counts))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return _logsumexp_last(logits.float()).pow(2).mean()


def _logsumexp_last(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last (expert) dim, keepdim. Written out because the fused
    softmax/logsumexp kernels are slow on a last dim of only a few experts (see DEVELOPERS.md)."""
    m = logits.detach().amax(dim=-1, keepdim=True)
    return torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True)) + m


class _GatherRows(torch.autograd.Function):
    """rows = x[index] for distinct indices; backward writes (index_copy) instead of index_add.

    When `index` is a permutation, `inverse` (its inverse) turns the backward scatter into a
    gather: index_select moves the same values and is much cheaper than index_copy_ on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index, inverse)
        ctx.n_rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        index, inverse = ctx.saved_tensors
        if inverse is not None:
            return grad.index_select(0, inverse), None, None
        n = ctx.n_rows
        out = grad.new_empty(n, grad.shape[1]) if index.numel() == n else grad.new_zeros(n, grad.shape[1])
        return out.index_copy_(0, index, grad), None, None


class _CombineRows(torch.autograd.Function):
    """out[index[j]] (+)= w[j] * ys[j]; with `straight_through` the forward ignores w (x 1.0).

    The backward sends d out . ys[j] to w[j] in both modes: that is the straight-through
    estimator when the forward multiplied by 1. `unique` (each output row written at most
    once) allows index_copy; otherwise rows are summed with index_add. A permutation
    `index` with its `inverse` is written as a gather (see _GatherRows).
    """

    @staticmethod
    def forward(ctx, ys, w, index, n_rows: int, straight_through: bool, unique: bool, inverse):  # type: ignore[override]
        src = ys if straight_through else ys * w.unsqueeze(1).to(ys.dtype)
        if unique and inverse is not None:
            out = src.index_select(0, inverse)
        elif unique:
            out = ys.new_empty(n_rows, ys.shape[1]) if index.numel() == n_rows else ys.new_zeros(n_rows, ys.shape[1])
            out.index_copy_(0, index, src)
        else:
            out = ys.new_zeros(n_rows, ys.shape[1]).index_add_(0, index, src)
        ctx.save_for_backward(ys, w, index)
        ctx.straight_through = straight_through
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ys, w, index = ctx.saved_tensors
        g = grad.index_select(0, index)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(g, ys).to(w.dtype)
        grad_ys = g if ctx.straight_through else g * w.unsqueeze(1).to(g.dtype)
        return grad_ys, grad_w, None, None, None, None, None


class MoELayer(nn.Module):
    """A token-choice mixture of experts over [..., d] tensors (same shape out).

    `experts` is any ModuleList of modules mapping [n, d] -> [n, d] (GPT-2 MLPs, SwiGLU,
    a BERT FFN, ...). After every forward pass `last_record` holds a RoutingRecord;
    set `capture = True` to also keep each token's experts, weights and router probs.
    `progress` (0..1, set by the trainer) anneals the router noise.
    """

    def __init__(
        self,
        experts: nn.ModuleList,
        d_model: int,
        *,
        top_k: int = 1,
        gating: str = "ste",
        renormalize: bool = True,
        capacity_factor: float | None = None,
        router_noise_std: float = 0.0,
        router_noise_anneal_frac: float = 0.25,
        input_jitter: float = 0.0,
        output_dropout: float = 0.0,
        balance_bias: bool = False,
        shared_experts: nn.ModuleList | None = None,
        shared_gate: bool = False,
        routing: str = "token_choice",
        router_score: str = "softmax",
        gate_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(experts, nn.ModuleList) or len(experts) == 0:
            raise ValueError("experts must be a non-empty nn.ModuleList")
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in 1..{len(experts)}, got {top_k}")
        if gating not in ("ste", "switch"):
            raise ValueError(f"gating must be 'ste' or 'switch', got {gating!r}")
        if routing not in ("token_choice", "expert_choice"):
            raise ValueError(f"routing must be 'token_choice' or 'expert_choice', got {routing!r}")
        if router_score not in ("softmax", "sigmoid"):
            raise ValueError(f"router_score must be 'softmax' or 'sigmoid', got {router_score!r}")
        if routing == "expert_choice" and balance_bias:
            raise ValueError("balance_bias does not apply to expert-choice routing")
        self.d_model = d_model
        self.n_experts = len(experts)
        self.top_k = top_k
        self.gating = gating
        self.renormalize = renormalize
        self.capacity_factor = capacity_factor
        self.router_noise_std = router_noise_std
        self.router_noise_anneal_frac = router_noise_anneal_frac
        self.input_jitter = input_jitter
        self.router = nn.Linear(d_model, self.n_experts, bias=False)
        # Auxiliary-loss-free balancing (Wang et al. 2024, used by DeepSeek-V3): a per-expert
        # bias added to the router's log-probabilities when experts are CHOSEN, never to the
        # gate weights or the aux losses, and moved outside backprop by `update_balance_bias`.
        self.balance_bias = balance_bias
        if balance_bias:
            self.register_buffer("selection_bias", torch.zeros(self.n_experts))
        self.experts = experts
        self.routing = routing
        self.router_score = router_score
        # Renormalized routed gates are multiplied by this (fine-grained experts: see MoEConfig).
        self.gate_scale = float(gate_scale)
        # Always-on experts (DeepSeekMoE, Qwen-MoE): never routed, never counted in the
        # routing record's experts; Qwen-MoE's optional sigmoid gate scales their sum.
        self.shared_experts = shared_experts if shared_experts is not None and len(shared_experts) else None
        if shared_gate and self.shared_experts is None:
            raise ValueError("shared_gate needs shared experts")
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        if self.shared_gate is not None:  # starts at sigmoid(0) = 1/2 for every token, seed-free
            nn.init.zeros_(self.shared_gate.weight)
        self.output_dropout = nn.Dropout(output_dropout)
        self.progress = 0.0
        self.capture = False
        # Run moescope's own expert types through grouped matmuls (one per expert into
        # shared buffers, one activation pass) instead of calling each expert module:
        # far fewer parallel regions to stall when cores are contended, same values.
        # Other experts always loop. benchmarks/bench_moe_layer.py measures the two.
        self.grouped_experts = True
        self.last_record: RoutingRecord | None = None

    @classmethod
    def from_config(
        cls, cfg, experts: nn.ModuleList, d_model: int, *, output_dropout: float = 0.0,
        shared_experts: nn.ModuleList | None = None,
    ) -> MoELayer:
        """Build from a `MoEConfig`: `experts` are its routed experts (cfg.routed_experts of them),
        `shared_experts` its cfg.n_shared_experts always-on ones."""
        if cfg.routed_experts != len(experts):
            raise ValueError(f"config asks for {cfg.routed_experts} routed experts, got {len(experts)}")
        n_shared = len(shared_experts) if shared_experts is not None else 0
        if n_shared != cfg.n_shared_experts:
            raise ValueError(f"config asks for {cfg.n_shared_experts} shared experts, got {n_shared}")
        return cls(
            experts,
            d_model,
            top_k=cfg.routed_top_k,
            gating=cfg.gating,
            renormalize=cfg.renormalize,
            capacity_factor=cfg.capacity_factor,
            router_noise_std=cfg.router_noise_std,
            router_noise_anneal_frac=cfg.router_noise_anneal_frac,
            input_jitter=cfg.input_jitter,
            output_dropout=output_dropout,
            balance_bias=cfg.balance_bias,
            shared_experts=shared_experts,
            shared_gate=cfg.shared_gate,
            routing=cfg.routing,
            router_score=cfg.router_score,
            gate_scale=cfg.routed_gate_scale,
        )

    def extra_repr(self) -> str:
        extra = "" if self.routing == "token_choice" else f", routing={self.routing!r}"
        extra += "" if self.router_score == "softmax" else f", router_score={self.router_score!r}"
        extra += f", n_shared_experts={len(self.shared_experts)}" if self.shared_experts is not None else ""
        return (
            f"n_experts={self.n_experts}, top_k={self.top_k}, gating={self.gating!r}, "
            f"capacity_factor={self.capacity_factor}{extra}"
        )

    def current_noise_std(self) -> float:
        """Router noise std at the current training progress (linear anneal to 0)."""
        if self.router_noise_std <= 0:
            return 0.0
        if self.router_noise_anneal_frac <= 0:
            return self.router_noise_std
        return self.router_noise_std * max(0.0, 1.0 - self.progress / self.router_noise_anneal_frac)

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments one expert may take in a pass of n_tokens tokens (None = dropless)."""
        if self.routing == "expert_choice":  # tokens per expert; always bounded
            factor = 1.0 if self.capacity_factor is None else self.capacity_factor
            return min(n_tokens, max(1, math.ceil(factor * self.top_k * n_tokens / self.n_experts)))
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_experts))

    def _run_expert(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows; slices shorter than MIN_EXPERT_ROWS are zero-padded.

        BLAS picks other kernels for matrices of a few rows, whose sums round
        differently, so a token's output would depend on how many tokens share its
        expert. Padding tiny slices keeps each token's result bit-identical to a large
        batch (that is what lets an upcycled model equal its dense parent exactly);
        it costs nothing measurable since such slices are tiny. Experts are row-wise.
        """
        m = rows.shape[0]
        if m >= MIN_EXPERT_ROWS:
            return self.experts[e](rows)
        return self.experts[e](pad_rows(rows))[:m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        n, k, n_exp = h.shape[0], self.top_k, self.n_experts

        # --- router ---
        router_in = h
        if self.training and self.input_jitter > 0:
            router_in = h * torch.empty_like(h).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        logits = self.router(router_in).float()
        lse = _logsumexp_last(logits)
        z_loss = lse.pow(2).mean()
        noise_std = self.current_noise_std() if self.training else 0.0
        scores = None  # sigmoid scores (DeepSeek-V3); None = the softmax probabilities
        if self.router_score == "sigmoid":
            route_logits = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
            scores = torch.sigmoid(route_logits)
            # statistics (prob_sum, entropy, capture) see the scores normalized over all experts
            probs = scores / scores.sum(dim=-1, keepdim=True)
            log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        elif noise_std > 0:
            route_logits = logits + torch.randn_like(logits) * noise_std
            log_probs = route_logits - _logsumexp_last(route_logits)
        else:
            log_probs = logits - lse
        if scores is None:
            probs = log_probs.exp()
        with torch.no_grad():
            entropy = -(probs * log_probs).sum(-1).mean()
        prob_sum = probs.sum(0)
        if self.routing == "expert_choice":
            return self._expert_choice(x, h, probs if scores is None else scores, probs, prob_sum, z_loss, entropy)
        if scores is not None:
            # DeepSeek-V3: the bias is added to the scores for the choice only
            sel = scores.detach() + self.selection_bias if self.balance_bias else scores
            top_i = sel.max(dim=-1, keepdim=True).indices if k == 1 else sel.topk(k, dim=-1).indices
            top_p = scores.gather(-1, top_i)
        elif self.balance_bias:
            biased = log_probs.detach() + self.selection_bias
            # max for top-1: on CPU, [2048, 16], topk took 259 us, max 12 us
            top_i = biased.max(dim=-1, keepdim=True).indices if k == 1 else biased.topk(k, dim=-1).indices
            top_p = probs.gather(-1, top_i)
        elif k == 1:
            top_p, top_i = probs.max(dim=-1, keepdim=True)
        else:
            top_p, top_i = probs.topk(k, dim=-1)

        # --- gate weights (forward values; STE handled by _CombineRows) ---
        straight_through = k == 1 and self.gating == "ste"
        if k > 1 and self.renormalize:
            gate = top_p / top_p.sum(dim=-1, keepdim=True)
            if self.gate_scale != 1.0:
                gate = gate * self.gate_scale
        else:
            gate = top_p

        # --- dispatch: sort assignments by expert ---
        flat_e = top_i.reshape(-1)
        counts = torch.bincount(flat_e, minlength=n_exp)
        capacity = self.capacity(n)
        with torch.no_grad():
            if capacity is None:
                order = torch.argsort(flat_e, stable=True)
                kept_counts = counts
                dropped = counts.new_zeros(())
            else:
                # priority key: expert, then choice rank, then token position
                j = torch.arange(n * k, device=h.device)
                key = flat_e * (n * k) + (j % k) * n + j // k
                order = torch.argsort(key)
                starts = torch.cumsum(counts, 0) - counts
                pos = torch.arange(n * k, device=h.device) - starts[flat_e[order]]
                keep = pos < capacity
                order = order[keep]
                kept_counts = counts.clamp(max=capacity)
                dropped = (counts - kept_counts).sum()
            token_of = order // k if k > 1 else order
        sizes = kept_counts.tolist()

        # --- experts on contiguous slices ---
        unique_rows = k == 1
        inverse = None
        if unique_rows and token_of.numel() == n:  # every token kept: token_of is a permutation
            inverse = torch.empty_like(token_of)
            inverse[token_of] = torch.arange(n, device=token_of.device)
        xs = _GatherRows.apply(h, token_of, inverse) if unique_rows else h.index_select(0, token_of)
        ys = self._run_experts(xs, sizes)
        w = gate.reshape(-1).index_select(0, order)
        out = _CombineRows.apply(ys, w, token_of, n, straight_through, unique_rows, inverse)
        out, shared_norm, routed_norm = self._add_shared(h, out)
        out = self.output_dropout(out.to(x.dtype))

        record = RoutingRecord(
            tokens_per_expert=counts.detach(),
            dropped=dropped,
            n_tokens=n,
            prob_sum=prob_sum,
            z_loss=z_loss,
            entropy_mean=entropy,
            capacity=capacity,
            shared_norm=shared_norm,
            routed_norm=routed_norm,
        )
        if self.capture:
            with torch.no_grad():
                applied = torch.ones_like(top_p) if straight_through else gate.detach().clone()
                if capacity is not None:
                    kept = torch.zeros(n * k, dtype=torch.bool, device=h.device)
                    kept[order] = True
                    applied = applied * kept.view(n, k)
            record.expert_index = top_i.detach()
            record.gate_weight = applied
            record.router_probs = probs.detach()
        self.last_record = record
        return out.reshape(shape)

    def _run_experts(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every routed expert on its slice of expert-sorted rows (grouped when it applies)."""
        if self.grouped_experts and supports_grouped(self.experts):
            return run_grouped_experts(self.experts, xs, sizes, self.training)
        outs = [self._run_expert(e, chunk) for e, chunk in enumerate(torch.split(xs, sizes, dim=0)) if sizes[e] > 0]
        return torch.cat(outs, dim=0) if len(outs) > 1 else (outs[0] if outs else xs.new_zeros(0, xs.shape[1]))

    def _add_shared(self, h: torch.Tensor, routed: torch.Tensor):
        """routed + the shared experts' output on every token (x Qwen's sigmoid gate); and the
        per-token norm sums of both parts (None without shared experts)."""
        if self.shared_experts is None:
            return routed, None, None
        shared = self.shared_experts[0](h)
        for expert in list(self.shared_experts)[1:]:
            shared = shared + expert(h)
        if self.shared_gate is not None:
            shared = shared * torch.sigmoid(self.shared_gate(h))
        with torch.no_grad():
            shared_norm = torch.linalg.vector_norm(shared.float(), dim=-1).sum()
            routed_norm = torch.linalg.vector_norm(routed.float(), dim=-1).sum()
        return routed + shared.to(routed.dtype), shared_norm, routed_norm

    def _expert_choice(self, x, h, select, probs, prob_sum, z_loss, entropy) -> torch.Tensor:
        """Expert-choice dispatch: expert e takes the C tokens with the highest `select[:, e]`.

        `select` is what the experts rank tokens by and what the gates are made of (softmax
        probabilities, or sigmoid scores); `probs` the distribution kept for statistics.
        """
        n, n_exp = h.shape[0], self.n_experts
        capacity = self.capacity(n)
        top_t = select.detach().t().topk(capacity, dim=-1).indices  # [E, C]
        # within an expert, earlier tokens first: its slice then reads rows in input order
        top_t = top_t.sort(dim=-1).values
        token_of = top_t.reshape(-1)  # expert-sorted rows, C per expert
        p = select.t().gather(1, top_t).reshape(-1)  # each (expert, token) probability, with gradient
        if self.gating == "ste":
            # forward: a token's weights normalized over the experts that took it (one expert
            # -> exactly 1); backward: straight through to each probability, as top-1 STE
            with torch.no_grad():
                denom = p.new_zeros(n).index_add_(0, token_of, p)
                norm = p / denom.index_select(0, token_of)
            w = norm + (p - p.detach())
        else:
            w = p
        if self.gate_scale != 1.0:
            w = w * self.gate_scale
        sizes = [capacity] * n_exp
        xs = h.index_select(0, token_of)
        ys = self._run_experts(xs, sizes)
        out = _CombineRows.apply(ys, w, token_of, n, False, False, None)
        out, shared_norm, routed_norm = self._add_shared(h, out)
        out = self.output_dropout(out.to(x.dtype))
        with torch.no_grad():
            expert_of = torch.arange(n_exp, device=h.device).repeat_interleave(capacity)
            taken = torch.zeros(n, n_exp, dtype=torch.bool, device=h.device)
            taken[token_of, expert_of] = True
            unrouted = (~taken.any(dim=-1)).sum()
        record = RoutingRecord(
            tokens_per_expert=torch.full((n_exp,), capacity, dtype=torch.long, device=h.device),
            dropped=torch.zeros((), dtype=torch.long, device=h.device),
            n_tokens=n,
            prob_sum=prob_sum,
            z_loss=z_loss,
            entropy_mean=entropy,
            capacity=capacity,
            unrouted=unrouted,
            shared_norm=shared_norm,
            routed_norm=routed_norm,
        )
        if self.capture:
            with torch.no_grad():
                gates = torch.zeros(n, n_exp, dtype=w.dtype, device=h.device)
                gates[token_of, expert_of] = w.detach()
                # the token's experts first (highest probability first), then its router's choices
                key = taken.to(probs.dtype) * 2 + probs.detach()
                record.expert_index = key.topk(self.top_k, dim=-1).indices
                record.gate_weight = gates.gather(1, record.expert_index)
                record.router_probs = probs.detach()
                record.expert_mask = taken
        self.last_record = record
        return out.reshape(x.shape)
