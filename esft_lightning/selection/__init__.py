"""Decide: which experts to train, from routing scores (top-p, disjoint, random) or a config file; the spec of how."""

from .heatmap import routing_heatmap
from .rules import (
    CONFIG_FILE,
    ExpertConfig,
    SelectionShortfall,
    all_experts,
    load_exclusion,
    load_scores,
    no_experts,
    random_experts,
    select_disjoint,
    select_experts,
)
from .spec import PAPER_TOP_P, SCORE_FUNCTIONS, SelectionSpec

__all__ = [
    "CONFIG_FILE",
    "PAPER_TOP_P",
    "SCORE_FUNCTIONS",
    "ExpertConfig",
    "SelectionShortfall",
    "SelectionSpec",
    "all_experts",
    "load_exclusion",
    "load_scores",
    "no_experts",
    "random_experts",
    "routing_heatmap",
    "select_disjoint",
    "select_experts",
]
