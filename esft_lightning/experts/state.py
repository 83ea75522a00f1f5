"""What ESFT keeps on a model and its experts modules: one state object per experts module, the names it declares.

PEFT's tuner layers declare the names they own; so does the split. On an experts module it owns:

- the trainable copies ``esft_<name>`` (``TRAINED_PREFIX``) of each per-expert tensor in ``expert_param_names``;
- three non-persistent buffers (``SLOT_BUFFERS``): buffers, so they follow ``.to()`` and FSDP2's broadcast;
- one ``ExpertsState`` (attribute ``STATE_ATTR``): the implementation the module ran before ``esft``, the split's
  host-side bookkeeping, and, under expert parallelism, the shard and its token dispatcher.

On the model it owns one attribute, the applied ``ExpertConfig`` (``expert_config_of`` / ``set_expert_config``).
Everything else reads these through the accessors below, never by ``getattr`` on a name of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from ..selection.rules import ExpertConfig

__all__ = [
    "ESFT_IMPLEMENTATION", "EXPERT_IDS", "GROUP_OF_EXPERT", "SLOT_BUFFERS", "SLOT_OF_EXPERT", "STATE_ATTR",
    "TRAINED_PREFIX", "Dispatcher", "ExpertsForward", "ExpertsState", "SplitState", "expert_config_of",
    "expert_param_names", "expert_shard", "experts_state", "has_split", "set_expert_config",
]  # fmt: skip

ESFT_IMPLEMENTATION = "esft"
"""The name of the split-aware forward in transformers' ``ExpertsInterface``."""
TRAINED_PREFIX = "esft_"
"""Prefix of the trainable copies: ``esft_gate_up_proj`` holds the selected experts' rows of ``gate_up_proj``."""
EXPERT_IDS = "esft_expert_ids"
"""Buffer [k]: the selected experts' ids (local ids under expert parallelism), in slot order."""
SLOT_OF_EXPERT = "esft_slot_of_expert"
"""Buffer [E]: each expert's slot in the trainable copies, -1 for a frozen expert."""
GROUP_OF_EXPERT = "esft_group_of_expert"
"""Buffer [E + 1]: the forward's group of each expert (frozen e -> e, selected -> E + slot, placeholder -> E + k)."""
SLOT_BUFFERS = (EXPERT_IDS, SLOT_OF_EXPERT, GROUP_OF_EXPERT)
STATE_ATTR = "esft_state"
"""The experts module's ``ExpertsState`` (``models.base`` repeats this name: it sits below this package)."""
_CONFIG_ATTR = "esft_expert_config"

ExpertsForward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(experts module, hidden_TD, top_k_index_TK, top_k_weights_TK) -> output_TD."""
Dispatcher = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, ExpertsForward], torch.Tensor]
"""Runs an ``ExpertsForward`` on the ranks that hold each pair's expert and returns every token's combined output:
the peer of running it here. Expert parallelism installs one (``ExpertsState.dispatch``)."""


@dataclass(eq=False)
class SplitState:
    """The host-side part of one experts module's split (its tensors are the declared parameters and buffers; which
    per-expert tensors have trainable copies follows from the layout: ``expert_param_names``)."""

    slots: list[int]
    """Each expert's slot (-1 frozen): ``SLOT_OF_EXPERT`` on the host, so the eager loop never syncs to read it."""
    hooks: list[RemovableHandle] = field(default_factory=list)
    """The state-dict hooks that show the model's own keys (removed with the split)."""
    frozen_dtype: torch.dtype | None = None
    """With frozen experts kept in block FP8: the dtype they dequantize to (the model's own); else None."""


@dataclass(eq=False)
class ExpertsState:
    """Everything ESFT keeps on one experts module besides tensors."""

    base_implementation: str | None = None
    """The experts implementation the module ran before ``esft`` (``grouped_mm``, ``eager``, ...)."""
    split: SplitState | None = None
    """The split into frozen and trainable experts; None for a layer without one."""
    shard: Any = None
    """Under expert parallelism: which experts this rank holds (``distributed.expert_parallel.ExpertShard``)."""
    dispatch: Dispatcher | None = None
    """Under expert parallelism: sends token-expert pairs to their owners and combines the outputs."""


def experts_state(experts: nn.Module, create: bool = False) -> ExpertsState | None:
    """The module's ``ExpertsState``; ``create``: a new empty one when it has none yet."""
    state = vars(experts).get(STATE_ATTR)
    if state is None and create:
        state = ExpertsState()
        object.__setattr__(experts, STATE_ATTR, state)  # a plain attribute: not a submodule, not in any state dict
    return state


def has_split(experts: nn.Module) -> bool:
    """Whether ``apply_expert_config`` split this experts module into frozen and trainable experts."""
    state = experts_state(experts)
    return state is not None and state.split is not None


def expert_shard(experts: nn.Module) -> Any:
    """The module's expert-parallel shard (``ExpertShard``), None when it holds every expert."""
    state = experts_state(experts)
    return None if state is None else state.shard


def expert_param_names(experts: nn.Module) -> tuple[str, ...]:
    """Names of an experts module's per-expert tensors (experts on dim 0), from its layout flags."""
    up = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    names = (up, "down_proj")
    if getattr(experts, "has_bias", False):
        names += (f"{up}_bias", "down_proj_bias")
    return names


def expert_config_of(model: nn.Module) -> ExpertConfig | None:
    """The expert config applied to ``model`` (``apply_expert_config``), None when none is."""
    return vars(model).get(_CONFIG_ATTR)


def set_expert_config(model: nn.Module, config: ExpertConfig | None) -> None:
    """Record (or, with None, forget) the expert config applied to ``model``."""
    if config is None:
        vars(model).pop(_CONFIG_ATTR, None)
    else:
        object.__setattr__(model, _CONFIG_ATTR, config)
