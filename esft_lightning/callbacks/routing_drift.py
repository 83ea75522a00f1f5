"""RoutingDriftCallback: how far training moved routing (JS divergence of token scores) on task and general data."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..data.sources import Source
from ..routing.profile import profile_routing
from .context import as_sources, moe_model, profiling_batches


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats, 0 to ln 2) of two distributions over the same experts."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        nonzero = a > 0
        return (a[nonzero] * (a[nonzero] / m[nonzero]).log()).sum()

    return float(max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))


def layer_drift(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer: JS divergence of ``after``'s scores from ``before``'s."""
    return {layer: js_divergence(before[layer], after[layer]) for layer in before}


def has_general_data(datamodule: L.LightningDataModule) -> bool:
    """Whether the datamodule mixes in general data (sources given and ``general_ratio`` > 0)."""
    return (
        bool(getattr(datamodule, "general", None))
        and getattr(datamodule, "general_ratio", 0) > 0
        and hasattr(datamodule, "train_sequences")
    )


class RoutingDriftCallback(L.Callback):
    """Profiles token scores on task and general data at fit start, and at each validation end logs how far
    the current scores drifted: ``drift/<data>/js_layer<l>`` per MoE layer and ``drift/<data>/js_mean``
    (Jensen-Shannon divergence in nats, 0 = unchanged, ln 2 = disjoint) for ``<data>`` in task, general.

    Args:
        max_tokens: non-padding tokens profiled per data kind and evaluation (same sequences every time).
        batch_size: profiling batch size (default: the datamodule's).
        general: also measure on general data (needs ``data.general``).
        model_attr: the attribute (dotted path) of the LightningModule holding the model, when it holds several.
        profile_data: task data when the datamodule has no ``task_dataloader()`` (see ``ExpertSelectionCallback``);
            without it, the Trainer's train dataloader.

    Under several ranks every rank profiles its share and the sums are all-reduced (``profile_routing``).
    """

    def __init__(
        self,
        max_tokens: int | None = 8192,
        batch_size: int | None = None,
        general: bool = True,
        model_attr: str | None = None,
        profile_data: list[Source | str] | None = None,
    ) -> None:
        self.max_tokens, self.batch_size, self.general = max_tokens, batch_size, general
        self.model_attr, self.profile_data = model_attr, as_sources(profile_data)
        self.reference: dict[str, dict[int, torch.Tensor]] = {}
        self.history: list[dict[str, float]] = []
        self._warned = False
        self._task: Any = None  # the task batches: the same ones at every reading

    def _profiles(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[int, torch.Tensor]]:
        dm = trainer.datamodule
        world = trainer.world_size
        budget = None if self.max_tokens is None else -(-self.max_tokens // world)
        if self._task is None:
            self._task = profiling_batches(
                trainer, pl_module, "RoutingDriftCallback", self.batch_size, profile_data=self.profile_data
            )
            if not hasattr(dm, "task_dataloader"):  # a train dataloader may shuffle: keep the first batches read
                self._task = _first_batches(self._task, budget)
        loaders = {"task": self._task}
        if self.general and has_general_data(dm):
            loaders["general"] = dm.general_dataloader(self.batch_size)
        elif self.general and not self._warned:
            rank_zero_warn("RoutingDriftCallback: no general data (data.general, general_ratio > 0): task drift only")
            self._warned = True
        model = moe_model(pl_module, self.model_attr)
        return {
            kind: profile_routing(model, loader, max_tokens=budget, progress=False).token_scores
            for kind, loader in loaders.items()
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._task = None
        self.reference = self._profiles(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.reference:
            return
        metrics: dict[str, float] = {}
        for kind, scores in self._profiles(trainer, pl_module).items():
            per_layer = layer_drift(self.reference[kind], scores)
            metrics.update({f"drift/{kind}/js_layer{layer}": v for layer, v in per_layer.items()})
            metrics[f"drift/{kind}/js_mean"] = sum(per_layer.values()) / len(per_layer) if per_layer else math.nan
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, **metrics})


def _first_batches(batches: Any, max_tokens: int | None) -> list[Any]:
    """The batches until ``max_tokens`` non-padding tokens (all with None), kept so every reading sees the same."""
    kept, tokens = [], 0
    for batch in batches:
        kept.append(batch)
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if max_tokens is not None and tokens >= max_tokens:
            break
    return kept
