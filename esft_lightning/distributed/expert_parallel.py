"""Expert parallelism: each rank keeps whole experts of every MoE layer; tokens travel to them by all-to-all.

``localize_experts`` installs ``dispatch_combine`` as the experts module's dispatcher (``ExpertsState.dispatch``):
the ``esft`` forward calls whatever dispatcher a module holds, so it never imports this module.

Shape legend (as in ``experts.forward``): T tokens, D hidden size, K experts per token, P token-expert pairs
(T x K, flattened), E experts of the layer, S ranks of the expert-parallel group, C experts per rank (E / S),
R pairs received from the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dtensors import full_on_host
from ..experts.fp8 import is_fp8_frozen
from ..experts.split import install_split, remove_expert_split, use_esft_implementation
from ..experts.state import (
    EXPERT_IDS,
    TRAINED_PREFIX,
    ExpertsForward,
    expert_config_of,
    expert_param_names,
    expert_shard,
    experts_state,
    has_split,
    set_expert_config,
)
from ..models import find_moe_layers
from ..weights.fp8_blocks import SCALE_SUFFIX, dequantize_experts

__all__ = [
    "ExpertShard",
    "dispatch_combine",
    "expert_parallel_mesh",
    "gather_expert_rows",
    "globalize_expert_state",
    "has_expert_shards",
    "localize_expert_state",
    "localize_experts",
    "merged_expert_tensors",
    "routed_expert_bytes",
]


@dataclass(frozen=True)
class ExpertShard:
    """Which experts of a layer this rank owns: global experts ``first .. first + count - 1`` of ``num_experts``."""

    group: Any  # the expert-parallel process group (the ranks that split this layer's experts)
    rank: int
    size: int
    num_experts: int
    first: int
    count: int
    selected: tuple[int, ...]  # the layer's selected experts, global ids in selection order (the adapter's order)


def expert_parallel_mesh(device_type: str, world_size: int, expert_parallel_size: int) -> Any:
    """A (``edp``, ``ep``) device mesh: experts split over ``ep`` ranks, each split replicated ``edp`` times.

    Ranks ``0..ep-1`` form the first expert-parallel group, and so on; the experts' own FSDP2 sharding (and
    gradient reduction) runs over ``edp``, the ranks that hold the same experts.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % expert_parallel_size:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} does not divide the {world_size} ranks "
            "(nodes x devices): choose a divisor of the world size"
        )
    shape = (world_size // expert_parallel_size, expert_parallel_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=("edp", "ep"))


def localize_experts(model: nn.Module, mesh: Any) -> int:
    """Keep only this rank's experts in every MoE layer and route tokens to their owners in the forward.

    Works on a meta-device model (before its shards are read from the files) or a real one. Each experts module
    keeps rows ``first .. first + E/ep`` of its fused tensors and the trainable copies of the selected experts
    among them (the others' copies live on their owners), renumbered locally; ``num_experts`` becomes the local
    count and the module's ``ExpertShard`` (``expert_shard``) records the global picture. Returns the number of
    MoE layers localized. Raises ``ValueError`` naming the layer when its experts do not split evenly.
    """
    group, size, rank = mesh["ep"].get_group(), mesh["ep"].size(), mesh["ep"].get_local_rank()
    config = expert_config_of(model)
    layers = find_moe_layers(model)
    dtypes, frozen_fp8 = {}, set()
    for layer in layers:
        experts = layer.experts
        if has_split(experts):
            dtypes[layer.index] = getattr(experts, TRAINED_PREFIX + expert_param_names(experts)[0]).dtype
        if is_fp8_frozen(experts, expert_param_names(experts)[0]):
            frozen_fp8.add(layer.index)
    remove_expert_split(model)  # back to fused tensors only (folds nothing new on a fresh model)
    for layer in layers:
        experts, total = layer.experts, layer.num_experts
        if total % size:
            raise ValueError(
                f"layer {layer.index} has {total} routed experts, which {size} expert-parallel ranks cannot split "
                "evenly: choose an expert_parallel_size that divides the number of experts"
            )
        count = total // size
        first = rank * count
        for name in expert_param_names(experts):
            full = getattr(experts, name)
            local = nn.Parameter(full.detach()[first : first + count].clone(), requires_grad=full.requires_grad)
            setattr(experts, name, local)
        experts.num_experts = count
        selected = tuple(config.experts.get(layer.index, [])) if config is not None else ()
        mine = [e - first for e in selected if first <= e < first + count]
        if layer.index in dtypes:
            # Even with none of the layer's selected experts here: a zero-row trainable copy keeps every rank's
            # optimizer and parameter structure the same (an owner of frozen experts only still has parameters).
            install_split(experts, mine, dtypes[layer.index], frozen_fp8=layer.index in frozen_fp8)
        state = experts_state(experts, create=True)
        state.shard = ExpertShard(group, rank, size, total, first, count, selected)
        state.dispatch = dispatch_combine  # the esft forward sends pairs through it
    if config is not None:
        set_expert_config(model, config)  # (remove_expert_split dropped it with the global copies)
    use_esft_implementation(model)  # the esft forward sends pairs to their owners when a module is localized
    return len(layers)


def routed_expert_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the fused routed-expert tensors this rank holds, bytes of all of them in the model)."""
    local = total = 0
    for layer in find_moe_layers(model):
        shard = expert_shard(layer.experts)
        for name in expert_param_names(layer.experts):
            param = getattr(layer.experts, name)
            size = param.numel() * param.element_size()
            local += size
            total += size if shard is None else size // shard.count * shard.num_experts
    return local, total


def dispatch_combine(
    experts: nn.Module,
    hidden_TD: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
    local_forward: ExpertsForward,
) -> torch.Tensor:
    """The experts forward under expert parallelism.

    Token-expert pairs are sorted by expert (so by owner), sent to their owners with one differentiable
    ``all_to_all_single``, run there through ``local_forward`` (the frozen / trained split forward, one pair a
    row), sent back the same way and combined by routing weight. Every rank enters the same collectives in the
    same order whether it sent or received any token (empty splits are fine), in backward too (see below).
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    shard: ExpertShard = expert_shard(experts)
    num_tokens, top_k = top_k_index_TK.shape
    ids_P = top_k_index_TK.reshape(-1)
    order_P = torch.argsort(ids_P, stable=True)
    pairs_per_expert_E = torch.bincount(ids_P, minlength=shard.num_experts)
    # Each owner learns how many pairs of each of its experts every rank sends (not differentiable).
    received_SC = torch.empty_like(pairs_per_expert_E)
    dist.all_to_all_single(received_SC, pairs_per_expert_E, group=shard.group)
    received_SC = received_SC.view(shard.size, shard.count)
    # The one host sync per layer: all_to_all needs the split sizes as Python ints.
    sizes = torch.cat([pairs_per_expert_E.view(shard.size, shard.count).sum(1), received_SC.sum(1)]).tolist()
    send_sizes, receive_sizes = sizes[: shard.size], sizes[shard.size :]
    x_sent = hidden_TD.index_select(0, order_P // top_k)
    # torch's differentiable all-to-all: its backward sends the gradients back along the same splits.
    x_received = all_to_all_single_autograd(x_sent, receive_sizes, send_sizes, shard.group)
    local_experts = torch.arange(shard.count, device=hidden_TD.device).repeat(shard.size)
    local_ids_R = torch.repeat_interleave(local_experts, received_SC.reshape(-1))
    ones_R1 = torch.ones((local_ids_R.numel(), 1), dtype=top_k_weights_TK.dtype, device=hidden_TD.device)
    if x_received.shape[0]:
        y_received = local_forward(experts, x_received, local_ids_R.unsqueeze(1), ones_R1)
    else:  # nothing came here; stay in the graph, so backward enters the first all-to-all like every rank
        y_received = x_received * 0
    if torch.is_grad_enabled():
        # Whether the return all-to-all needs a gradient must not depend on which experts a rank owns: a rank
        # whose experts are all frozen (or that received nothing) would otherwise skip the backward all-to-all
        # that a rank owning a trained expert enters, and both would wait forever.
        y_received = y_received + torch.zeros((), dtype=y_received.dtype, device=y_received.device, requires_grad=True)
    y_sent = all_to_all_single_autograd(y_received, send_sizes, receive_sizes, shard.group)
    weights_P1 = top_k_weights_TK.reshape(-1).index_select(0, order_P).unsqueeze(1)
    dtype = torch.float32 if hidden_TD.dtype in (torch.bfloat16, torch.float16) else hidden_TD.dtype
    out_TD = torch.zeros((num_tokens, hidden_TD.shape[1]), dtype=dtype, device=hidden_TD.device)
    out_TD.index_add_(0, order_P // top_k, (y_sent * weights_P1).to(dtype))
    return out_TD.to(hidden_TD.dtype)


def gather_expert_rows(experts: nn.Module, name: str, local: torch.Tensor) -> torch.Tensor:
    """The rows of ``name`` for the layer's selected experts in selection order, gathered from their owners.

    ``name`` is a trainable copy (``esft_<proj>``: this rank holds its own selected experts' rows) or a fused
    tensor (this rank holds all its experts' rows). A collective over the expert-parallel group: every rank calls
    it, for every layer, in the same order. Returns a CPU tensor.
    """
    shard: ExpertShard = expert_shard(experts)
    local = local.detach().cpu()
    parts: list[Any] = [None] * shard.size
    dist.all_gather_object(parts, local, group=shard.group)  # small tensors (trained rows), pickled over gloo/nccl
    if name.startswith(TRAINED_PREFIX):
        rows = {}
        for owner, part in enumerate(parts):
            mine = [e for e in shard.selected if owner * shard.count <= e < (owner + 1) * shard.count]
            rows.update({e: part[i] for i, e in enumerate(mine)})
        return torch.stack([rows[e] for e in shard.selected])
    return torch.cat(parts)


def has_expert_shards(model: nn.Module) -> bool:
    """Whether any experts module of ``model`` is split over expert-parallel ranks."""
    return any(expert_shard(m) is not None for m in model.modules())


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str, ExpertShard | None]:
    module_name, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        return root, leaf, None
    return module, leaf, expert_shard(module)


def globalize_expert_state(root: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A state (parameters, or an optimizer state per parameter name) with each expert-parallel tensor replaced
    by the whole layer's rows gathered from their owners (trainable copies in selection order, fused tensors
    all experts): what a checkpoint holds, the same whatever the expert parallelism. Every rank calls it."""
    out = dict(state)
    for name in sorted(state):  # the same collectives in the same order on every rank
        module, leaf, shard = _owner(root, name)
        if shard is None:
            continue
        value = state[name]
        if isinstance(value, dict):  # an optimizer state: its per-row tensors (exp_avg, ...), not the step count
            out[name] = {
                k: gather_expert_rows(module, leaf, v) if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in sorted(value.items())
            }
        elif torch.is_tensor(value):
            out[name] = gather_expert_rows(module, leaf, value)
    return out


def localize_expert_state(root: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``globalize_expert_state``: this rank's rows of each expert-parallel tensor."""
    out = dict(state)
    for name, value in state.items():
        module, leaf, shard = _owner(root, name)
        if shard is None:
            continue
        if leaf.startswith(TRAINED_PREFIX):
            rows = [shard.selected.index(shard.first + int(i)) for i in getattr(module, EXPERT_IDS).tolist()]
        else:
            rows = list(range(shard.first, shard.first + shard.count))

        def mine(t: Any, rows: list[int] = rows) -> Any:
            return t[rows] if torch.is_tensor(t) and t.dim() > 0 else t

        out[name] = {k: mine(v) for k, v in value.items()} if isinstance(value, dict) else mine(value)
    return out


def merged_expert_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert-parallel fused tensor of ``model`` whole, trained rows merged in, keyed by its name: what a
    merged ``save_pretrained`` writes in place of each rank's own rows. A collective (every rank calls it);
    CPU tensors."""
    out = {}
    for module_name, module in model.named_modules():
        if expert_shard(module) is None:
            continue
        for name in expert_param_names(module):
            rows = full_on_host(getattr(module, name), copy=True)
            if is_fp8_frozen(module, name):  # 8-bit frozen experts: merged in the model's own dtype
                scale = full_on_host(getattr(module, name + SCALE_SUFFIX))
                rows = dequantize_experts(rows, scale, experts_state(module).split.frozen_dtype)
            trained = getattr(module, TRAINED_PREFIX + name, None)
            if trained is not None:
                rows[getattr(module, EXPERT_IDS).cpu()] = full_on_host(trained).to(rows.dtype)
            out[f"{module_name}.{name}"] = gather_expert_rows(module, name, rows)
    return out
