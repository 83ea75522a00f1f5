"""Dequantize the weights of quantized checkpoints (block FP8, MXFP4) as they are read, for any rows of dim 0.

Two storage schemes of the checkpoints people download:

- **Block FP8** (DeepSeek-V3/R1/V3.1/V3.2, Kimi-K2, Qwen3 FP8; ``quantization_config.quant_method: fp8``): a 2D
  weight ``W [out, in]`` is stored as ``float8_e4m3fn`` with ``W_scale_inv [ceil(out/bo), ceil(in/bi)]`` (float32),
  ``(bo, bi) = weight_block_size``; the value is ``fp8 x its block's scale``. The last block of a dimension may be
  partial (V3's ``kv_a_proj_with_mqa [576, 7168]`` has scales ``[5, 56]``). V3.1/V3.2's ``scale_fmt: ue8m0`` says
  the scales are powers of two (so the kernels can use them as exponents); the files still store them as float32,
  and the value is the same product. A scale stored as ``uint8`` is read as an E8M0 exponent, ``2^(s - 127)``.
- **MXFP4** (GPT-OSS; ``quant_method: mxfp4``): a fused experts tensor ``P`` is stored as ``P_blocks [E, out, G, 16]``
  (uint8, two e2m1 values a byte, low nibble first) and ``P_scales [E, out, G]`` (uint8 E8M0 exponents, one per
  32 values), ``in = 32 G``. Dequantized it is ``[E, out, in]``; models that keep the experts transposed
  (``[E, in, out]``) get the transpose.

Shape legend: R rows read (a subset of dim 0), O out features, I in features, E experts, G 32-value groups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .fp8_blocks import SCALE_SUFFIX, quantize_experts

__all__ = [
    "MXFP4_BLOCKS_SUFFIX",
    "MXFP4_SCALES_SUFFIX",
    "QuantizationScheme",
    "dequantize_fp8_rows",
    "dequantize_mxfp4",
    "quantize_fp8_blocks",
    "quantize_mxfp4",
    "read_quantization",
    "transposed_parameters",
]

MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"

# The 16 values of an e2m1 nibble (sign, 2 exponent bits, 1 mantissa bit).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class QuantizationScheme:
    """How a checkpoint directory stores its weights, from ``config.json``'s ``quantization_config``."""

    method: str
    """``fp8`` (block FP8) or ``mxfp4``."""
    block_size: tuple[int, int] = (128, 128)
    """FP8: ``weight_block_size`` (rows, columns) of one scale."""
    scale_format: str | None = None
    """FP8: ``scale_fmt`` as the config says it (``ue8m0``: power-of-two scales), recorded for ``esft plan``."""

    def describe(self) -> str:
        if self.method == "fp8":
            fmt = f", {self.scale_format} scales" if self.scale_format else ""
            return f"block FP8 (e4m3, {self.block_size[0]}x{self.block_size[1]} blocks{fmt})"
        return "MXFP4 (e2m1 values, one E8M0 scale per 32)"


def read_quantization(directory: str | Path | None) -> QuantizationScheme | None:
    """The quantization of a model directory's weight files (None: stored in a plain dtype).

    Raises ``ValueError`` naming ``config.json`` for a scheme esft-lightning cannot read.
    """
    if directory is None or not (Path(directory) / "config.json").exists():
        return None
    config = json.loads((Path(directory) / "config.json").read_text())
    found = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not found:
        return None
    method = found.get("quant_method")
    if method == "fp8":
        fmt = found.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"{directory}/config.json: quantization_config.fmt {fmt!r}: only e4m3 FP8 is read")
        block = found.get("weight_block_size") or (128, 128)
        if len(block) != 2 or any(not isinstance(b, int) or b < 1 for b in block):
            raise ValueError(
                f"{directory}/config.json: quantization_config.weight_block_size {block!r}: want [rows, cols]"
            )
        return QuantizationScheme("fp8", (block[0], block[1]), found.get("scale_fmt"))
    if method == "mxfp4":
        return QuantizationScheme("mxfp4")
    raise ValueError(
        f"{directory}/config.json: quantization_config.quant_method {method!r} is not read by esft-lightning "
        "(block FP8 `fp8` and `mxfp4` are); dequantize the checkpoint to bf16 first"
    )


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Stored scales as float32 multipliers: float scales as they are, uint8 ones as E8M0 exponents."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - 127)
    return scale.to(torch.float32)


def dequantize_fp8_rows(
    weight_RI: torch.Tensor,
    read_scale_rows: Callable[[list[int]], torch.Tensor],
    rows: list[int] | range,
    block_size: tuple[int, int],
) -> torch.Tensor:
    """Rows ``rows`` of a block-FP8 weight (``weight_RI``: those rows as stored) as float32.

    ``read_scale_rows(block_rows)`` returns the scale rows covering them (only those are read); they are expanded to
    the rows' shape for one vectorized product (a transient the size of the rows read, in float32).
    """
    block_rows, block_cols = block_size
    rows = list(rows)
    out_RI = weight_RI.to(torch.float32)
    if not rows:
        return out_RI
    blocks_R = torch.tensor(rows, dtype=torch.long) // block_rows
    needed, position_R = torch.unique(blocks_R, sorted=True, return_inverse=True)
    scale_BC = _scale_values(read_scale_rows(needed.tolist()))
    in_features = out_RI.shape[1]
    # One vectorized product: each row times its block row's scales, each scale repeated over its block's columns.
    out_RI *= scale_BC[position_R].repeat_interleave(block_cols, dim=1)[:, :in_features]
    return out_RI


def check_fp8_scale_shape(
    weight_shape: list[int], scale_shape: list[int], block_size: tuple[int, int], weight_key: str, scale_key: str
) -> None:
    """A scale grid that does not match its weight (ceil-division blocks) is an error naming both tensors."""
    if len(weight_shape) != 2:
        raise ValueError(f"{weight_key}: block-FP8 weights are 2D, this one is {weight_shape} (scale {scale_key})")
    want = [math.ceil(weight_shape[0] / block_size[0]), math.ceil(weight_shape[1] / block_size[1])]
    if list(scale_shape) != want:
        raise ValueError(
            f"{scale_key} has shape {list(scale_shape)}, but {weight_key} {list(weight_shape)} in "
            f"{block_size[0]}x{block_size[1]} blocks needs {want}"
        )


def dequantize_mxfp4(blocks_EOGB: torch.Tensor, scales_EOG: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks and scales -> float32 ``[E, O, 32 G]``."""
    if blocks_EOGB.shape[:-1] != scales_EOG.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks_EOGB.shape)} do not match scales {list(scales_EOG.shape)}")
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    values = torch.empty(*blocks_EOGB.shape[:-1], blocks_EOGB.shape[-1] * 2, dtype=torch.float32)
    values[..., 0::2] = lut[(blocks_EOGB & 0x0F).long()]
    values[..., 1::2] = lut[(blocks_EOGB >> 4).long()]
    values *= torch.exp2(scales_EOG.to(torch.float32) - 127).unsqueeze(-1)  # E8M0: a power of two, exact
    return values.flatten(-2)


# -- writing (tests, the merged model's `original` format, benchmarks) ------------------------------------------
def quantize_fp8_blocks(weight_OI: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2D weight -> (``float8_e4m3fn`` weight, float32 ``scale_inv`` per block), each block's max at 448 (one
    expert of ``fp8_blocks.quantize_experts``)."""
    weight, scale = quantize_experts(weight_OI[None], block_size)
    return weight[0], scale[0]


def quantize_mxfp4(weight_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, O, I]`` (I a multiple of 32) -> (uint8 blocks ``[E, O, I/32, 16]``, uint8 E8M0 scales ``[E, O, I/32]``),
    each value rounded to the nearest e2m1 value after scaling its group's max into range."""
    experts, out_features, in_features = weight_EOI.shape
    groups = weight_EOI.to(torch.float32).reshape(experts, out_features, in_features // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # max |value| / 2^e <= 6, e2m1's largest
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(_E2M1)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # nearest representable value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def transposed_parameters(model: torch.nn.Module) -> set[str]:
    """Parameters of experts modules that keep ``[E, in, out]`` (``is_transposed``): MXFP4 files store
    ``[E, out, in]``, and for a square projection the shapes alone cannot tell."""
    return {
        f"{module_name}.{leaf}" if module_name else leaf
        for module_name, module in model.named_modules()
        if getattr(module, "is_transposed", False)
        for leaf, _ in module.named_parameters(recurse=False)
    }


def quantized_tensor_names(keys: list[str], scheme: QuantizationScheme | None) -> dict[str, Any]:
    """Pair a file's quantized tensors: {logical name: (kind, value key, scale key)}; plain tensors are absent.

    FP8: ``X.weight`` with ``X.weight_scale_inv``; MXFP4: ``P_blocks`` with ``P_scales`` read as ``P``.
    """
    present = set(keys)
    pairs: dict[str, Any] = {}
    if scheme is None:
        return pairs
    for key in keys:
        if scheme.method == "fp8" and key.endswith(SCALE_SUFFIX):
            weight = key.removesuffix(SCALE_SUFFIX)
            if weight in present:
                pairs[weight] = ("fp8", weight, key)
        elif scheme.method == "mxfp4" and key.endswith(MXFP4_BLOCKS_SUFFIX):
            base = key.removesuffix(MXFP4_BLOCKS_SUFFIX)
            if base + MXFP4_SCALES_SUFFIX in present:
                pairs[base] = ("mxfp4", key, base + MXFP4_SCALES_SUFFIX)
    return pairs
