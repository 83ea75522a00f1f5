"""What a model's tensors and activations take: per-tensor bytes on a rank, activation and profiling estimates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..experts.state import EXPERT_IDS
from ..models import decoder_layers, find_moe_layers

__all__ = ["TensorBytes", "activation_bytes", "profiling_bytes", "tensor_bytes"]


@dataclass
class TensorBytes:
    """One parameter as the planner sees it: shape, bytes per element, whether it trains, its FSDP2 unit."""

    shape: tuple[int, ...]
    itemsize: int
    trainable: bool
    group: str
    """FSDP2 unit: ``layer.<i>`` or ``root``."""
    experts: tuple[int, ...] | None = None
    """A routed-expert tensor: the global expert id of each dim-0 row (fused: all; trainable copy: the selected)."""
    num_experts: int = 0

    def local_bytes(self, world: int, rank: int, sharded: bool, ep: int = 1) -> int:
        rows = self.shape[0] if self.shape else 1
        if ep > 1 and self.experts is not None:  # mesh (edp, ep): rank = edp index x ep + expert-parallel rank
            per_rank = self.num_experts // ep
            rows = sum(1 for e in self.experts if e // per_rank == rank % ep)  # whole experts, on their owner
            world, rank = world // ep, rank // ep  # then FSDP2 over the ranks holding the same experts
        if sharded and self.shape:  # fully_shard: torch.chunk on dim 0
            chunk = -(-rows // world)
            rows = max(0, min(chunk, rows - rank * chunk))
        return rows * math.prod(self.shape[1:]) * self.itemsize


def _group_of(model: nn.Module) -> dict[int, str]:
    group: dict[int, str] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for p in layer.parameters():
            group[id(p)] = f"layer.{i}"
    return group


def tensor_bytes(model: nn.Module, dtype: torch.dtype | None = None, train_all: bool = False) -> list[TensorBytes]:
    """Every parameter of ``model`` as ``TensorBytes`` (``dtype``: as if stored so; ``train_all``: full fine-tuning)."""
    group = _group_of(model)
    routed: dict[int, tuple[tuple[int, ...], int]] = {}  # routed-expert tensors: their rows' experts, E
    for layer in find_moe_layers(model):
        selected = tuple(int(e) for e in getattr(layer.experts, EXPERT_IDS, torch.empty(0)).tolist())
        for name, p in layer.experts.named_parameters(recurse=False):
            routed[id(p)] = (
                selected if name.startswith("esft_") else tuple(range(layer.num_experts)),
                layer.num_experts,
            )
    out = []
    for p in model.parameters():
        itemsize = (dtype or p.dtype).itemsize if p.is_floating_point() else p.element_size()
        trainable = (train_all and p.is_floating_point()) or p.requires_grad
        out.append(
            TensorBytes(tuple(p.shape), itemsize, trainable, group.get(id(p), "root"), *routed.get(id(p), (None, 0)))
        )
    return out


def activation_bytes(model: nn.Module, tokens: int, itemsize: int, checkpointing: bool) -> int:
    """Estimated peak activation bytes of one training micro-batch of ``tokens`` tokens on one rank.

    Per token and decoder layer (elements), as the saved-for-backward tensors of transformers' layers add up
    (checked against them in tests/test_planning.py): the two norms' inputs (2H); attention: twice each input
    projection's output (the output and what rotary, head reshapes and memory-efficient attention save; no T x T
    scores) plus the output projection's input; an MoE layer: router logits and probabilities (E each, fp32), for
    each of the top-k routed pairs the gathered input, gate/up output, activation, down input and output
    (2H + 4I; 2H + 8I for gpt_oss's clamped, biased experts), and 3 I_shared for shared experts; a dense MLP 3I.
    The head: logits, log-softmax and a gradient (12 bytes per vocabulary entry). With activation checkpointing
    only each layer's input is kept, plus one layer recomputed in backward. Against the peak a CPU forward and
    backward measures (tests/test_planning.py) this errs high by 1.1-1.8x, never low.
    """
    hidden = model.config.get_text_config().hidden_size
    moe = {layer.index: layer for layer in find_moe_layers(model)}
    per_layer = []
    for i, layer in enumerate(decoder_layers(model)):
        attention = next((m for n, m in layer.named_children() if "attn" in n or "attention" in n), None)
        linears = [m for m in attention.modules() if isinstance(m, nn.Linear)] if attention is not None else []
        # the projection back to the residual stream saves its input; every other projection its output, twice
        elements = 2 * hidden + sum(m.in_features if m.out_features == hidden else 2 * m.out_features for m in linears)
        if i in moe:
            down = moe[i].experts.down_proj
            width = down.numel() // (down.shape[0] * hidden)
            # clamped, biased GLU experts (gpt_oss) save about twice the intermediates of a plain SwiGLU
            per_pair = 2 * hidden + (8 if getattr(moe[i].experts, "has_bias", False) else 4) * width
            elements += 2 * moe[i].num_experts * 4 // itemsize + moe[i].top_k * per_pair
            shared = sum(p.numel() for m in moe[i].shared for p in m.parameters() if p.dim() == 2)
            elements += shared // hidden  # 3 I_shared: gate, up and activation outputs of a 3-matrix MLP
        else:
            mlp = getattr(layer, "mlp", None)
            elements += sum(p.numel() for p in mlp.parameters() if p.dim() == 2) // hidden if mlp is not None else 0
        per_layer.append(elements)
    vocab = model.get_output_embeddings().weight.shape[0]
    widest = max(per_layer, default=0)
    if checkpointing:
        body = (len(per_layer) * hidden + widest) * itemsize
    else:
        body = sum(per_layer) * itemsize
    return tokens * (body + 12 * vocab)


def profiling_bytes(model: nn.Module, tensors: list[TensorBytes], tokens: int, itemsize: int) -> int:
    """Rank 0's GPU peak while profiling with weights streamed one module at a time (the placement's worst case:
    a model that fits is moved whole, which it then does): the largest layer plus a no-grad layer's working set."""
    by_group: dict[str, int] = {}
    for t in tensors:
        by_group[t.group] = by_group.get(t.group, 0) + t.local_bytes(1, 0, False)
    layers = [v for k, v in by_group.items() if k != "root"] or [0]
    hidden = model.config.get_text_config().hidden_size
    widest = max((layer.top_k * 4 * (layer.experts.down_proj.numel() // layer.num_experts) // hidden for layer in
                  find_moe_layers(model)), default=0)  # fmt: skip
    return max(layers) + tokens * (6 * hidden + widest) * itemsize
