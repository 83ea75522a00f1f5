"""Apply: train only the selected routed experts of fused expert tensors (the split, its state, the `esft` forward)."""

from .split import (
    apply_expert_config,
    is_trained_copy,
    remove_expert_split,
    trainable_summary,
    validate_expert_config,
)

__all__ = [
    "apply_expert_config",
    "is_trained_copy",
    "remove_expert_split",
    "trainable_summary",
    "validate_expert_config",
]
