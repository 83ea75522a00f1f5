"""Block FP8, the format DeepSeek-V3/R1 and Kimi-K2 ship: e4m3 values with one float32 scale per 128 x 128 block.

Quantize and dequantize fused experts tensors [E, A, B] (one expert's matrix is A x B; blocks never span two
experts); a checkpoint's single matrix is the E = 1 case. The last block of a dimension may be partial.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "FP8", "FP8_EXPERT_BLOCK", "FP8_MAX", "SCALE_SUFFIX", "Scratch", "dequantize_experts", "quantize_experts",
    "scale_grid",
]  # fmt: skip

FP8 = torch.float8_e4m3fn
"""The 8-bit storage dtype (e4m3, largest finite value 448)."""
FP8_EXPERT_BLOCK = (128, 128)
"""Block of one scale in a frozen expert's matrix: DeepSeek-V3's, so its files map onto it."""
SCALE_SUFFIX = "_scale_inv"
"""An FP8 tensor ``P`` keeps its per-block scales in ``P_scale_inv`` (files: ``<name>.weight_scale_inv``)."""
FP8_MAX = 448.0
"""Each block is scaled so its largest magnitude becomes e4m3's largest finite value."""


def scale_grid(a: int, b: int, block: tuple[int, int] = FP8_EXPERT_BLOCK) -> tuple[int, int]:
    """The scales' shape for one A x B matrix: ceil(A / block rows) x ceil(B / block columns)."""
    return math.ceil(a / block[0]), math.ceil(b / block[1])


def quantize_experts(
    w_EAB: torch.Tensor, block: tuple[int, int] = FP8_EXPERT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused experts tensor -> (``float8_e4m3fn`` [E, A, B], float32 scales [E, ceil(A/bA), ceil(B/bB)]); each
    block of each expert scaled so its largest value is 448 (blocks never span two experts)."""
    experts, a, b = w_EAB.shape
    ga, gb = scale_grid(a, b, block)
    padded = torch.zeros(experts, ga * block[0], gb * block[1], dtype=torch.float32, device=w_EAB.device)
    padded[:, :a, :b] = w_EAB
    blocks = padded.view(experts, ga, block[0], gb, block[1])
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / FP8_MAX
    quantized = (blocks / scale[:, :, None, :, None]).to(FP8).view(experts, ga * block[0], gb * block[1])
    return quantized[:, :a, :b].contiguous(), scale


Scratch = Callable[[torch.dtype, tuple[int, ...]], torch.Tensor]
"""Hands out a tensor of a dtype and shape whose memory may be reused (valid until its next call)."""


def dequantize_experts(
    w8_EAB: torch.Tensor,
    scale_EGH: torch.Tensor,
    dtype: torch.dtype,
    block: tuple[int, int] = FP8_EXPERT_BLOCK,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """FP8 experts and their block scales -> ``dtype`` [E, A, B] (the product computed in float32, then cast).

    ``scratch``: whole-block experts are written into its tensors instead of new ones (the result is then valid
    only until its next call)."""
    experts, a, b = w8_EAB.shape
    if a % block[0] == 0 and b % block[1] == 0:  # whole blocks (every DeepSeek shape): the scales broadcast
        blocks = _copy(w8_EAB.view(experts, a // block[0], block[0], b // block[1], block[1]), torch.float32, scratch)
        blocks.mul_(scale_EGH[:, :, None, :, None])  # (in place on the copy)
        return (blocks if dtype == torch.float32 else _copy(blocks, dtype, scratch)).view(experts, a, b)
    full = scale_EGH.repeat_interleave(block[0], 1)[:, :a].repeat_interleave(block[1], 2)[:, :, :b]
    return (w8_EAB.to(torch.float32) * full).to(dtype)


def _copy(t: torch.Tensor, dtype: torch.dtype, scratch: Scratch | None) -> torch.Tensor:
    """``t`` copied into ``dtype``: a new tensor, or ``scratch``'s."""
    if scratch is None:
        return t.to(dtype, copy=True)
    return scratch(dtype, tuple(t.shape)).copy_(t)
