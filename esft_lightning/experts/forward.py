"""The ``esft`` experts implementation: frozen and selected experts in separate tensors, in every fused layout.

Registered in transformers' ``ExpertsInterface``; ``apply_expert_config`` switches a model to it. It honours the
layout flags transformers' own ``grouped_mm`` honours (``has_gate``, ``has_bias``, ``is_transposed``,
``has_post_expert_norm``) and always calls the module's own ``_apply_gate`` / ``act_fn`` (clamped SwiGLU, interleaved
gate/up, GELU, ...). Token-expert pairs of frozen experts go through the frozen fused tensors and pairs of selected
experts through the small trainable ``esft_*`` tensors: one grouped matmul per group and projection, one weighted
scatter-add back to tokens, one host sync per layer. Gathers are ``index_select`` and the scatter-add is
``index_add_``: on CPU both directions are bitwise reproducible with any number of threads.

Shape legend (suffixes of tensor names, here and in ``distributed.expert_parallel``): T tokens, D hidden size,
K experts per token (top-k), P token-expert pairs (T x K, flattened), E experts of this module, I / O a linear's
in / out features, S ranks of an expert-parallel group, C experts per rank (E / S), R pairs received from them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..weights.fp8_blocks import FP8, SCALE_SUFFIX
from .fp8 import frozen_fp8_linear, is_fp8_frozen
from .state import (
    ESFT_IMPLEMENTATION,
    EXPERT_IDS,
    GROUP_OF_EXPERT,
    TRAINED_PREFIX,
    expert_param_names,
    experts_state,
    has_split,
)

GROUPED_MM_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
"""Dtypes torch's grouped matmul takes: float64 raises "Expected mat_a to be Float32, BFloat16 or Float16"."""


def grouped_mm_supported(
    device_type: str,
    torch_version: str,
    cuda_capability: tuple[int, int] | None = None,
    aligned: bool = True,
    has_functional: bool = True,
    has_private: bool = True,
    compiling: bool = False,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether torch's grouped matmul runs here: the rules transformers applies before its own ``grouped_mm``.

    CPU kernels exist from torch 2.9 and need 16-byte aligned inputs up to torch 2.10; on CUDA,
    ``F.grouped_mm`` (torch >= 2.10) and ``torch._grouped_mm`` (torch >= 2.9) need compute capability 8.0, older
    ``torch._grouped_mm`` Hopper (9.x); under ``torch.compile`` only bf16 is supported. Other dtypes than
    ``GROUPED_MM_DTYPES`` (float64) are never supported: transformers' own ``grouped_mm`` does not check that.
    """
    if dtype not in GROUPED_MM_DTYPES:
        return False
    version = _version(torch_version)
    if not (has_functional or has_private):
        return False
    if compiling and dtype != torch.bfloat16:
        return False
    if device_type == "cpu":
        return version >= Version("2.9") and (aligned or version > Version("2.10"))
    if device_type == "cuda":
        if cuda_capability is None:
            return False
        if has_functional or version >= Version("2.9"):
            return cuda_capability >= (8, 0)
        return cuda_capability[0] == 9
    return True


@functools.lru_cache(maxsize=8)
def _version(text: str) -> Version:
    return Version(text.split("+")[0])


def can_use_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``grouped_mm_supported`` for these tensors on this machine (every weight's dtype must be supported: the
    inputs are cast to the weights' dtype)."""
    if any(w.dtype not in GROUPED_MM_DTYPES for w in weights):
        return False
    capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    compiling = torch.compiler.is_compiling()
    return grouped_mm_supported(
        x.device.type,
        str(torch.__version__),
        capability,
        aligned=all(t.data_ptr() % 16 == 0 for t in weights),  # inputs are gathered copies, so aligned
        has_functional=hasattr(F, "grouped_mm"),
        has_private=hasattr(torch, "_grouped_mm"),
        compiling=compiling,
        dtype=weights[0].dtype if weights else x.dtype,
    )


def base_forward(experts: nn.Module) -> Callable:
    """The experts forward the model used before the split (``grouped_mm``, ``eager``, ...)."""
    implementation = _base_implementation(experts)
    if implementation in ("eager", ESFT_IMPLEMENTATION) or implementation not in ALL_EXPERTS_FUNCTIONS:
        return type(experts).forward.__wrapped__  # the class's own (eager) forward, under the dispatch wrapper
    return ALL_EXPERTS_FUNCTIONS[implementation]


def _base_implementation(experts: nn.Module) -> str:
    state = experts_state(experts)
    return (state.base_implementation if state is not None else None) or "grouped_mm"


def esft_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward with frozen and trained experts in separate tensors (same math as the stock one).

    A layer without a selection keeps the model's own forward, except transformers' ``grouped_mm`` on CPU: it runs
    our grouped path (no trained group) instead, whose backward is deterministic (see ``_rows``). (On CUDA both
    paths' index ops are atomic unless deterministic algorithms are on, and ours adds a host sync per layer.)
    """
    state = experts_state(self)
    if state is not None and state.dispatch is not None:  # expert parallel: the pairs go to their owners
        return state.dispatch(self, hidden_states, top_k_index, top_k_weights, _local_experts_forward)
    return _local_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _local_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    split = has_split(self)
    base = _base_implementation(self)
    if not split and (base != "grouped_mm" or hidden_states.device.type != "cpu"):
        return base_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    names = expert_param_names(self)[:2]
    weights = [getattr(self, n) for n in names] + ([getattr(self, TRAINED_PREFIX + n) for n in names] if split else [])
    weights = [w for w in weights if w.dtype != FP8]  # 8-bit frozen: dequantized to the inputs'
    if base != "eager" and can_use_grouped_mm(hidden_states, *weights):
        return _split_grouped(self, hidden_states, top_k_index, top_k_weights)
    if split:
        return _split_eager(self, hidden_states, top_k_index, top_k_weights)
    if any(w.dtype not in GROUPED_MM_DTYPES for w in weights):
        # transformers' grouped_mm would raise on this dtype too: the experts class's own per-expert loop
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    return base_forward(self)(self, hidden_states, top_k_index, top_k_weights)


def register_esft_forward() -> None:
    """Register the ``esft`` implementation in transformers' ``ExpertsInterface`` (idempotent)."""
    ALL_EXPERTS_FUNCTIONS.register(ESFT_IMPLEMENTATION, esft_experts_forward)


register_esft_forward()  # importing the forward is enough to use it; ``use_esft_implementation`` makes sure


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else F.linear(x, w)
    return y if b is None else y + b


def _grouped_linear(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, b: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    w_EIO = w if transposed else w.transpose(-2, -1)
    x = x.to(w.dtype)
    y = F.grouped_mm(x, w_EIO, offs=offsets) if hasattr(F, "grouped_mm") else torch._grouped_mm(x, w_EIO, offs=offsets)
    return y if b is None else y + b


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 as ``index_select``, whose backward is bitwise reproducible on CPU.

    The backward of advanced indexing ``x[index]`` is ``index_put_(accumulate=True)``: on a CPU with more than one
    thread it adds duplicate rows (a token's k expert pairs) with atomic adds in whichever order the threads get
    there (from 32768 gathered elements, PyTorch's parallel grain), so gradients differ in the last bits from run
    to run unless ``torch.use_deterministic_algorithms(True)``. ``index_select``'s backward is ``index_add_``, which
    on CPU adds rows serially in index order (same result with any thread count; on CUDA it is atomic unless
    deterministic algorithms are on, as the combine's ``index_add_`` is). It is also the faster of the two.
    """
    return x.index_select(0, index)


def _expert_output(self: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    # The module's own gating / activation: clamped SwiGLU, interleaved gate/up, GELU, ... are never re-implemented.
    return self._apply_gate(projected) if self.has_gate else self.act_fn(projected)


def _split_grouped(
    self: nn.Module, hidden_TD: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    up, down, *biases = expert_param_names(self)
    split = has_split(self)
    num_experts, num_slots = self.num_experts, (getattr(self, EXPERT_IDS).numel() if split else 0)
    top_k = top_k_index.shape[-1]
    # Group of each token-expert pair: frozen experts 0..E-1 keep their id, selected experts go to E + slot, and
    # placeholder ids (>= E, e.g. expert-parallel sentinels) to a last group that is never computed. One sort then
    # puts frozen pairs first (by expert), trained pairs next (by slot), placeholders last. (A layer without a
    # selection has only the frozen group: the fused tensors, trainable when every expert of the layer is selected.)
    ids = top_k_index.reshape(-1)
    ids = torch.where((ids < 0) | (ids >= num_experts), num_experts, ids)  # -1 / >= E: placeholders, never run
    group = getattr(self, GROUP_OF_EXPERT)[ids] if split else ids
    group, order = torch.sort(group)
    counts = torch.bincount(group, minlength=num_experts + num_slots + 1)
    ends = torch.cumsum(counts, dim=0, dtype=torch.int32)
    # The one host sync per layer: grouped_mm needs the split points.
    num_frozen, num_routed = ends[[num_experts - 1, num_experts + num_slots - 1]].tolist()
    token_of_pair = order // top_k
    weights = _rows(top_k_weights.reshape(-1), order).unsqueeze(-1)
    out = _accumulator(hidden_TD)
    parts = (
        (0, num_frozen, ends[:num_experts], "", 0),
        (num_frozen, num_routed, ends[num_experts:-1] - num_frozen, TRAINED_PREFIX, num_experts),
    )
    for start, end, offsets, prefix, first_group in parts:
        if end == start:
            continue
        tokens = token_of_pair[start:end]
        b_up = b_down = None
        if biases:  # per-pair bias rows: the expert (frozen part) or slot (trained part) each pair went to
            expert_of_pair = group[start:end] - first_group
            b_up, b_down = (_rows(getattr(self, prefix + n), expert_of_pair) for n in biases)
        h = _expert_output(self, _project(self, prefix + up, _rows(hidden_TD, tokens), offsets, b_up))
        y = _project(self, prefix + down, h, offsets, b_down)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        out.index_add_(0, tokens, (y * weights[start:end]).to(out.dtype))
    return out.to(hidden_TD.dtype)


def _project(
    self: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One grouped projection through tensor ``name``: 8-bit frozen experts are dequantized chunk by chunk."""
    if is_fp8_frozen(self, name):
        y = frozen_fp8_linear(x, getattr(self, name), getattr(self, name + SCALE_SUFFIX), offsets, self.is_transposed)
        return y if bias is None else y + bias
    return _grouped_linear(x, getattr(self, name), offsets, bias, self.is_transposed)


def _accumulator(hidden_TD: torch.Tensor) -> torch.Tensor:
    # A token's k expert outputs are summed in fp32 for 16-bit models, as the stock experts' reduction does.
    dtype = torch.float32 if hidden_TD.dtype in (torch.bfloat16, torch.float16) else hidden_TD.dtype
    return torch.zeros(hidden_TD.shape, dtype=dtype, device=hidden_TD.device)


def _split_eager(
    self: nn.Module, hidden_TD: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    names, slots = expert_param_names(self), experts_state(self).split.slots
    out = _accumulator(hidden_TD)
    valid = (top_k_index >= 0) & (top_k_index < self.num_experts)
    for expert in torch.unique(top_k_index[valid]).tolist():
        token_idx, k_pos = torch.where(top_k_index == expert)
        slot = slots[expert]
        if slot >= 0:
            tensors = [getattr(self, TRAINED_PREFIX + n)[slot] for n in names]
        else:
            tensors = [getattr(self, n)[expert] for n in names]
        w_up, w_down, b_up, b_down = (*tensors, None, None) if len(tensors) == 2 else tensors
        if slot < 0 and w_up.dtype == FP8:  # an 8-bit frozen expert: dequantized as it runs
            x = _rows(hidden_TD, token_idx)
            h = _expert_output(self, _frozen_fp8_expert(self, names[0], expert, x, b_up))
            y = _frozen_fp8_expert(self, names[1], expert, h, b_down)
        else:
            x = _rows(hidden_TD, token_idx).to(w_up.dtype)
            h = _expert_output(self, _linear(x, w_up, b_up, self.is_transposed))
            y = _linear(h, w_down, b_down, self.is_transposed)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
    return out.to(hidden_TD.dtype)


def _frozen_fp8_expert(
    self: nn.Module, name: str, expert: int, x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    weight, scale = getattr(self, name)[expert : expert + 1], getattr(self, name + SCALE_SUFFIX)[expert : expert + 1]
    ends = torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
    y = frozen_fp8_linear(x, weight, scale, ends, self.is_transposed, grouped=False)
    return y if bias is None else y + bias
