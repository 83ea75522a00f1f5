"""DeepSeek-V2/V3's sequence-level expert-balance loss, from the routing the experts use (transformers has none).

DeepSeek's own modeling code trains with a balance loss per MoE layer, weighted by ``aux_loss_alpha`` from the
model's config (0.001 for V2-Lite and V3), per sequence when ``seq_aux`` is true: for a sequence of T tokens routed
to K of E experts,

    f_i = E / (K T) * (number of the sequence's token-expert pairs that go to expert i)
    P_i = 1/T * sum_t s'_{i,t},  s'_{i,t} = s_{i,t} / sum_j s_{j,t}  (the router's affinities, summing to 1 per token)
    loss = alpha * sum_i f_i P_i,  averaged over sequences and summed over layers.

For V2's softmax router s' = s; V3 normalises its sigmoid scores. The ESFT reference trains with it (its modeling
code adds it in training mode), transformers' ports of these families compute none. The routers are frozen in ESFT,
but the loss still reaches the trained experts of earlier layers through the hidden states the routers read; f
counts are constants (no gradient), as in the reference. Padding tokens are left out of every count and mean (the
reference includes them; esft-lightning's packed batches have padding only at the end of a batch).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from . import find_moe_layers
from .base import MoELayer

__all__ = ["SEQUENCE_BALANCE_FAMILIES", "SequenceBalanceLoss", "has_sequence_balance_loss", "sequence_balance_loss"]

SEQUENCE_BALANCE_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3"})
"""Families whose original modeling code trains with this loss (config keys ``aux_loss_alpha``, ``seq_aux``) while
transformers' port computes no router loss. Any other model whose config defines ``aux_loss_alpha`` and no
transformers router loss (``router_aux_loss_coef``) is treated the same way."""


def has_sequence_balance_loss(model: nn.Module) -> bool:
    """Whether ``model`` is trained with the sequence-level balance loss that esft-lightning computes itself."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "model_type", None) in SEQUENCE_BALANCE_FAMILIES:
        return True
    defines_own = getattr(config, "aux_loss_alpha", None) is not None
    return defines_own and getattr(config, "router_aux_loss_coef", None) is None


def normalized_affinities(logits: torch.Tensor, scoring: str | None) -> torch.Tensor:
    """s'_{i,t}: the router's affinities of every expert [N, E] in float32, normalised to sum to 1 per token."""
    logits = logits.float()
    if scoring == "sigmoid":
        scores = logits.sigmoid()
    elif scoring == "sqrtsoftplus":
        scores = torch.nn.functional.softplus(logits).sqrt()
    elif scoring == "probabilities":  # the router outputs probabilities already
        scores = logits
    else:  # softmax, and the routers whose scoring is only inferred while profiling
        return logits.softmax(dim=-1)
    return scores / scores.sum(dim=-1, keepdim=True)


def sequence_balance_loss(
    router_logits: torch.Tensor,
    top_k_index: torch.Tensor,
    attention_mask: torch.Tensor,
    scoring: str | None = "softmax",
    per_sequence: bool = True,
) -> torch.Tensor:
    """One layer's balance loss without alpha: ``mean over sequences of sum_i f_i P_i`` (module docstring).

    ``router_logits`` [B*T, E], ``top_k_index`` [B*T, K] (ids outside 0..E-1 are placeholders, not routings),
    ``attention_mask`` [B, T] (0 = padding: not counted). ``per_sequence=False`` (``seq_aux: false``): the whole
    batch is one sequence, the reference's batch-level variant. Sequences without tokens are skipped.
    """
    batch, length = attention_mask.shape
    num_experts, top_k = router_logits.shape[-1], top_k_index.shape[-1]
    if router_logits.shape[0] != batch * length or top_k_index.reshape(-1, top_k).shape[0] != batch * length:
        raise ValueError(
            f"router logits {tuple(router_logits.shape)} / top-k ids {tuple(top_k_index.shape)} do not cover the "
            f"batch's {batch} x {length} tokens"
        )
    mask = attention_mask.reshape(batch, length).to(torch.float32)
    if not per_sequence:
        batch, length, mask = 1, batch * length, mask.reshape(1, -1)
    scores = normalized_affinities(router_logits, scoring).reshape(batch, length, num_experts)
    ids = top_k_index.reshape(batch, length, top_k)
    valid = (ids >= 0) & (ids < num_experts) & (mask.unsqueeze(-1) > 0)
    with torch.no_grad():  # f is a count: no gradient, as in the reference
        sequence_of_pair = torch.arange(batch, device=ids.device).view(batch, 1, 1).expand_as(ids)
        flat = (sequence_of_pair * num_experts + ids.clamp(0, num_experts - 1)).reshape(-1)
        counts = torch.zeros(batch * num_experts, device=ids.device)
        counts.index_add_(0, flat, valid.reshape(-1).to(counts.dtype))
        counts = counts.view(batch, num_experts)
    tokens = mask.sum(dim=1)  # non-padding tokens per sequence
    kept = tokens > 0
    per_token = tokens.clamp(min=1).unsqueeze(-1)
    f = counts * num_experts / (top_k * per_token)
    p = (scores * mask.unsqueeze(-1)).sum(dim=1) / per_token
    loss = (f * p).sum(dim=-1)
    return loss[kept].mean() if bool(kept.any()) else loss.sum() * 0


class SequenceBalanceLoss:
    """Records every MoE layer's router logits and the experts' top-k ids during forwards inside ``with``.

    ``loss(attention_mask)`` is the sum over layers of ``sequence_balance_loss`` of the last forward (without alpha:
    multiply by the coefficient). The hooks are removed on leaving the block, so a recomputation in backward
    (activation checkpointing) records nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = find_moe_layers(model)
        self.per_sequence = bool(getattr(model.config, "seq_aux", True))
        self._logits: dict[int, torch.Tensor] = {}
        self._index: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> SequenceBalanceLoss:
        self._logits.clear()
        self._index.clear()
        for layer in self.layers:
            if layer.router is None:
                raise ValueError(f"layer {layer.index} has no router module to take the balance loss from")
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(layer), with_kwargs=True))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _router_hook(self, layer: MoELayer) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: Any) -> None:
            logits = output[layer.router_output_index] if isinstance(output, (tuple, list)) else output
            self._logits[layer.index] = logits.reshape(-1, logits.shape[-1])

        return hook

    def _experts_hook(self, layer: MoELayer) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            # experts(hidden_states, top_k_index, top_k_weights): the ids are the one integer tensor
            tensors = (*args, *kwargs.values())
            index = next(t for t in tensors if isinstance(t, torch.Tensor) and not t.is_floating_point())
            self._index[layer.index] = index

        return hook

    def loss(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sum over MoE layers of the last forward's balance loss (without alpha)."""
        missing = [i for i in (layer.index for layer in self.layers) if i not in self._logits or i not in self._index]
        if missing:
            raise RuntimeError(f"no routing recorded for MoE layers {missing}: run the forward inside the with block")
        total = None
        for layer in self.layers:
            logits = self._logits[layer.index][:, : layer.num_experts]  # (extra router classes are no experts)
            term = sequence_balance_loss(
                logits, self._index[layer.index], attention_mask, layer.family.scoring, self.per_sequence
            )
            total = term if total is None else total + term
        return total
