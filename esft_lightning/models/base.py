"""What every MoE family description holds, and how a model's MoE layers are found from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn


@dataclass(frozen=True)
class MoEFamily:
    """Where one Hugging Face MoE family keeps its router, routed experts and shared experts."""

    model_type: str
    """`config.model_type` of the family, e.g. ``deepseek_v3``."""
    scoring: Literal["softmax", "sigmoid"]
    """How the router turns logits into affinities s_{i,t} (before top-k renormalisation or scaling)."""
    router_attr: str = "gate"
    """Attribute of the MoE block holding the router, which returns (logits, topk_weights, topk_indices)."""
    experts_attr: str = "experts"
    """Attribute of the MoE block holding the fused routed experts (gate_up_proj [E,2I,H], down_proj [E,H,I])."""
    shared_expert_attrs: tuple[str, ...] = ()
    """Attributes of the MoE block holding shared experts (and their gates), if any."""
    tiny_config: dict[str, Any] = field(default_factory=dict)
    """Config kwargs of a tiny random model of this family, for tests and the quickstart."""


@dataclass
class MoELayer:
    """One decoder layer's MoE block, resolved from a model."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: list[nn.Module]
    family: MoEFamily

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)
