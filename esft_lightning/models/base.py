"""What a family description holds (only what cannot be discovered) and one resolved MoE layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

Scoring = Literal["softmax", "sigmoid", "sqrtsoftplus", "probabilities"]


class UnsupportedModelError(ValueError):
    """A model whose MoE layers esft-lightning cannot train; the message names the model type and why."""


@dataclass(frozen=True)
class MoEFamily:
    """What esft-lightning must be told about one Hugging Face MoE family (the rest is discovered)."""

    model_type: str
    """`config.model_type` of the family, e.g. ``deepseek_v3``."""
    scoring: Scoring | None = None
    """How router logits become affinities s_{i,t} (before top-k renormalisation or scaling); ``None``: from the
    config's ``scoring_func`` if it has one, else inferred from the router's own top-k weights while profiling."""
    shared_expert_attrs: tuple[str, ...] | None = None
    """Attributes of the MoE block holding shared experts (and their gates); ``None``: every child of the block
    whose name contains ``shared``."""
    tiny_config: dict[str, Any] = field(default_factory=dict)
    """Config kwargs of a tiny random model, applied over the generically shrunk defaults (nested for sub-configs)."""
    tiny_config_is_complete: bool = False
    """``tiny_config`` alone (over the config class defaults) makes the tiny model: no generic shrinking."""
    unsupported: str | None = None
    """Why this family's experts cannot be trained, if they cannot."""
    discovered: bool = False
    """True for a description made up from the model alone (no family file)."""


@dataclass
class MoELayer:
    """One decoder layer's MoE block, resolved from a model."""

    index: int
    block: nn.Module
    router: nn.Module | None
    experts: nn.Module
    shared: list[nn.Module]
    family: MoEFamily
    router_output_index: int = 0
    """Which output of ``router`` holds the router logits (transformers' ``OutputRecorder`` index)."""

    @property
    def num_experts(self) -> int:
        # Under expert parallelism the module holds only its rank's experts; routing still spans all of them.
        state = vars(self.experts).get("esft_state")  # experts.state.STATE_ATTR (that package sits above this one)
        shard = None if state is None else state.shard
        return int(shard.num_experts if shard is not None else self.experts.num_experts)

    @property
    def top_k(self) -> int:
        for owner in (self.router, self.block):
            for attr in ("top_k", "num_experts_per_tok"):
                value = getattr(owner, attr, None)
                if isinstance(value, int):
                    return value
        config = self.experts.config
        return int(getattr(config, "num_experts_per_tok", None) or config.moe_topk)
