"""ESFTProgressBar: Lightning's progress bar, without `Epoch 0/-2` when only max_steps bounds the run."""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class RichEpochProgressBar(RichProgressBar):
    """RichProgressBar whose label is ``Epoch N/last`` only when ``max_epochs`` bounds the run, else ``Epoch N``.

    (With only ``max_steps`` set, Lightning's ``max_epochs`` is -1 and its label reads ``Epoch 0/-2``.)
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "")
        width = len(self.validation_description)
        return f"{text:{width}}" if width > len(text) else text  # padded as Lightning does, against flicker


# The bar Lightning itself would pick: rich when installed (where the label was wrong), else tqdm (already right).
ESFTProgressBar = RichEpochProgressBar if _RICH_AVAILABLE else TQDMProgressBar


def add_progress_bar(trainer_config: Any) -> None:
    """In a parsed LightningCLI trainer config: use RichEpochProgressBar where Lightning would add its rich bar.

    (Only when the bar is enabled, rich is installed and no progress bar is configured already.)
    """
    if trainer_config.get("enable_progress_bar") is False or not _RICH_AVAILABLE:
        return
    callbacks = trainer_config.get("callbacks") or []
    if any("ProgressBar" in str(getattr(cb, "class_path", "")) for cb in callbacks):
        return
    bar = Namespace(class_path=f"{__name__.rsplit('.', 1)[0]}.RichEpochProgressBar", init_args=Namespace())
    trainer_config.callbacks = [*callbacks, bar]
