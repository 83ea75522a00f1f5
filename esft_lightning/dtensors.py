"""Host-side views of tensors that may be FSDP2-sharded DTensors: this rank's shard, or the whole tensor on the host."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

__all__ = ["full_on_host", "is_sharded", "local_shard", "model_is_sharded"]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 shards it over ranks)."""
    return isinstance(t, DTensor)


def model_is_sharded(model: torch.nn.Module) -> bool:
    """Whether any of ``model``'s parameters is a DTensor (FSDP2 has sharded it)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (FSDP2 DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_on_host(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """The whole tensor in host memory, gathering a sharded (FSDP2 DTensor) one first (a collective: every rank
    must call it). ``copy``: a new tensor even when ``t`` already is a plain CPU tensor."""
    t = t.detach()
    if isinstance(t, DTensor):
        if t.dtype in _BYTE_GATHERED:  # gloo has no float8 type: gathered as the same bytes
            local = t.to_local().view(torch.uint8)
            as_bytes = DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
            return as_bytes.full_tensor().cpu().view(t.dtype)
        return t.full_tensor().cpu()
    return t.to("cpu", copy=copy)


_BYTE_GATHERED = (torch.float8_e4m3fn, torch.float8_e5m2)
