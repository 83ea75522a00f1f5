"""Analyses beyond training: expert granularity (coarser experts simulated by grouping, paper §6.4), families table."""

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
    "granularity_rows",
    "summarise_granularity",
]


def __getattr__(name: str) -> object:
    # The runner pulls in data loading, training and generation: imported only when asked for.
    if name in ("granularity_rows", "summarise_granularity", "GRANULARITY_METHODS"):
        from . import granularity_run

        return getattr(granularity_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
