"""Frozen routed experts kept in block FP8 (``weights.fp8_blocks``): grouped matmuls that dequantize each expert's
weights as they are used, never keeping a dequantized copy for backward.

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

from ..weights.fp8_blocks import FP8, SCALE_SUFFIX, dequantize_experts

__all__ = ["frozen_fp8_linear", "is_fp8_frozen"]

_CHUNK_ELEMENTS = 2**25  # experts dequantized at once: at most 32 M values (64 MB in bf16) of transient weights
_HOST_BUFFERS: dict[torch.dtype, torch.Tensor] = {}
"""Dequantization buffers reused on the CPU (float32 and the compute dtype, at most one chunk each: 192 MB with
bf16). A fresh tensor of a chunk's size per chunk costs more in page faults than the conversion itself (2.5x on a
2-core host); on a GPU the caching allocator already reuses the memory."""


def _host_buffer(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A ``shape`` view of the reused ``dtype`` buffer (``dequantize_experts``' scratch on the CPU)."""
    numel = math.prod(shape)
    buffer = _HOST_BUFFERS.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = _HOST_BUFFERS[dtype] = torch.empty(max(numel, _CHUNK_ELEMENTS), dtype=dtype)
    return buffer[:numel].view(shape)


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
    scratch = _host_buffer if x_TI.device.type == "cpu" else None
    for e0, e1, r0, r1 in _chunks(offsets, a * b):
        w = dequantize_experts(w8_EAB[e0:e1], scale[e0:e1], x_TI.dtype, scratch=scratch)
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
    return getattr(experts, name).dtype == FP8 and hasattr(experts, name + SCALE_SUFFIX)
