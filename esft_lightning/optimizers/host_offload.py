"""AdamW whose moment estimates live in host memory and pass through the device a chunk at a time each step.

Why: for ESFT of the largest models the trainable state, not the frozen weights, is what overflows the GPU. AdamW's
two moment estimates are 8 bytes per trained fp32 parameter, twice the parameter itself (19 GiB per GPU for
DeepSeek-V3 with 8 experts a layer on 8 GPUs, ``docs/planning.md``). Kept on the host they cost nothing on the GPU
but ``chunk_bytes`` twice over during the step, and the arithmetic is unchanged: each chunk runs torch's own
functional AdamW on the device, so the parameters follow ``torch.optim.AdamW`` bitwise.

Cost: every step copies both estimates to the device and back (16 bytes per trained parameter over PCIe; the
copies are synchronous, from pageable memory). The step counter stays a host scalar, as torch keeps it.

Sharded parameters (FSDP2 DTensors) get DTensor state whose local shard is in host memory, the form FSDP2's own
CPU offload uses, so torch.distributed.checkpoint gathers it for a full checkpoint one tensor at a time and a
resume writes into it in place. ``load_state_dict`` keeps loaded state on the host (torch's would move it to the
parameters' device, all of it at once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.optim.adamw import adamw

from ..dtensors import local_shard

__all__ = ["DEFAULT_CHUNK_BYTES", "HostOffloadAdamW"]

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Bytes of each moment estimate on the device at once: the step's extra device memory is twice this."""

MOMENTS = ("exp_avg", "exp_avg_sq")
HOST = torch.device("cpu")


class HostOffloadAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with ``exp_avg`` / ``exp_avg_sq`` in host memory (see the module docstring).

    Takes AdamW's arguments except ``amsgrad``, ``fused``, ``capturable``, ``differentiable`` and ``foreach`` (each
    chunk lets torch pick its kernel as AdamW's default does). ``chunk_bytes``: bytes of each estimate brought to
    the device at once; a parameter larger than that is stepped in slices of its flattened (local) elements.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        self.chunk_bytes = int(chunk_bytes)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("HostOffloadAdamW does not support sparse gradients")
                if not self.state[p]:
                    self.state[p].update(_host_state(p))
            for chunk in _chunks(params, self.state, self.chunk_bytes):
                _step_on_device(chunk, group)
            for p in params:  # once per parameter, however many slices its step took
                self.state[p]["step"] += 1
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.AdamW`` (the same file format: either optimizer reads the other's), but put the
        estimates in host memory, one tensor at a time."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(ids, params):
            if index in saved:
                self.state[param] = {
                    name: value if name == "step" else _to_host(value, param) for name, value in saved[index].items()
                }


def _host_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh state for ``p``: a host step counter, as AdamW keeps it, and zero estimates like ``p`` on the host
    (a DTensor ``p`` gets DTensor estimates with the same placements and a host shard)."""
    state = {"step": torch.tensor(0.0, dtype=torch.float32)}
    state.update({name: torch.zeros_like(p, device=HOST, memory_format=torch.preserve_format) for name in MOMENTS})
    return state


def _to_host(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A loaded estimate in host memory, in ``param``'s dtype (torch's loader casts it the same way)."""
    dtype = param.dtype if param.is_floating_point() else value.dtype
    return value.detach().to(device=HOST, dtype=dtype)


class _Slice:
    """One parameter's elements ``start:stop`` (flattened local shard) and its estimates' same elements."""

    def __init__(self, param: torch.Tensor, state: dict[str, torch.Tensor], start: int, stop: int) -> None:
        self.param, self.state, self.start, self.stop = param, state, start, stop

    def of(self, t: torch.Tensor) -> torch.Tensor:
        local = local_shard(t)
        if self.start == 0 and self.stop == local.numel():
            return local  # the whole tensor, whatever its strides
        return local.view(-1)[self.start : self.stop]

    @property
    def nbytes(self) -> int:
        return (self.stop - self.start) * self.param.element_size()


def _chunks(params: list[torch.Tensor], state: Any, chunk_bytes: int) -> Iterator[list[_Slice]]:
    """``params``' elements in runs of at most ``chunk_bytes`` per estimate (a slice of a parameter at least one
    element; a parameter whose shard or gradient is not contiguous is taken whole)."""
    chunk: list[_Slice] = []
    size = 0
    for p in params:
        local = local_shard(p)
        n = local.numel()
        sliceable = local.is_contiguous() and local_shard(p.grad).is_contiguous()
        per = max(1, chunk_bytes // p.element_size()) if sliceable else max(n, 1)
        for start in range(0, n, per):
            piece = _Slice(p, state[p], start, min(n, start + per))
            if chunk and size + piece.nbytes > chunk_bytes:
                yield chunk
                chunk, size = [], 0
            chunk.append(piece)
            size += piece.nbytes
    if chunk:
        yield chunk


def _step_on_device(chunk: list[_Slice], group: dict[str, Any]) -> None:
    """AdamW on ``chunk``: its estimates copied to the parameters' device, updated there with the parameters, and
    copied back. Each slice steps a copy of its parameter's counter; ``step`` advances the real one once."""
    params = [s.of(s.param) for s in chunk]
    grads = [s.of(s.param.grad) for s in chunk]
    moments = {name: [s.of(s.state[name]).to(p.device) for s, p in zip(chunk, params)] for name in MOMENTS}
    steps = [s.state["step"].clone() for s in chunk]
    beta1, beta2 = group["betas"]
    adamw(
        params, grads, moments["exp_avg"], moments["exp_avg_sq"], [], steps,
        foreach=None, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
    )  # fmt: skip
    for name in MOMENTS:
        for s, on_device in zip(chunk, moments[name]):
            host = s.of(s.state[name])
            if host.data_ptr() != on_device.data_ptr():  # (on a CPU run they are the same tensor)
                host.copy_(on_device)
