"""Lightning callbacks of esft-lightning, installed as `esft_lightning.callbacks`."""

from .expert_selection import ExpertSelectionCallback
from .routing_drift import RoutingDriftCallback
from .task_eval import TaskEvalCallback

__all__ = ["ExpertSelectionCallback", "RoutingDriftCallback", "TaskEvalCallback"]
