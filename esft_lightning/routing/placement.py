"""Where routing profiling runs: on the training GPU, streaming layer weights from host memory or from the files."""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..constants import PROFILING_HEADROOM
from ..weights.sharded_loading import on_meta
from ..weights.weight_files import WeightFiles, has_safetensors

Placement = Literal["auto", "move", "offload"]


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def fits_on(model: nn.Module, device: torch.device) -> bool:
    """Whether the whole model fits in ``device``'s free memory with headroom (always true off CUDA)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return model_bytes(model) <= PROFILING_HEADROOM * free


@contextmanager
def placed_for_profiling(
    model: nn.Module, device: torch.device, how: Placement = "auto", keep: bool = False
) -> Iterator[torch.device]:
    """Run the body with ``model`` able to compute on ``device``; yields the device inputs must go to.

    ``move`` moves the model there (and back afterwards unless ``keep``); ``offload`` leaves the weights in
    host memory and streams each module's weights to ``device`` for its forward (accelerate's
    ``cpu_offload`` hooks), so a model larger than the GPU can still be profiled on it; ``auto`` moves the
    model when it fits and offloads otherwise. A model already on ``device`` is left alone. A model built on
    the meta device (an FSDP2 rank that reads its shards from the files later) streams each module's weights
    from its safetensors files instead, whatever ``how`` says.
    """
    device = torch.device(device)
    if on_meta(model):
        with streamed_from_files(model, device) as where:
            yield where
        return
    current = next(model.parameters()).device
    same = current == device or (device.type == current.type and device.index is None)
    if same and how != "offload":
        yield current
        return
    if how == "auto":
        how = "move" if fits_on(model, device) else "offload"
    if how == "move":
        model.to(device)
        try:
            yield device
        finally:
            if not keep:
                model.to(current)
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    rank_zero_info(
        f"ESFT: the model ({model_bytes(model) / 2**30:.1f} GiB) does not fit on {device} next to its activations; "
        "profiling streams each layer's weights from host memory"
    )
    cpu_offload(model, execution_device=device)
    try:
        yield device
    finally:
        remove_hook_from_submodules(model)  # puts the weights back where they were


@contextmanager
def streamed_from_files(model: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Run the body with a meta-device model computing on ``device``, each module's weights read from the model
    directory's safetensors files for its forward and dropped after it (accelerate's offload hooks over
    ``WeightFiles``): one layer's weights in memory at a time, never the whole model."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    directory = getattr(model, "name_or_path", None)
    if not has_safetensors(directory):
        raise ValueError(
            f"the model's weights are not loaded (meta device) and {directory!r} holds no safetensors files to "
            "stream them from for profiling"
        )
    if device.type == "meta":
        device = torch.device("cpu")
    rank_zero_info(f"ESFT: profiling streams each layer's weights from the safetensors files in {directory}")
    # The hooks put every tensor back from this map when they are removed: buffers (in no file) included.
    buffers = {name: b for name, b in model.named_buffers() if not b.is_meta}
    cpu_offload(model, execution_device=device, state_dict=ChainMap(buffers, WeightFiles(directory, model)))
    try:
        yield device
    finally:
        remove_hook_from_submodules(model)  # the weights go back to the meta device
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # the hooks replaced tied parameters one module at a time
