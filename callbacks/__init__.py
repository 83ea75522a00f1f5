"""Lightning callbacks of esft-lightning, installed as `esft_lightning.callbacks`."""

from .expert_selection import ExpertSelectionCallback

__all__ = ["ExpertSelectionCallback"]
