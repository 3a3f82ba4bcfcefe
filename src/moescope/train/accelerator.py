"""accelerate set-up for a run: the Accelerator, this process's view of the launch, gradient clipping.

The loop runs through accelerate's Accelerator, so `accelerate launch -m moescope.cli train ...`
gives DDP with no code change; one CPU process is the default.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType

from moescope.train.config import RunConfig
from moescope.train.optim import clip_grad_norm

# Set-ups whose gradients are plain, whole tensors on every process (one process, or DDP on any
# device), clipped by moescope itself; the others (FSDP, DeepSpeed, XLA, Megatron-LM) shard or
# compile the gradients and keep accelerate's own clipping.
_PLAIN_CLIP_SETUPS = frozenset(
    getattr(DistributedType, name)
    for name in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                 "MULTI_HPU", "MULTI_NEURON")
    if hasattr(DistributedType, name)
)


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cuda)
    # Experts that receive no token in a micro-batch have no gradient: DDP must allow that.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.arch == "moe")]
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=handlers)


def process_state():
    """accelerate's view of this process (rank, world); one CPU process unless launched distributed."""
    from accelerate import PartialState

    # cpu=True lets accelerate see a CPU launch (torchrun / mpirun) as MULTI_CPU with gloo.
    return PartialState(cpu=not torch.cuda.is_available())


def clip_gradients(accelerator, model, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm`; returns the norm before clipping.

    One process or DDP on any device (gradients already averaged, so every process sees the
    same norm): moescope's `clip_grad_norm`, which skips the no-op rescale. FSDP, DeepSpeed,
    XLA and Megatron-LM keep accelerate's own clipping (see _PLAIN_CLIP_SETUPS).
    """
    if accelerator.distributed_type in _PLAIN_CLIP_SETUPS:
        accelerator.unscale_gradients()
        return clip_grad_norm(model.parameters(), max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)
