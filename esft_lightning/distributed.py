"""FSDP2 for ESFT: the strategy, sharding, one checkpoint read per run (rank 0) broadcast into the shards."""

from __future__ import annotations

import resource
import sys
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with ESFT's defaults: every rank is a data-parallel (FSDP2) rank.

    ``data_parallel_size: auto`` means the whole world (nodes x devices), so one config means the same on 1
    or 8 GPUs. Tensor parallelism is refused: ESFTModule shards over the data-parallel mesh only, and
    nothing would keep tensor-parallel replicas in sync.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        check_tensor_parallel_size(tensor_parallel_size)
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def check_tensor_parallel_size(size: Any) -> None:
    """Refuse tensor parallelism (ESFTModule shards over data-parallel ranks only)."""
    if size not in (1, "1"):
        raise ValueError(
            f"tensor_parallel_size={size!r} is not supported: ESFTModule shards the model over data-parallel ranks "
            "only (FSDP2) and would never sync tensor-parallel replicas. Use tensor_parallel_size: 1 and "
            "data_parallel_size: auto (every GPU a data-parallel rank)."
        )


def is_fsdp2(strategy: Strategy | None) -> bool:
    """Whether ``strategy`` shards the model with FSDP2 in ``configure_model`` (Lightning's ModelParallelStrategy)."""
    return isinstance(strategy, ModelParallelStrategy)


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel sub-mesh of Lightning's (data_parallel, tensor_parallel) mesh; refuses TP > 1."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names:
        check_tensor_parallel_size(mesh["tensor_parallel"].size())
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_model(model: nn.Module, mesh: Any, bf16_compute: bool) -> None:
    """``fully_shard`` every decoder layer, then the rest; frozen experts are sharded like everything else.

    With ``bf16_compute`` the layers run in bf16 while the sharded parameters stay in their own dtype, and
    gradients are reduced in fp32 (bf16 reduction would lose the small ESFT updates across ranks).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if bf16_compute:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


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


def broadcast_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill a sharded model whose ranks other than 0 were built on the meta device, from rank 0's tensors.

    ``full_state`` (rank 0 only; ``{}`` elsewhere) holds rank 0's unsharded tensors, taken before sharding.
    Other ranks allocate only their shards (``to_empty``); tensors cross one at a time, so no rank ever
    holds the whole model but rank 0. Non-persistent buffers (rotary tables, ESFT's expert-slot maps) are
    not in a state dict and are broadcast separately.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state, options=options)
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


def peak_host_bytes() -> int:
    """This process's peak resident host memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_host_bytes() -> int:
    """This process's resident host memory now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_host_bytes()


def allow_unused_experts_under_ddp(strategy: Strategy) -> None:
    """DDP raises when a parameter gets no gradient; a selected expert that no token of a micro-batch
    reaches gets none. Turn on ``find_unused_parameters`` (with a note) rather than fail mid-run."""
    if not isinstance(strategy, DDPStrategy):
        return
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if kwargs is None or kwargs.get("find_unused_parameters"):
        return
    kwargs["find_unused_parameters"] = True
    rank_zero_info(
        "ESFT: DDP runs with find_unused_parameters=True (a selected expert may get no token in a micro-batch). "
        "DDP keeps a full model copy per GPU: for large models use configs/fsdp.yaml (FSDP2) instead."
    )
