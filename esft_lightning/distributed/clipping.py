"""Gradient clipping by the global norm when every rank holds a distinct part of the gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..dtensors import local_shard


def clip_grad_norm_across_ranks(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients by their global norm when every rank holds a distinct part of them (FSDP2 shards, and under
    expert parallelism each rank's own experts); returns the norm. One all-reduce of a scalar.

    torch's ``clip_grad_norm_`` reduces DTensor gradients per device mesh and cannot combine the expert meshes
    of expert parallelism with the rest, so each rank would clip by a norm that misses the other ranks' experts.
    """
    grads = [local_shard(p.grad) for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        squares += grad.detach().float().pow(2).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares)
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's rule: never scale up
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total
