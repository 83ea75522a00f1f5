"""How a family's router weights the experts it picks: renormalised over the top-k or not, scaled, choice bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import MoELayer

__all__ = ["TopKWeighting", "topk_weighting"]


@dataclass(frozen=True)
class TopKWeighting:
    """A router's rule w_i = s_i * scale (/ sum of the chosen s when ``normalise``), s_i the expert's affinity."""

    normalise: bool | None
    """Renormalise the chosen affinities to sum to 1 (``norm_topk_prob``); None: no flag says, infer it from the
    router's own weights."""
    scale: float
    """Multiplier applied after (``routed_scaling_factor``; 1 when the family has none)."""
    choice_bias: torch.Tensor | None
    """Per-expert bias added to the affinities to choose experts but not to weight them (DeepSeek-V3's
    ``e_score_correction_bias``), or None."""


def _attribute(layer: MoELayer, name: str) -> object | None:
    # The router holds its own copy in most families; some keep it on the block or only in the config.
    for owner in (layer.router, layer.block, getattr(layer.experts, "config", None)):
        value = getattr(owner, name, None) if owner is not None else None
        if value is not None:
            return value
    return None


def topk_weighting(layer: MoELayer) -> TopKWeighting:
    """The top-k weighting rule of ``layer``'s router, read from its attributes (routers that always renormalise
    without a flag, e.g. Mixtral's, give ``normalise=None``: the caller checks against the router's output)."""
    normalise = _attribute(layer, "norm_topk_prob")
    scale = _attribute(layer, "routed_scaling_factor")
    bias = _attribute(layer, "e_score_correction_bias")
    return TopKWeighting(
        normalise=bool(normalise) if isinstance(normalise, bool) else None,
        scale=float(scale) if isinstance(scale, (int, float)) else 1.0,
        choice_bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
    )
