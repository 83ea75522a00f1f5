"""Observe: which routed experts a task's tokens use (router hooks, ESFT-Gate / Token scores, ESFT's own logs)."""

from .esft_logs import read_esft_logs, round_scores
from .placement import Placement, placed_for_profiling
from .profile import SCORE_AVERAGINGS, RoutingProfile, ScoreAveraging, profile_routing

__all__ = [
    "SCORE_AVERAGINGS",
    "Placement",
    "RoutingProfile",
    "ScoreAveraging",
    "placed_for_profiling",
    "profile_routing",
    "read_esft_logs",
    "round_scores",
]
