"""Fill a model built on the meta device straight from its safetensors files: each FSDP2 rank reads its own rows."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..experts.fp8 import SCALE_SUFFIX, is_fp8_frozen, quantize_experts
from ..experts.state import EXPERT_IDS, TRAINED_PREFIX, expert_shard
from .weight_files import RowsSpec, WeightFiles

__all__ = ["fill_from_files", "load_persistent_buffers", "local_rows", "on_meta"]


def on_meta(model: nn.Module) -> bool:
    """Whether the model's weights are not materialised (built on the meta device, to be filled from files)."""
    return any(p.is_meta for p in model.parameters())


def load_persistent_buffers(model: nn.Module, files: WeightFiles) -> None:
    """Persistent buffers (e.g. DeepSeek's routing bias ``e_score_correction_bias``) from the files: they are
    small, and routing during profiling depends on them, so every rank holds them from the start."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, buffer in list(module.named_buffers(recurse=False)):
                if name in module._non_persistent_buffers_set or prefix + name not in files:
                    continue
                value = files.read(prefix + name).to(buffer.dtype)
                if buffer.is_meta:
                    module._buffers[name] = value
                else:
                    buffer.copy_(value)


def fill_from_files(model: nn.Module, files: WeightFiles, device: torch.device) -> int:
    """Allocate this rank's shards of a model sharded on the meta device and read them from ``files``.

    Every parameter that FSDP2 sharded (``Shard(0)`` DTensors) gets the rows of dim 0 this rank owns, read
    from the files (only those rows); a plain parameter gets the whole tensor. The small trainable copies of
    selected experts (``esft_<name>``) are read from the fused tensor's rows of their experts. Non-persistent
    buffers (rotary tables, expert-slot maps) were built for real with the model and are kept as they are;
    persistent ones are read from the files. Returns the bytes read into parameters.
    """
    keep = _non_persistent_buffers(model)
    model.to_empty(device=device)  # this rank's shards only: FSDP2 parameters are local shards
    for (module, name), value in keep.items():  # (the expert-slot maps are read below)
        module._buffers[name] = value.to(device)
    read = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_name)
            if leaf.endswith(SCALE_SUFFIX) and is_fp8_frozen(owner, leaf.removesuffix(SCALE_SUFFIX)):
                continue  # filled with its 8-bit weight below
            source, rows = _source_rows(model, name, local_rows(param))
            local = param.to_local() if isinstance(param, DTensor) else param
            value = files.read(source, rows)
            if value.shape != local.shape:
                raise ValueError(
                    f"{files.directory}: {source} rows {rows} have shape {tuple(value.shape)}, this rank's part of "
                    f"{name} is {tuple(local.shape)} (is the directory the model's own?)"
                )
            read += value.numel() * value.element_size()
            if is_fp8_frozen(owner, leaf):  # 8-bit frozen experts: this rank's rows quantized as they arrive
                value, scale = quantize_experts(value)
                scale_param = getattr(owner, leaf + SCALE_SUFFIX)
                (scale_param.to_local() if isinstance(scale_param, DTensor) else scale_param).copy_(scale)
            local.copy_(value)
        load_persistent_buffers(model, files)
    return read


def local_rows(param: torch.Tensor) -> range | None:
    """The rows of dim 0 this rank holds of an FSDP2-sharded parameter (None: a plain, whole tensor)."""
    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Shard) or p.dim != 0 for p in param.placements):
        raise NotImplementedError(f"only dim-0 sharding is read from files, got placements {param.placements}")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return range(offset[0], offset[0] + shape[0])


def _source_rows(model: nn.Module, name: str, rows: range | None) -> tuple[str, RowsSpec]:
    """Where a parameter's rows come from: itself, or for a trainable expert copy, its experts' fused rows."""
    module_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(module_name)
    shard = expert_shard(owner)  # expert parallel: this rank's experts start at shard.first
    first = 0 if shard is None else shard.first
    if not leaf.startswith(TRAINED_PREFIX):
        if shard is None:
            return name, rows
        rows = range(shard.count) if rows is None else rows
        return name, range(first + rows.start, first + rows.stop)
    ids = [first + int(i) for i in getattr(owner, EXPERT_IDS).tolist()]  # built on the host with the selection
    fused = f"{module_name}.{leaf.removeprefix(TRAINED_PREFIX)}"
    return fused, ids if rows is None else [ids[i] for i in rows]


def _non_persistent_buffers(model: nn.Module) -> dict[tuple[nn.Module, str], torch.Tensor]:
    kept = {}
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and not buffer.is_meta:
                kept[(module, name)] = buffer
    return kept
