"""The FSDP2 strategy (FSDP2 + optional expert parallelism) and DDP's settings for ESFT."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from .expert_checkpoints import (
    expert_parallel_model_state,
    expert_parallel_optimizer_state,
    load_expert_parallel_checkpoint,
)
from .expert_parallel import has_expert_shards


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
        if not has_expert_shards(self.model):
            return super().lightning_module_state_dict()
        return expert_parallel_model_state(self.model, self._save_distributed_checkpoint)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if not has_expert_shards(self.model):
            return super().optimizer_state(optimizer)
        return expert_parallel_optimizer_state(self.model, optimizer, self._save_distributed_checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
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
