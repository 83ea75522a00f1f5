"""Memory per GPU from a model's config alone: weights, trainable copies, gradients, AdamW state, activations.

The model is built on the meta device (no weights read or allocated), the expert selection is applied to it with
esft_lightning's own functions, and every byte count follows from the tensors' shapes and dtypes and from how each
strategy places them: FSDP2 shards every parameter on dim 0 over the world (``torch.chunk``: the first ranks hold
the larger chunks), DDP keeps a full copy per rank, expert parallelism (``expert_parallel_size`` N) keeps E/N whole
routed experts per rank and the trainable copies of the selected ones on their owners. Weights, gradients and
optimizer state are exact for a given selection; activations are an estimate (see ``activation_bytes``).
``esft plan`` prints it; ``esft fit`` checks it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..constants import TRAINING_HEADROOM
from ..experts.state import expert_config_of
from ..models import find_moe_layers
from ..optimizers import DEFAULT_CHUNK_BYTES, HostOffloadAdamW
from ..pipeline import apply, trainable_dtype
from ..selection.rules import ExpertConfig, all_experts, no_experts
from ..selection.spec import SelectionSpec
from ..weights.loading import load_model
from .memory_model import TensorBytes, activation_bytes, profiling_bytes, tensor_bytes

__all__ = [
    "DEVICES", "Plan", "PlanOptions", "PlanRequest", "RankMemory", "activation_bytes", "build_meta_model",
    "parse_bytes", "plan_memory", "selection_bound", "usable",
]  # fmt: skip

GiB = 2**30
DEVICES = {"H100-80GB": 81559 * 2**20, "H200-141GB": 143771 * 2**20, "A100-80GB": 81920 * 2**20}
"""Device memory as ``torch.cuda.get_device_properties().total_memory`` reports it."""
STRATEGIES = ("fsdp2", "ddp", "single")
HOST_OFFLOAD_ADAMW = f"{HostOffloadAdamW.__module__.rsplit('.', 1)[0]}.{HostOffloadAdamW.__name__}"
"""The optimizer's class path in a config (its package's public name)."""


@dataclass
class PlanOptions:
    """``esft fit``'s memory check (``--plan.*``), run before anything is loaded."""

    check: bool = True
    """Plan at start-up on GPU (or wherever ``device_memory`` is given) and refuse a run that cannot fit."""
    strict: bool = True
    """``false``: a run that does not fit is only warned about."""
    device_memory: int | float | str | None = None
    """Bytes per device to plan against (``80GiB``, ``141GB``, ``H100-80GB``, a number of bytes); default: the
    GPU's own memory, and no check on CPU."""


@dataclass
class PlanRequest:
    """What a run does with the model: how many ranks, which strategy, what a micro-batch is, which selection."""

    world_size: int = 1
    strategy: str = "fsdp2"
    """``fsdp2`` (every parameter sharded on dim 0), ``ddp`` (a full copy per rank) or ``single`` (one device)."""
    micro_batch: int = 1
    seq_length: int = 2048
    activation_checkpointing: bool = False
    compute_dtype: torch.dtype | None = None
    """dtype activations are computed in (``fsdp_bf16``, autocast); None: the model's."""
    spec: SelectionSpec = field(default_factory=SelectionSpec)
    expert_config: ExpertConfig | None = None
    """The selection, exact; None: ``spec.expert_config``'s file, else a bound from ``spec`` (``selection_bound``)."""
    profile_batch: int | None = None
    device_memory: int | None = None
    devices_per_node: int = 8
    expert_parallel_size: int = 1
    """``fsdp2`` with N > 1 (``FSDP2Strategy(expert_parallel_size=N)``): every MoE layer's routed experts split
    over N ranks (E/N whole experts each, FSDP2-sharded over the world / N ranks holding the same ones), the rest
    FSDP2 over the world: the ``esft_ep`` / ``fft_ep`` scenarios, and ``per_rank`` is ``esft_ep``."""
    optimizer_on_host: bool = False
    """AdamW's estimates in host memory (``optimizers.HostOffloadAdamW``): on the GPU only two chunks of them
    during the step, each of ``optimizer_chunk_bytes``."""
    optimizer_chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.expert_parallel_size > 1 and (self.strategy != "fsdp2" or self.world_size % self.expert_parallel_size):
            raise ValueError(
                f"expert_parallel_size={self.expert_parallel_size} needs the fsdp2 strategy and a world size it "
                f"divides (got {self.strategy}, {self.world_size} ranks)"
            )


@dataclass
class RankMemory:
    """Bytes one rank holds (the largest rank under FSDP2). ``params_bytes`` counts trainable copies too."""

    params_bytes: int
    trainable_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    """On the device: the AdamW state, or with it in host memory the two chunks a step brings over."""
    host_optimizer_bytes: int
    """AdamW state kept in host memory instead (``optimizer_on_host``); not part of ``total_bytes``."""
    activations_bytes: int
    """For the request's ``activation_checkpointing``; the two settings are also given apart below."""
    activations_no_checkpointing_bytes: int
    activations_checkpointing_bytes: int
    comm_bytes: int
    """FSDP2: the unsharded root group plus two layers gathered (prefetch) and one layer's unsharded gradients;
    DDP: its gradient buckets (a second copy of the gradients); expert parallelism: as FSDP2, but a gathered layer
    holds only this rank's own experts, plus one layer's all-to-all send and receive buffers."""
    total_bytes: int


@dataclass
class Plan:
    """``plan_memory``'s answer: per-rank bytes for the request and side by side (ESFT and full fine-tuning under
    FSDP2 and DDP), whether it fits, and the cheapest fix when it does not."""

    request: PlanRequest
    model_type: str
    total_params: int
    selection: dict[str, Any]
    per_rank: RankMemory
    scenarios: dict[str, RankMemory]
    by_rank: list[dict[str, int]]
    profiling_bytes: int
    fits: bool | None
    fixes: list[str]

    @property
    def shortfall_bytes(self) -> int:
        """Bytes over the usable device memory (0 when it fits or the device is unknown)."""
        if self.request.device_memory is None:
            return 0
        return max(0, max(self.per_rank.total_bytes, self.profiling_bytes) - usable(self.request.device_memory))

    def to_dict(self) -> dict[str, Any]:
        """One JSON-ready object (``esft plan --json``)."""
        r = self.request
        return {
            "model_type": self.model_type, "total_params": self.total_params, "strategy": r.strategy,
            "world_size": r.world_size, "micro_batch": r.micro_batch, "seq_length": r.seq_length,
            "activation_checkpointing": r.activation_checkpointing,
            "compute_dtype": str(r.compute_dtype) if r.compute_dtype else None,
            "selection": self.selection, "per_rank": asdict(self.per_rank),
            "scenarios": {k: asdict(v) for k, v in self.scenarios.items()}, "by_rank": self.by_rank,
            "profiling_bytes": self.profiling_bytes, "device_memory_bytes": r.device_memory,
            "usable_device_bytes": None if r.device_memory is None else usable(r.device_memory),
            "fits": self.fits, "shortfall_bytes": self.shortfall_bytes, "fixes": self.fixes,
        }  # fmt: skip


def usable(device_memory: int) -> int:
    return int(device_memory * TRAINING_HEADROOM)


def parse_bytes(value: int | float | str | None) -> int | None:
    """``80GiB`` / ``141GB`` / ``512MiB`` / ``H100-80GB`` / a number -> bytes (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    named = {k.lower(): v for k, v in DEVICES.items()} | {k.split("-")[0].lower(): v for k, v in DEVICES.items()}
    if value.strip().lower() in named:
        return named[value.strip().lower()]
    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([kmgt]i?b?|b)?\s*", value, re.IGNORECASE)
    if not match:
        raise ValueError(f"device memory {value!r}: expected bytes, a size such as 80GiB or 141GB, or {list(DEVICES)}")
    unit = (match.group(2) or "b").lower().rstrip("b") or "b"
    scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(float(match.group(1)) * scale[unit])


def build_meta_model(**load_args: Any) -> nn.Module:
    """The run's model on the meta device: ``models.loading.load_model(..., on_meta=True)`` (config.json only)."""

    return load_model(**{**load_args, "on_meta": True})


def selection_bound(model: nn.Module, spec: SelectionSpec) -> tuple[ExpertConfig, str]:
    """The largest selection ``spec`` can make on ``model`` without profiling, and what kind of number it gives.

    ESFT-Token's scores of a layer sum to 1, so its top-p selection never needs more than ceil(p x E) experts (the
    top k experts hold at least k/E of the mass): a bound. ESFT-Gate's scores sum to the mean top-K affinity mass,
    not 1: the same count is only an estimate there. ``all`` and ``none`` are exact.
    """
    num_experts = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
    flags = spec.flags
    if spec.score_function == "all":
        return all_experts(num_experts, **flags), "exact"
    if spec.score_function == "none":
        return no_experts(num_experts, **flags), "exact"
    experts = {i: list(range(min(n, math.ceil(spec.p * n - 1e-9)))) for i, n in num_experts.items()}
    return ExpertConfig(experts, **flags), "bound" if spec.score_function != "gate" else "estimate"


def _rank_memory(
    tensors: list[TensorBytes], strategy: str, world: int, rank: int, activations: tuple[int, int], checkpointing: bool,
    ep: int = 1, all_to_all: int = 0, optimizer_chunk: int | None = None,
) -> RankMemory:  # fmt: skip
    """``strategy`` ``ep``: FSDP2 with routed experts split over ``ep`` ranks; ``all_to_all``: one layer's token
    all-to-all buffers (send and receive) under it; ``optimizer_chunk``: AdamW's state in host memory, brought to
    the device this many bytes of each estimate at a time."""
    sharded, ep = strategy in ("fsdp2", "ep"), ep if strategy == "ep" else 1
    params = sum(t.local_bytes(world, rank, sharded, ep) for t in tensors)
    trainable = sum(t.local_bytes(world, rank, sharded, ep) for t in tensors if t.trainable)
    optimizer = 2 * trainable  # AdamW: exp_avg and exp_avg_sq, each like the parameter
    host_optimizer = 0
    if optimizer_chunk is not None:
        host_optimizer, optimizer = optimizer, min(optimizer, 2 * optimizer_chunk)
    if sharded:
        groups: dict[str, list[int]] = {}
        for t in tensors:
            full = t.local_bytes(ep, rank % ep, False, ep)  # unsharded; under EP this rank's own experts only
            entry = groups.setdefault(t.group, [0, 0])
            entry[0] += full
            entry[1] += full if t.trainable else 0
        root = groups.pop("root", [0, 0])
        layer_params = max((v[0] for v in groups.values()), default=0)
        layer_grads = max((v[1] for v in groups.values()), default=0)
        comm = root[0] + root[1] + 2 * layer_params + layer_grads + (all_to_all if ep > 1 else 0)
    else:
        comm = trainable if strategy == "ddp" else 0
    acts = activations[1] if checkpointing else activations[0]
    total = params + trainable + optimizer + acts + comm
    return RankMemory(
        params, trainable, trainable, optimizer, host_optimizer, acts, activations[0], activations[1], comm, total
    )


def plan_memory(model: nn.Module, request: PlanRequest) -> Plan:
    """Plan ``request`` on ``model`` (a meta-device model from ``build_meta_model``; the selection is applied to it).

    ESFT: the request's selection (``expert_config`` exact, else ``selection_bound``) applied with the spec's
    trainable dtype (float32 copies of 16-bit experts by default). Full fine-tuning: every parameter trained in
    that dtype too (float32 for a 16-bit model), the same precision policy.
    """
    spec = request.spec
    config, kind = request.expert_config, "exact"
    if config is None and spec.expert_config:
        config = ExpertConfig.load(spec.expert_config)
    if config is None:
        config, kind = selection_bound(model, spec)
    if expert_config_of(model) is None:
        fft_dtype = trainable_dtype(model, replace(config, shared_experts=False, non_expert_modules=False), spec)
        fft = tensor_bytes(model, fft_dtype, train_all=True)
        apply(model, config, spec)
    else:
        fft_dtype, fft = None, tensor_bytes(model, None, train_all=True)
    esft = tensor_bytes(model)
    total_params = sum(p.numel() for n, p in model.named_parameters() if ".esft_" not in n)
    itemsize = (request.compute_dtype or next(model.parameters()).dtype).itemsize
    tokens = request.micro_batch * request.seq_length
    activations = tuple(activation_bytes(model, tokens, itemsize, c) for c in (False, True))
    profile_tokens = (request.profile_batch or request.micro_batch) * request.seq_length
    profiling = profiling_bytes(model, fft, profile_tokens, itemsize)

    ep = request.expert_parallel_size
    uneven = [layer.index for layer in find_moe_layers(model) if layer.num_experts % ep]
    if uneven:
        raise ValueError(f"expert_parallel_size={ep} does not divide the routed experts of layers {uneven}")
    hidden = model.config.get_text_config().hidden_size
    top_k = max((layer.top_k for layer in find_moe_layers(model)), default=0)
    all_to_all = 2 * top_k * hidden * itemsize  # per token: one layer's send and receive buffers under EP

    def memory(tensors: list[TensorBytes], strategy: str, world: int, checkpointing: bool, micro: int,
               on_host: bool = request.optimizer_on_host) -> RankMemory:  # fmt: skip
        acts = tuple(a * micro // request.micro_batch for a in activations)
        # rank 0 holds the largest chunks; under EP the largest rank is among the first EP group (edp index 0)
        ranks = range(ep) if strategy == "ep" else range(1)
        buffers = all_to_all * micro * request.seq_length
        chunk = request.optimizer_chunk_bytes if on_host else None
        return max((_rank_memory(tensors, strategy, world, rank, acts, checkpointing, ep, buffers, chunk)
                    for rank in ranks), key=lambda m: m.total_bytes)  # fmt: skip

    r = request
    strategies = ("fsdp2", "ddp") if r.strategy != "single" else ("fsdp2", "ddp", "single")
    strategies = ("ep", *strategies) if ep > 1 else strategies
    scenarios = {
        f"{method}_{s}": memory(tensors, s, r.world_size, r.activation_checkpointing, r.micro_batch)
        for method, tensors in (("esft", esft), ("fft", fft))
        for s in strategies
    }
    own = "ep" if ep > 1 else r.strategy
    per_rank = scenarios[f"esft_{own}"]
    by_rank = [
        {k: v for k, v in asdict(_rank_memory(esft, own, r.world_size, rank, activations, False, ep,
                                              optimizer_chunk=r.optimizer_chunk_bytes if r.optimizer_on_host
                                              else None)).items()
         if k in ("params_bytes", "trainable_bytes", "grads_bytes", "optimizer_bytes")}
        for rank in range(min(r.world_size, 64))
    ]  # fmt: skip
    selection = {
        "kind": kind, "score_function": spec.score_function, "top_p": spec.p,
        "experts_per_layer": {str(i): len(ids) for i, ids in config.experts.items()},
        "selected_experts": config.num_selected, "trainable_params": sum(
            p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_dtype": next((str(p.dtype) for n, p in model.named_parameters() if ".esft_" in n), None),
        "fft_dtype": str(fft_dtype or next(model.parameters()).dtype),
    }  # fmt: skip
    fits = None
    fixes: list[str] = []
    if r.device_memory is not None:
        budget = usable(r.device_memory)
        fits = max(per_rank.total_bytes, profiling) <= budget
        if not fits:
            fixes = _fixes(esft, r, memory, budget)
    return Plan(r, model.config.model_type, total_params, selection, per_rank, scenarios, by_rank, profiling, fits,
                fixes)  # fmt: skip


def _fixes(tensors: list[TensorBytes], r: PlanRequest, memory: Any, budget: int) -> list[str]:
    """What would make the run fit, cheapest first: a strategy that shards, activation checkpointing, a smaller
    micro-batch (data.global_batch_size keeps the batch), AdamW's state in host memory, then more GPUs."""
    fixes = []
    own, ep = ("ep", r.expert_parallel_size) if r.expert_parallel_size > 1 else (r.strategy, 1)

    def fits(strategy: str = own, world: int = r.world_size, ac: bool = r.activation_checkpointing,
             micro: int = r.micro_batch, on_host: bool = r.optimizer_on_host) -> bool:  # fmt: skip
        return memory(tensors, strategy, world, ac, micro, on_host).total_bytes <= budget

    if r.strategy != "fsdp2" and fits("fsdp2"):
        fixes.append("shard with FSDP2 (--config configs/fsdp.yaml)")
    if not r.activation_checkpointing and fits(ac=True):
        fixes.append("turn on activation checkpointing (--model.activation_checkpointing true)")
    for ac in (r.activation_checkpointing, True):
        micro = next((m for m in range(r.micro_batch - 1, 0, -1) if fits(ac=ac, micro=m)), None)
        if micro is not None:
            extra = " with --model.activation_checkpointing true" if ac and not r.activation_checkpointing else ""
            fixes.append(
                f"a smaller micro-batch: --data.batch_size {micro}{extra} (set data.global_batch_size to keep the "
                "batch: gradient accumulation makes up the rest)"
            )
            break
    for ac in (r.activation_checkpointing, True):
        if not r.optimizer_on_host and fits(ac=ac, on_host=True):
            extra = " with --model.activation_checkpointing true" if ac and not r.activation_checkpointing else ""
            fixes.append(
                f"keep AdamW's state in host memory: model.optimizer class_path {HOST_OFFLOAD_ADAMW}{extra} (exact; "
                "each step copies 16 bytes per trained parameter to the GPU and back)"
            )
            break
    per_node = max(8, r.devices_per_node)  # nodes of 8 GPUs unless the run's nodes have more
    worlds = [w for w in range(r.world_size + 1, per_node + 1)] + [per_node * n for n in range(2, 129)]
    sharding = "ep" if ep > 1 else "fsdp2"
    for ac in (r.activation_checkpointing, True):
        world = next((w for w in worlds if w > r.world_size and w % ep == 0 and fits(sharding, w, ac)), None)
        if world is not None:
            nodes = -(-world // per_node)
            where = f"--trainer.devices {world}" if world <= per_node else f"{nodes} nodes x {per_node} GPUs"
            extra = " and activation checkpointing" if ac and not r.activation_checkpointing else ""
            how = f"expert parallelism {ep}" if ep > 1 else "FSDP2"
            fixes.append(f"more GPUs: {world} with {how}{extra} ({where})")
            break
    if fixes:
        return fixes
    floor = memory(tensors, "fsdp2", 1 << 20, True, 1)  # as many GPUs as there are rows to shard
    return [
        f"no number of GPUs fits: FSDP2 gathers whole decoder layers and their root ({floor.comm_bytes / GiB:.1f} GiB "
        f"of buffers), shards expert tensors no finer than one expert per rank, and activations at micro-batch 1 "
        f"with checkpointing take {floor.activations_bytes / GiB:.1f} GiB: a per-rank floor of "
        f"{floor.total_bytes / GiB:.1f} GiB. Use GPUs with more memory, a shorter data.seq_length or a smaller "
        "selection (top_p, or an expert config)"
    ]
