"""What this process holds: resident host memory (now, peak) and training tensors' bytes on this rank."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from ..dtensors import local_shard


def peak_host_bytes() -> int:
    """This process's peak resident host memory so far: Linux's VmHWM, else ru_maxrss (bytes on macOS).

    Not ru_maxrss on Linux: a process started by fork/vfork + exec inherits its parent's high-water mark there,
    so a rank launched by a large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def current_host_bytes() -> int:
    """This process's resident host memory now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_host_bytes()


def training_memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds in parameters, gradients and optimizer state (local shards under FSDP)."""

    def local_bytes(t: torch.Tensor) -> int:
        return local_shard(t).numel() * t.element_size()

    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "param_bytes": sum(local_bytes(p) for p in model.parameters()),
        "grad_bytes": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer_state_bytes": sum(local_bytes(t) for t in state),
    }
