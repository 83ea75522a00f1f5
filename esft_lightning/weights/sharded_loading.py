"""Fill a model built on the meta device straight from its safetensors files: each FSDP2 rank reads its own rows.

Which stored tensor and rows fill a parameter, and how the values are stored, is a ``FileLayout``: the model's own
names here; the experts split supplies its own layout (``experts.file_layout``) for trainable copies, 8-bit frozen
experts and expert-parallel shards, so this module knows nothing of the split.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..dtensors import local_shard
from .weight_files import RowsSpec, WeightFiles, return_freed_memory

__all__ = ["READ_CHUNK_BYTES", "FileLayout", "fill_from_files", "load_persistent_buffers", "local_rows", "on_meta"]

READ_CHUNK_BYTES = 2**22
"""A parameter's rows are read 4 MiB at a time (at least one row): the transient host memory of a read
(its buffers, fused experts' stacking, dequantization) stays one chunk, not a whole layer's experts."""


class FileLayout:
    """How a model's parameters map onto its files: each parameter is the stored tensor of its own name."""

    def source(self, model: nn.Module, name: str, rows: range | None) -> tuple[str, RowsSpec]:
        """The stored tensor and rows that fill parameter ``name`` (``rows``: this rank's rows, None for all)."""
        return name, rows

    def filled_elsewhere(self, owner: nn.Module, leaf: str) -> bool:
        """Whether ``owner.<leaf>`` is written together with another parameter (so the loop skips it)."""
        return False

    def store(self, owner: nn.Module, leaf: str, part: slice | None, value: torch.Tensor) -> None:
        """Write the values read for rows ``part`` of ``owner.<leaf>``'s local tensor (None: all of it)."""
        _local_part(getattr(owner, leaf), part).copy_(value)


def _local_part(tensor: torch.Tensor, part: slice | None) -> torch.Tensor:
    local = local_shard(tensor)
    return local if part is None else local[part]


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


def fill_from_files(
    model: nn.Module, files: WeightFiles, device: torch.device, layout: FileLayout | None = None
) -> int:
    """Allocate this rank's shards of a model sharded on the meta device and read them from ``files``.

    Every parameter that FSDP2 sharded (``Shard(0)`` DTensors) gets the rows of dim 0 this rank owns, read
    from the files (only those rows, ``READ_CHUNK_BYTES`` at a time); a plain parameter gets the whole tensor;
    ``layout`` says where each one's values are stored (default: under its own name). Non-persistent buffers
    (rotary tables, expert-slot maps) were built for real with the model and are kept as they are; persistent
    ones are read from the files. Returns the bytes read into parameters.
    """
    layout = layout or FileLayout()
    keep = _non_persistent_buffers(model)
    model.to_empty(device=device)  # this rank's shards only: FSDP2 parameters are local shards
    for (module, name), value in keep.items():  # (the expert-slot maps are read below)
        module._buffers[name] = value.to(device)
    read = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_name)
            if layout.filled_elsewhere(owner, leaf):
                continue
            for part, rows in _row_chunks(local_shard(param), local_rows(param)):
                source, stored_rows = layout.source(model, name, rows)
                value = files.read(source, stored_rows)
                target = _local_part(param, part)
                if value.shape != target.shape:
                    raise ValueError(
                        f"{files.directory}: {source} rows {stored_rows} have shape {tuple(value.shape)}, this "
                        f"rank's part of {name} is {tuple(target.shape)} (is the directory the model's own?)"
                    )
                read += value.numel() * value.element_size()
                layout.store(owner, leaf, part, value)
                del value  # freed before the next read returns the heap to the OS
        load_persistent_buffers(model, files)
    return_freed_memory()  # the last read's buffers
    return read


def _row_chunks(local: torch.Tensor, owned: range | None) -> list[tuple[slice | None, range | None]]:
    """(rows of ``local``, the same rows of the whole tensor) per read of at most ``READ_CHUNK_BYTES``; one
    ``(None, owned)`` read for a tensor that small (``owned``: this rank's rows, None for an unsharded tensor)."""
    size = local.numel() * local.element_size()
    if local.dim() == 0 or local.shape[0] <= 1 or size <= READ_CHUNK_BYTES:
        return [(None, owned)]
    count, row_bytes = local.shape[0], size // local.shape[0]
    step, first = max(1, READ_CHUNK_BYTES // max(row_bytes, 1)), 0 if owned is None else owned.start
    return [
        (slice(start, min(start + step, count)), range(first + start, first + min(start + step, count)))
        for start in range(0, count, step)
    ]


def local_rows(param: torch.Tensor) -> range | None:
    """The rows of dim 0 this rank holds of an FSDP2-sharded parameter (None: a plain, whole tensor)."""
    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Shard) or p.dim != 0 for p in param.placements):
        raise NotImplementedError(f"only dim-0 sharding is read from files, got placements {param.placements}")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return range(offset[0], offset[0] + shape[0])


def _non_persistent_buffers(model: nn.Module) -> dict[tuple[nn.Module, str], torch.Tensor]:
    kept = {}
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and not buffer.is_meta:
                kept[(module, name)] = buffer
    return kept
