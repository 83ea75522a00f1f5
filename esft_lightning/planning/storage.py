"""What a model's files hold versus what training holds in memory: bytes per storage format, for `esft plan`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import decoder_layers, find_moe_layers
from ..weights.fp8_blocks import FP8_EXPERT_BLOCK, scale_grid
from ..weights.quantized import QuantizationScheme, read_quantization
from ..weights.weight_files import SafetensorsFile, has_safetensors

__all__ = ["StoredWeights", "stored_weights"]


@dataclass
class StoredWeights:
    """The checkpoint's format and size beside the weights' size in the training dtype."""

    format: str
    file_bytes: int
    exact: bool
    """True: summed from the safetensors headers; False: estimated from the config (no files here)."""
    memory_bytes: int
    """All parameters as the run holds them before any trainable copy: in the dtype it loads them in (quantized
    files are dequantized into it), routed experts in 8 bits with their block scales when it keeps them so."""
    memory_dtype: str

    def describe(self) -> str:
        how = "in the files" if self.exact else "estimated from config.json (no files here)"
        ratio = self.memory_bytes / self.file_bytes if self.file_bytes else float("nan")
        return (
            f"checkpoint: {self.format}, {self.file_bytes / 2**30:.2f} GiB {how}; training holds the weights in "
            f"{self.memory_dtype}: {self.memory_bytes / 2**30:.2f} GiB in all ({ratio:.2f}x the files)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stored_weights(
    directory: str | Path | None, meta_model: nn.Module, frozen_experts_dtype: str = "model"
) -> StoredWeights:
    """The files' bytes (exact from the headers when the directory has safetensors files, else estimated from the
    config's quantization) next to ``meta_model``'s parameter bytes (its routed experts in block FP8 with
    ``frozen_experts_dtype`` ``float8``)."""
    params = list(meta_model.parameters())
    in_fp8 = set()
    if frozen_experts_dtype == "float8":
        in_fp8 = {id(p) for layer in find_moe_layers(meta_model) for p in layer.experts.parameters() if p.dim() == 3}
    memory = sum(_fp8_bytes(p) if id(p) in in_fp8 else p.numel() * p.element_size() for p in params)
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "-"
    if in_fp8:
        dtype += ", routed experts in float8 with 128x128 float32 block scales"
    scheme = read_quantization(directory)
    described = scheme.describe() if scheme else "plain"
    if directory is not None and has_safetensors(directory):
        files = sorted(Path(directory).glob("*.safetensors"))
        stored = sum(SafetensorsFile(f).data_bytes() for f in files)
        return StoredWeights(described, stored, True, memory, dtype)
    config_dtype = getattr(meta_model.config, "dtype", None)
    stored_dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.bfloat16
    return StoredWeights(described, _estimate(meta_model, scheme, stored_dtype), False, memory, dtype)


def _fp8_bytes(w: torch.Tensor, block: tuple[int, int] = FP8_EXPERT_BLOCK) -> int:
    """Bytes of a matrix, or fused experts' matrices, in block FP8: a byte a value and a float32 scale per block
    of each matrix (blocks never span two experts)."""
    rows, cols = w.shape[-2], w.shape[-1]
    grid_rows, grid_cols = scale_grid(rows, cols, block)
    return w.numel() + 4 * (w.numel() // (rows * cols)) * grid_rows * grid_cols


def _estimate(model: nn.Module, scheme: QuantizationScheme | None, plain: torch.dtype) -> int:
    """Bytes of the files as the published quantized checkpoints lay them out: block FP8 for every decoder matrix
    but the routers (1 byte a value + a float32 scale per block), MXFP4 for routed experts (4.25 bits a value),
    everything else in the config's dtype."""
    plain_size = torch.empty((), dtype=plain).element_size()
    layers = find_moe_layers(model)
    routers = {id(p) for layer in layers if layer.router is not None for p in layer.router.parameters()}
    experts = {id(p) for layer in layers for p in layer.experts.parameters()}
    in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    total = 0
    for p in model.parameters():
        matrix = p.dim() >= 2 and id(p) in in_layers and id(p) not in routers
        if scheme is not None and scheme.method == "fp8" and matrix:  # (one tensor per expert for fused experts)
            total += _fp8_bytes(p, scheme.block_size)
        elif scheme is not None and scheme.method == "mxfp4" and id(p) in experts and p.dim() == 3:
            total += p.numel() // 2 + p.numel() // 32
        else:
            total += p.numel() * plain_size
    return total
