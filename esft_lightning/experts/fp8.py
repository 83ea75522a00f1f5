"""Frozen routed experts kept in block FP8: quantize a fused experts tensor, and run grouped matmuls that dequantize
each expert's weights as they are used, never keeping a dequantized copy for backward.

Shape legend: E experts, A x B one expert's matrix as the fused tensor stores it ([E, A, B]; A = out, B = in unless
the layout is transposed), T token-expert pairs (rows of x, grouped by expert), I / O in / out features.

Why a custom autograd function: dequantizing a layer's frozen experts and calling a grouped matmul on them would
let autograd keep the dequantized weights for backward (a 16-bit copy of every layer's experts alive until the
backward pass, more than the 8-bit storage saves). The weights are frozen, so backward needs only the input
gradient, ``grad_y @ W``; it dequantizes the experts again, chunk by chunk, from the 8-bit tensors it saved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "FP8_EXPERT_BLOCK",
    "SCALE_SUFFIX",
    "dequantize_experts",
    "frozen_fp8_linear",
    "is_fp8_frozen",
    "quantize_experts",
]

FP8_EXPERT_BLOCK = (128, 128)
"""Block of one scale in a frozen expert's matrix: DeepSeek-V3's, so its files map onto it."""
SCALE_SUFFIX = "_scale_inv"
"""A frozen FP8 experts tensor ``P`` keeps its per-block scales in the parameter ``P_scale_inv`` [E, A/128, B/128]."""
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
_CHUNK_ELEMENTS = 2**25  # experts dequantized at once: at most 32 M values (64 MB in bf16) of transient weights


def _grid(a: int, b: int, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(a / block[0]), math.ceil(b / block[1])


def quantize_experts(
    w_EAB: torch.Tensor, block: tuple[int, int] = FP8_EXPERT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused experts tensor -> (``float8_e4m3fn`` [E, A, B], float32 scales [E, ceil(A/bA), ceil(B/bB)]); each
    block of each expert scaled so its largest value is 448 (blocks never span two experts)."""
    experts, a, b = w_EAB.shape
    ga, gb = _grid(a, b, block)
    padded = torch.zeros(experts, ga * block[0], gb * block[1], dtype=torch.float32, device=w_EAB.device)
    padded[:, :a, :b] = w_EAB
    blocks = padded.view(experts, ga, block[0], gb, block[1])
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / _FP8_MAX
    quantized = (blocks / scale[:, :, None, :, None]).to(_FP8).view(experts, ga * block[0], gb * block[1])
    return quantized[:, :a, :b].contiguous(), scale


def dequantize_experts(
    w8_EAB: torch.Tensor, scale_EGH: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] = FP8_EXPERT_BLOCK
) -> torch.Tensor:
    """FP8 experts and their block scales -> ``dtype`` [E, A, B] (the product computed in float32, then cast)."""
    experts, a, b = w8_EAB.shape
    if a % block[0] == 0 and b % block[1] == 0:  # whole blocks (every DeepSeek shape): the scales broadcast
        blocks = w8_EAB.view(experts, a // block[0], block[0], b // block[1], block[1]).to(torch.float32)
        return (blocks * scale_EGH[:, :, None, :, None]).to(dtype).view(experts, a, b)
    full = scale_EGH.repeat_interleave(block[0], 1)[:, :a].repeat_interleave(block[1], 2)[:, :, :b]
    return (w8_EAB.to(torch.float32) * full).to(dtype)


def _chunks(offsets: torch.Tensor, per_expert: int) -> list[tuple[int, int, int, int]]:
    """Expert ranges [e0, e1) with their pair rows [r0, r1), at most ``_CHUNK_ELEMENTS`` weights each; experts
    without pairs are skipped (one host sync: the offsets)."""
    ends = offsets.tolist()
    size = max(1, _CHUNK_ELEMENTS // max(per_expert, 1))
    out = []
    for e0 in range(0, len(ends), size):
        e1 = min(e0 + size, len(ends))
        r0, r1 = (ends[e0 - 1] if e0 else 0), ends[e1 - 1]
        if r1 > r0:
            out.append((e0, e1, r0, r1))
    return out


def _matmul_chunk(x_TI: torch.Tensor, w_EIO: torch.Tensor, offsets: torch.Tensor, grouped: bool) -> torch.Tensor:
    if grouped:
        if hasattr(F, "grouped_mm"):
            return F.grouped_mm(x_TI, w_EIO, offs=offsets)
        return torch._grouped_mm(x_TI, w_EIO, offs=offsets)
    out = x_TI.new_empty(x_TI.shape[0], w_EIO.shape[-1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # the per-expert loop (eager experts, dtypes grouped_mm lacks)
        out[start:end] = x_TI[start:end] @ w_EIO[expert]
        start = end
    return out


def _apply(
    x_TI: torch.Tensor,
    w8_EAB: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    transposed: bool,
    backward: bool,
    grouped: bool,
) -> torch.Tensor:
    """``x @ W_e`` for each expert's rows (``backward``: ``x @ W_e^T``), the experts dequantized chunk by chunk."""
    a, b = w8_EAB.shape[1:]
    # Stored [E, A, B]: transposed layouts hold [E, in, out] (x @ W), the others [E, out, in] (x @ W^T).
    need_transpose = transposed == backward
    out = x_TI.new_empty(x_TI.shape[0], a if need_transpose else b)
    for e0, e1, r0, r1 in _chunks(offsets, a * b):
        w = dequantize_experts(w8_EAB[e0:e1], scale[e0:e1], x_TI.dtype)
        w_EIO = w.transpose(-2, -1) if need_transpose else w
        local = (offsets[e0:e1] - r0).to(torch.int32)
        out[r0:r1] = _matmul_chunk(x_TI[r0:r1], w_EIO, local, grouped)
    return out  # (every row belongs to a group: x holds exactly the frozen pairs)


class _FrozenFp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, w8, scale, offsets, transposed, grouped):  # type: ignore[override]
        ctx.save_for_backward(w8, scale, offsets)  # 8-bit weights: references to the parameters, no copy
        ctx.transposed, ctx.grouped = transposed, grouped
        return _apply(x, w8, scale, offsets, transposed, backward=False, grouped=grouped)

    @staticmethod
    def backward(ctx: Any, grad_y):  # type: ignore[override]
        w8, scale, offsets = ctx.saved_tensors
        grad_x = _apply(grad_y.contiguous(), w8, scale, offsets, ctx.transposed, backward=True, grouped=ctx.grouped)
        return grad_x, None, None, None, None, None


def frozen_fp8_linear(
    x_TI: torch.Tensor,
    w8_EAB: torch.Tensor,
    scale: torch.Tensor,
    offsets: torch.Tensor,
    transposed: bool,
    grouped: bool = True,
) -> torch.Tensor:
    """Grouped ``x @ W_e`` over frozen FP8 experts (rows of x grouped by expert, ``offsets`` their int32 ends); the
    gradient flows to ``x`` only. ``grouped``: torch's grouped matmul per chunk, else a per-expert loop."""
    return _FrozenFp8Linear.apply(x_TI, w8_EAB, scale, offsets, transposed, grouped)


def is_fp8_frozen(experts: torch.nn.Module, name: str) -> bool:
    """Whether the experts module keeps its frozen tensor ``name`` in FP8 (with ``name + SCALE_SUFFIX`` scales)."""
    return getattr(experts, name).dtype == _FP8 and hasattr(experts, name + SCALE_SUFFIX)
