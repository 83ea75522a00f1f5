"""Checkpoints under expert parallelism: every owner's expert rows gathered on save, each rank's own kept on load.

Lightning's full-state checkpoints gather each DTensor over its mesh; an expert-parallel rank's experts are its own
(no mesh spans the owners), so every rank would write its rows under the same names and only rank 0's would
survive. Here the expert-parallel tensors and their AdamW state are gathered into the layer's rows
(``expert_parallel.globalize_expert_state``), so the file is the one a run without expert parallelism writes, and
resuming hands each rank its rows back (``localize_expert_state``). ``FSDP2Strategy`` calls these when the model
has expert shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import globalize_expert_state, localize_expert_state

__all__ = ["expert_parallel_model_state", "expert_parallel_optimizer_state", "load_expert_parallel_checkpoint"]


def expert_parallel_model_state(model: nn.Module, distributed_checkpoint: bool) -> dict[str, Any]:
    """The module state with every owner's rows (a collective); rank 0 gets it, the others ``{}``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _refuse_distributed(distributed_checkpoint)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = globalize_expert_state(model, state)
    if dist.get_rank() != 0:
        return {}
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in state.items()}


def expert_parallel_optimizer_state(model: nn.Module, optimizer: Any, distributed_checkpoint: bool) -> dict[str, Any]:
    """The optimizer state with every owner's rows, keyed by parameter index as Lightning saves it (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

    _refuse_distributed(distributed_checkpoint)
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # (a LightningOptimizer wraps it)
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    state["state"] = globalize_expert_state(model, state["state"])
    if dist.get_rank() != 0:
        return {}
    state["state"] = {
        k: {n: t.cpu() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in state["state"].items()
    }
    return FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, model)


def load_expert_parallel_checkpoint(
    model: nn.Module, optimizers: list[Any], path: Path, strict: bool
) -> dict[str, Any]:
    """Load a single-file checkpoint into an expert-parallel model and its optimizers; returns the rest of it.

    Every rank reads the file (memory-mapped, ``weights_only``: never unpickling code; by default it holds only
    the trainable tensors) and keeps its own experts' rows; everything is distributed into the rank's shards
    without a broadcast.
    """
    from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if path.is_dir():
        raise ValueError(f"{path}: a distributed checkpoint folder; expert parallelism resumes from a file")
    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, localize_expert_state(model, checkpoint.pop("state_dict")), options=options)
    for index, optimizer in enumerate(optimizers):
        saved = _rekey_optimizer_state_if_needed(checkpoint["optimizer_states"][index], model)
        saved = {**saved, "state": localize_expert_state(model, saved["state"])}
        set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=options)
    return checkpoint


def _refuse_distributed(distributed_checkpoint: bool) -> None:
    if distributed_checkpoint:
        raise ValueError(
            "save_distributed_checkpoint: true is not supported under expert parallelism yet; use false "
            "(one file holding the trainable tensors and their optimizer state, gathered from every owner)"
        )
