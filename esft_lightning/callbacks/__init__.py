"""Lightning callbacks of esft-lightning, installed as `esft_lightning.callbacks`."""

from .expert_selection import ExpertSelectionCallback
from .fault_guard import NonFiniteLossError, NonFiniteLossGuard
from .progress import ESFTProgressBar, RichEpochProgressBar
from .resume_check import ResumeCheck
from .routing_drift import RoutingDriftCallback
from .task_eval import TaskEvalCallback

__all__ = [
    "ExpertSelectionCallback",
    "NonFiniteLossGuard",
    "NonFiniteLossError",
    "ESFTProgressBar",
    "RichEpochProgressBar",
    "ResumeCheck",
    "RoutingDriftCallback",
    "TaskEvalCallback",
]
