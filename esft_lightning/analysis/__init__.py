"""Analyses beyond training: expert granularity (coarser experts simulated by grouping, paper §6.4)."""

from .granularity import (
    ExpertGroups,
    GroupedRouting,
    apply_grouped_routing,
    check_group_size,
    cooccurrence_similarity,
    count_cooccurrence,
    expert_groups,
    group_experts,
    group_scores,
    grouped_routing,
    select_expert_groups,
)

__all__ = [
    "ExpertGroups",
    "GroupedRouting",
    "apply_grouped_routing",
    "check_group_size",
    "cooccurrence_similarity",
    "count_cooccurrence",
    "expert_groups",
    "group_experts",
    "group_scores",
    "grouped_routing",
    "select_expert_groups",
]
