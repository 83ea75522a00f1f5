"""FSDP2 sharding for ESFT: every decoder layer then the rest, filled from rank 0 or from the files; merged saves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..dtensors import model_is_sharded
from ..experts.file_layout import SplitFileLayout
from ..experts.state import expert_shard
from ..files import atomic_write_dir
from ..models.discovery import decoder_layers
from ..weights.sharded_loading import fill_from_files
from ..weights.weight_files import WeightFiles
from .expert_parallel import has_expert_shards, merged_expert_tensors
from .strategy import check_tensor_parallel_size


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel sub-mesh of Lightning's (data_parallel, tensor_parallel) mesh; refuses TP > 1."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names:
        check_tensor_parallel_size(mesh["tensor_parallel"].size())
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_model(
    model: nn.Module,
    mesh: Any,
    bf16_compute: bool,
    fill_from_rank0: bool = False,
    files: WeightFiles | None = None,
    expert_mesh: Any = None,
) -> int:
    """``fully_shard`` every decoder layer, then the rest; frozen experts are sharded like everything else.

    With ``bf16_compute`` the layers run in bf16 while the sharded parameters stay in their own dtype, and
    gradients are reduced in fp32 (bf16 reduction would lose the small ESFT updates across ranks).

    ``fill_from_rank0``: only rank 0 holds real weights (the other ranks built the model on the meta
    device). Each layer is filled from rank 0 right after it is sharded and rank 0 then drops its unsharded
    tensors, so rank 0 never holds more than the loaded model plus one layer's shard, and the other ranks
    allocate only their shards.

    ``files``: every rank built the model on the meta device; once it is sharded each rank allocates its own
    shards and reads them from the safetensors files (``sharded_loading.fill_from_files``): no rank ever holds
    the whole model. Returns the parameter bytes this rank read from ``files`` (0 without).

    ``expert_mesh`` (expert parallelism, ``expert_parallel.expert_parallel_mesh``; the experts already
    localized): each layer's experts module is sharded on its own over the ``edp`` ranks holding the same
    experts, before the layer itself.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if bf16_compute:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    rank0 = fill_from_rank0 and dist.get_rank() == 0
    layers = list(decoder_layers(model))  # wherever the text decoder keeps them (VLMs included)
    for layer in layers:
        full = persistent_state(layer) if rank0 else {}  # references, taken before fully_shard replaces them
        if expert_mesh is not None:
            for experts in (m for m in layer.modules() if expert_shard(m) is not None):
                fully_shard(experts, mesh=expert_mesh["edp"], mp_policy=policy)
                # An owned expert's gradient already sums the tokens of every rank of its expert-parallel group:
                # divide by the whole world, as the other parameters' gradients are averaged over it.
                experts.set_gradient_divide_factor(float(mesh.size()))
                if dist.get_backend(expert_mesh["edp"].get_group()) != "nccl":
                    # A divide factor other than the group size reduce-scatters with NCCL's PREMUL_SUM, which
                    # gloo lacks: sum instead, then divide.
                    experts.set_force_sum_reduction_for_comms(True)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        if fill_from_rank0:
            _fill_from_rank0(layer, [layer], full, mesh.device_type)
        del full
    # The layers' parameters are DTensors now (filled above); what is left is the embeddings, norm, head.
    full = {k: v for k, v in persistent_state(model).items() if not isinstance(v, DTensor)} if rank0 else {}
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if fill_from_rank0:
        in_layers = {id(m) for layer in layers for m in layer.modules()}
        rest = [m for m in model.modules() if id(m) not in in_layers]
        _fill_from_rank0(model, rest, full, mesh.device_type)
        _broadcast_unsaved_buffers(model, mesh.device_type)
    if files is None:
        return 0
    return fill_from_files(model, files, _device(mesh.device_type), SplitFileLayout())


def persistent_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name: the tensors themselves, no copy, no state-dict hooks."""
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            state[prefix + name] = param.detach()
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer
    return state


def _fill_from_rank0(
    root: nn.Module, owned: list[nn.Module], full_state: dict[str, torch.Tensor], device_type: str
) -> None:
    """Broadcast rank 0's unsharded tensors (``full_state``; ``{}`` elsewhere) into every rank's shards of
    ``root``; ``owned`` are the modules whose tensors are still on the meta device on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = _device(device_type)
    if dist.get_rank() != 0:
        for module in owned:
            module.to_empty(device=device, recurse=False)  # allocates this rank's shards only
    # One tensor at a time (torch's broadcast_from_rank0), so no rank but 0 ever holds a whole layer.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(root, full_state, options=options)


def _broadcast_unsaved_buffers(model: nn.Module, device_type: str) -> None:
    """Non-persistent buffers (rotary tables, ESFT's expert-slot maps) are in no state dict: copy rank 0's."""
    device = _device(device_type)
    for module in model.modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if buffer is None:
                continue
            if dist.get_rank() == 0:
                value = buffer.to(device)
            else:
                value = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
            dist.broadcast(value, src=0)
            module._buffers[name] = value


def _device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


def save_pretrained_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """``save_pretrained`` of the whole model with the trained experts merged in, sharded (FSDP2) or not.

    With several processes every rank must call it (FSDP2 gathers the shards collectively); rank 0 writes,
    through a temp folder swapped in whole, so a crash never leaves a half-written model.
    """
    sharded = model_is_sharded(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # gathered on rank 0, via the merge hooks
        if has_expert_shards(model):  # each rank merged only its own experts: the whole layers, from every owner
            experts = merged_expert_tensors(model)
            state.update(experts if dist.get_rank() == 0 else {})
    path = Path(path)
    several = dist.is_available() and dist.is_initialized()  # FSDP2 or DDP: rank 0 writes for everyone
    if not several or dist.get_rank() == 0:
        if not sharded:
            state = model.state_dict()  # the hooks merge the trained rows on the host (rank 0 only: it writes)
        atomic_write_dir(path, lambda folder: model.save_pretrained(folder, state_dict=state))
    if several:
        dist.barrier()
    return path
