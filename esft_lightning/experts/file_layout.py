"""Where the split model's tensors live in the model's files: trainable copies read their experts' fused rows,
8-bit frozen experts are quantized as their rows arrive, and an expert-parallel rank reads its own experts only."""

from __future__ import annotations

import torch
from torch import nn

from ..dtensors import local_shard
from ..weights.fp8_blocks import SCALE_SUFFIX, quantize_experts
from ..weights.sharded_loading import FileLayout
from ..weights.weight_files import RowsSpec
from .fp8 import is_fp8_frozen
from .state import EXPERT_IDS, TRAINED_PREFIX, expert_shard

__all__ = ["SplitFileLayout"]


class SplitFileLayout(FileLayout):
    """The model's own names, plus what ``apply_expert_config`` and ``localize_experts`` change."""

    def source(self, model: nn.Module, name: str, rows: range | None) -> tuple[str, RowsSpec]:
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

    def filled_elsewhere(self, owner: nn.Module, leaf: str) -> bool:
        # An 8-bit frozen tensor's scales are written with its values (``store``).
        return leaf.endswith(SCALE_SUFFIX) and is_fp8_frozen(owner, leaf.removesuffix(SCALE_SUFFIX))

    def store(self, owner: nn.Module, leaf: str, part: slice | None, value: torch.Tensor) -> None:
        if is_fp8_frozen(owner, leaf):  # 8-bit frozen experts: these rows quantized as they arrive
            value, scale = quantize_experts(value)  # (blocks never span two experts: rows quantize alone)
            scales = local_shard(getattr(owner, leaf + SCALE_SUFFIX))
            (scales if part is None else scales[part]).copy_(scale)
        super().store(owner, leaf, part, value)
