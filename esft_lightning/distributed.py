"""FSDP2 for ESFT: the strategy, sharding, one checkpoint read per run (rank 0) broadcast into the shards."""

from __future__ import annotations

import os
import resource
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from .dtensors import full_on_host, local_shard  # noqa: F401 (full_on_host re-exported from its old home)
from .models.discovery import decoder_layers
from .weight_files import WeightFiles


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with ESFT's defaults: every rank is a data-parallel (FSDP2) rank.

    ``data_parallel_size: auto`` means the whole world (nodes x devices), so one config means the same on 1
    or 8 GPUs. Tensor parallelism is refused: ESFTModule shards over the data-parallel mesh only, and
    nothing would keep tensor-parallel replicas in sync.

    ``expert_parallel_size: N`` (> 1): every MoE layer's routed experts are split by expert index over groups
    of N ranks (each rank keeps E/N whole experts, frozen and trained, and tokens travel to them by all-to-all:
    ``expert_parallel.py``); everything else stays FSDP2-sharded over all ranks. N must divide the world size
    and every layer's number of experts.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        check_tensor_parallel_size(tensor_parallel_size)
        if int(expert_parallel_size) < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {expert_parallel_size!r}")
        self.expert_parallel_size = int(expert_parallel_size)
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
        world = self.num_nodes * self.num_processes
        if world % self.expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size={self.expert_parallel_size} does not divide the {world} ranks "
                f"({self.num_nodes} node(s) x {self.num_processes} device(s))"
            )
        super().setup_environment()

    # -- checkpoints under expert parallelism (expert_checkpoints.py): the file a run without it writes --------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        from .expert_checkpoints import expert_parallel_model_state
        from .expert_parallel import has_expert_shards

        if not has_expert_shards(self.model):
            return super().lightning_module_state_dict()
        return expert_parallel_model_state(self.model, self._save_distributed_checkpoint)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from .expert_checkpoints import expert_parallel_optimizer_state
        from .expert_parallel import has_expert_shards

        if not has_expert_shards(self.model):
            return super().optimizer_state(optimizer)
        return expert_parallel_optimizer_state(self.model, optimizer, self._save_distributed_checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from .expert_checkpoints import load_expert_parallel_checkpoint
        from .expert_parallel import has_expert_shards

        if not has_expert_shards(self.model):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = Path(self.broadcast(checkpoint_path))
        strict = self.lightning_module.strict_loading
        return load_expert_parallel_checkpoint(self.model, self.optimizers, path, strict)


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
            for experts in (m for m in layer.modules() if hasattr(m, "esft_expert_shard")):
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
    from .sharded_loading import fill_from_files

    return fill_from_files(model, files, _device(mesh.device_type))


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
    from .files import atomic_write_dir

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # gathered on rank 0, via the merge hooks
        from .expert_parallel import has_expert_shards, merged_expert_tensors

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


def peak_host_bytes() -> int:
    """This process's peak resident host memory so far: Linux's VmHWM, else ru_maxrss (bytes on macOS).

    Not ru_maxrss on Linux: a process started by fork/vfork + exec inherits its parent's high-water mark there,
    so a rank launched by a large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
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


def clip_grad_norm_across_ranks(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients by their global norm when every rank holds a distinct part of them (FSDP2 shards, and under
    expert parallelism each rank's own experts); returns the norm. One all-reduce of a scalar.

    torch's ``clip_grad_norm_`` reduces DTensor gradients per device mesh and cannot combine the expert meshes
    of expert parallelism with the rest, so each rank would clip by a norm that misses the other ranks' experts.
    """
    grads = [local_shard(p.grad) for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        squares += grad.detach().float().pow(2).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares)
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's rule: never scale up
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total


def training_memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this process holds in parameters, gradients and optimizer state (local shards under FSDP)."""

    def local_bytes(t: torch.Tensor) -> int:
        return local_shard(t).numel() * t.element_size()

    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "param_bytes": sum(local_bytes(p) for p in model.parameters()),
        "grad_bytes": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer_state_bytes": sum(local_bytes(t) for t in state),
    }
