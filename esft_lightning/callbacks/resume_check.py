"""ResumeCheck: save the RNG states with every checkpoint, restore them on resume, and say what a resume restored."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

RNG_KEY = "esft_rng_states"  # checkpoint entry: one dict of RNG states per rank


class ResumeCheck(L.Callback):
    """Checkpoints also hold every rank's RNG states (torch, CUDA, numpy, Python), which Lightning does not save;
    a resumed fit restores them, then logs whether the data position, the RNG states, the optimizer state and the
    LR schedulers were all restored, warning by name about each one that was not.

    The RNG states are set at the first resumed batch's start, after the resumed run has created its data
    iterator (a torch DataLoader draws its base seed from the global RNG when an iterator is made: the killed
    run made none there in mid-epoch). Put this callback first, as ``esft fit`` does, so that no other
    callback draws before it. ``esft fit`` adds it to every run (a run must save the states for a later
    resume to restore them). States are stored as plain tensors and lists, so checkpoints still load with
    ``weights_only=True``.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = _rng_states()
        if dist.is_available() and dist.is_initialized():  # every rank dumps the checkpoint; rank 0 writes it
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            checkpoint[RNG_KEY] = gathered
        else:
            checkpoint[RNG_KEY] = [states]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loaded = {
            "rng": checkpoint.get(RNG_KEY),
            "data": bool(loop.get("state_dict", {}).get("combined_loader")),
            "optimizer": checkpoint.get("optimizer_states") or [],
            "schedulers": checkpoint.get("lr_schedulers") or [],
            "global_step": checkpoint.get("global_step"),
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is None:
            return  # a fresh run
        loaded, self._loaded = self._loaded, None
        restored, missing = [], []
        ranks = loaded["rng"]
        if ranks and len(ranks) != trainer.world_size:
            self._rng_to_restore = ranks[min(trainer.global_rank, len(ranks) - 1)]
            missing.append(f"RNG states: saved by {len(ranks)} ranks, this run has {trainer.world_size}")
        elif ranks:
            self._rng_to_restore = ranks[trainer.global_rank]
            restored.append("RNG states (" + ", ".join(sorted(ranks[0])) + ")")
        else:
            missing.append("RNG states: the checkpoint holds none (written without ResumeCheck); random draws differ")
        loaders = _train_loaders(trainer)
        if loaded["data"] and loaders and all(hasattr(loader, "load_state_dict") for loader in loaders):
            restored.append("data position")
        else:
            missing.append(
                "data position: the train dataloader keeps no state (a plain DataLoader restarts its epoch); use "
                "torchdata's StatefulDataLoader, as ESFTDataModule does"
            )
        optimizers = trainer.optimizers
        if loaded["optimizer"] and len(loaded["optimizer"]) == len(optimizers) and all(o.state for o in optimizers):
            restored.append("optimizer state")
        elif optimizers:
            missing.append("optimizer state: the checkpoint holds none for this run's optimizer (moments start at 0)")
        configs = trainer.lr_scheduler_configs
        if configs and len(loaded["schedulers"]) == len(configs):
            saved = [state.get("last_epoch") for state in loaded["schedulers"]]
            if saved == [config.scheduler.last_epoch for config in configs]:
                restored.append(f"LR schedulers (at step {saved[0]})")
            else:
                missing.append(f"LR schedulers: saved at {saved}, now at {[c.scheduler.last_epoch for c in configs]}")
        elif configs:
            missing.append("LR schedulers: the checkpoint holds no scheduler state for this run's schedulers")
        rank_zero_info(
            f"ESFT resume check at global step {trainer.global_step}: restored "
            + (", ".join(restored) or "nothing")
            + ("" if missing else "; resumed exactly")
        )
        for what in missing:
            rank_zero_warn(f"ESFT resume check: not restored: {what}")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def _rng_states() -> dict[str, Any]:
    mt_name, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [mt_name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": [version, list(python_state), python_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    mt_name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((mt_name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _train_loaders(trainer: L.Trainer) -> list[Any]:
    combined = trainer.fit_loop._combined_loader  # Lightning's wrapper of the train dataloader(s), set up by now
    return list(combined.flattened) if combined is not None else []
