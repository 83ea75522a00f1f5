"""Many ranks: the FSDP2 strategy, sharding, expert parallelism and its checkpoints, generation, clipping, memory."""

from .expert_parallel import ExpertShard, expert_parallel_mesh, localize_experts
from .fsdp import save_pretrained_merged, shard_model
from .generation import sharded_generation
from .strategy import FSDP2Strategy, is_fsdp2

__all__ = [
    "ExpertShard",
    "FSDP2Strategy",
    "expert_parallel_mesh",
    "is_fsdp2",
    "localize_experts",
    "save_pretrained_merged",
    "shard_model",
    "sharded_generation",
]
