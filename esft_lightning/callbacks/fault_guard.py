"""NonFiniteLossGuard: stop a run on a NaN/inf loss before it reaches the weights, or skip that step."""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..dtensors import local_shard


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or a gradient) was NaN or infinite."""


class NonFiniteLossGuard(L.Callback):
    """Checks every optimizer step's loss and gradients before the optimizer uses them.

    Args:
        action: ``stop`` raises ``NonFiniteLossError`` naming the step, before the optimizer step, so the
            weights, the optimizer state and every checkpoint on disk stay as they were (resume from the
            last good one with ``--ckpt_path last``). ``skip`` drops that optimizer step instead (no weight
            or optimizer-state change; under gradient accumulation the whole accumulated step) and logs the
            running count as ``train/nonfinite_skipped``. A skipped step is not an optimizer step: the
            global step and the (step-interval) LR schedulers stay where they were, so ``max_steps`` counts
            steps that updated the weights, and a resumed run continues exactly.
        max_skips: with ``skip``, stop anyway after this many skipped steps (a run that diverged).

    Under data parallel every rank takes the same decision (a NaN on any rank counts for all).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int | None = 100) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        self.action, self.max_skips = action, max_skips
        self.skipped = 0
        self._bad_loss: float | None = None
        self._undo: list[Any] | None = None  # schedulers' and param groups' state before a skipped step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._bad_loss is None and not torch.isfinite(loss.detach()).all():
            self._bad_loss = float(loss.detach().float().mean())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad_grad = any(not torch.isfinite(local_shard(p.grad)).all() for p in params)
        bad = trainer.strategy.reduce_boolean_decision(self._bad_loss is not None or bad_grad, all=False)
        what = f"loss {self._bad_loss}" if self._bad_loss is not None else "a non-finite gradient"
        self._bad_loss = None
        if not bad:
            return
        where = f"at global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.action == "stop" or (self.max_skips is not None and self.skipped >= self.max_skips):
            ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise NonFiniteLossError(
                f"non-finite training loss {where} ({what} on some rank): stopped before the optimizer step, so "
                f"weights and checkpoints are unchanged; last checkpoint: {ckpt}"
                + (f"; {self.skipped} steps were skipped before" if self.skipped else "")
            )
        for p in params:
            p.grad = None  # optimizers skip parameters without gradients: no update, no state change
        # Lightning counts the step and steps the step-interval schedulers after this hook whatever happened;
        # remember their state (and their optimizers' lr, momentum, ...) so on_train_batch_end can take both back.
        # Epoch-interval schedulers are left alone: a skipped step still ends its epoch.
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step"]
        self._undo = [
            [(scheduler, copy.deepcopy(scheduler.state_dict())) for scheduler in schedulers],
            [
                (group, {k: copy.deepcopy(v) for k, v in group.items() if k != "params"})
                for scheduler in schedulers
                for group in scheduler.optimizer.param_groups
            ],
        ]
        self.skipped += 1
        rank_zero_warn(f"non-finite training loss {where} ({what}): optimizer step skipped ({self.skipped} so far)")
        for logger in trainer.loggers:
            logger.log_metrics({"train/nonfinite_skipped": float(self.skipped)}, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._undo is None:
            return
        schedulers, groups = self._undo
        self._undo = None
        loop = trainer.fit_loop.epoch_loop
        if not pl_module.automatic_optimization:  # the module steps its schedulers itself; Lightning counts steps
            _uncount(loop.manual_optimization.optim_step_progress)
            return
        for scheduler, state in schedulers:
            scheduler.load_state_dict(state)
        for group, values in groups:
            group.update(values)
        # The optimizer-step counter behind trainer.global_step (Lightning's loop progress, saved in checkpoints).
        _uncount(loop.automatic_optimization.optim_progress.optimizer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict.get("skipped", 0)


def _uncount(progress: Any) -> None:
    """Take one optimizer step back from a Lightning progress counter (total and current)."""
    for counter in (progress.total, progress.current):
        counter.ready -= 1
        counter.completed -= 1
