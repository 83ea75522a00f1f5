"""`esft fit`'s configuration parsed without building anything: the arguments `plan`, `profile` and `select` share."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import ESFTDataModule
from ..module import ESFTModule
from ..planning.plan import PlanOptions

__all__ = ["FitArgumentsCLI", "parse_config"]


class FitArgumentsCLI(LightningCLI):
    """LightningCLI over ESFTModule / ESFTDataModule with the memory check's options (``--plan.*``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_class_arguments(PlanOptions, "plan", instantiate=False)


class _ParsedOnly(FitArgumentsCLI):
    """The parsed config (defaults, files, overrides) with nothing instantiated: no Trainer for N GPUs on a machine
    without them, no tokenizer, no model."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str]) -> Any:
    """`esft fit`'s configuration (a jsonargparse Namespace: trainer, model, data, plan) parsed, not instantiated."""
    return _ParsedOnly(ESFTModule, ESFTDataModule, args=args, run=False, parser_kwargs={"default_env": False}).config
