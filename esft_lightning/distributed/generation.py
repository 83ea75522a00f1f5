"""Generation under FSDP2: unshard the model once per evaluation when it fits, else gather per forward in lockstep.

HF ``generate`` runs one forward per new token. Under FSDP2 each forward all-gathers every layer and frees it
again (``reshard_after_forward``), so a 96-token evaluation gathered the whole model ~100 times per batch. When
the unsharded model fits next to what the device already holds, ``sharded_generation`` instead gathers every
FSDP module once (``FSDPModule.unshard``), keeps it gathered for all forwards (``set_reshard_after_forward
(False)``), and afterwards restores each module's own setting and leaves it as a forward would (layers
resharded, the root's parameters kept, FSDP's default for the root), so training resumes exactly as it
would have. Forwards then run no collective, and every rank generates on its own (no ``synced_gpus``).

Otherwise the forwards gather per layer as before (at most once per layer per forward of a whole batch), and
``evaluate_set`` keeps the ranks in lockstep: equal shard sizes and ``synced_gpus`` keep every rank entering
the collectives until all are done.

FSDP2 facts this relies on (torch 2.13, ``torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py``):
``FSDPParamGroup.unshard`` returns at once for an already unsharded group, so pre-forward does no all-gather
then; ``post_forward`` keeps the parameters when ``reshard_after_forward`` is off; a ``reshard()`` outside a
forward always frees the unsharded parameters. The unsharded parameters follow the ``MixedPrecisionPolicy``:
with ``param_dtype`` bf16 they are bf16 copies (the sharded fp32 parameters stay), which is what the
per-forward path computes with too, and what the memory check counts.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..constants import GENERATION_HEADROOM
from ..dtensors import model_is_sharded
from ..experts.state import expert_shard

__all__ = [
    "GenerationMode",
    "UnshardPolicy",
    "MemoryReport",
    "fsdp_modules",
    "unsharded_bytes",
    "available_bytes",
    "unshard_fits",
    "sharded_generation",
]

# "local": every rank holds whole weights (one process, DDP): ranks generate independently.
# "unsharded": FSDP2 model gathered once for the evaluation: forwards run no collective.
# "gathered": FSDP2 (or other sharded) model gathered per forward: ranks must step together.
GenerationMode = Literal["local", "unsharded", "gathered"]
# "auto": unshard when the memory check says it fits; "always"/"never": skip the check (benchmarks, tests).
UnshardPolicy = Literal["auto", "always", "never"]


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """Every ``fully_shard``-ed module inside ``model``, outermost first (``modules()`` order: the same on
    every rank, so collectives issued in this order match)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(module: FSDPModule) -> list[Any]:
    # FSDP2 has no public view of a module's parameter groups; torch is pinned (<2.14) and the tests
    # exercise every private attribute used here, so a change in torch fails loudly in CI.
    return list(module._get_fsdp_state()._fsdp_param_groups)


def unsharded_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every FSDP-managed parameter of ``model`` unsharded, bytes of the largest FSDP module's).

    Unsharded parameters take the mixed-precision ``param_dtype`` when one is set (floating point only, as FSDP
    casts them). The largest module's bytes are the transient all-gather buffer that unsharding one module
    holds on top (FSDP copies out of one flat buffer per module).
    """
    total = largest = 0
    for module in fsdp_modules(model):
        module_bytes = 0
        for group in _param_groups(module):
            cast = group.mp_policy.param_dtype
            for fsdp_param in group.fsdp_params:
                param = fsdp_param.sharded_param  # a DTensor: numel() is the global size
                dtype = cast if cast is not None and param.is_floating_point() else param.dtype
                module_bytes += param.numel() * dtype.itemsize
        total += module_bytes
        largest = max(largest, module_bytes)
    return total, largest


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's free memory plus what the caching allocator reserved
    but does not use; the host's MemAvailable for CPU; None when unknown (then nothing is unsharded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _meminfo_available()
    return None


@dataclass(frozen=True)
class MemoryReport:
    """What one rank needs to unshard and what its device has free; ``place`` names the memory it draws on
    (ranks on one host share its RAM, ranks on one GPU share that GPU)."""

    place: str
    need: int
    available: int | None


def unshard_fits(reports: Sequence[MemoryReport], headroom: float = GENERATION_HEADROOM) -> bool:
    """Whether every rank can unshard: per memory ``place``, the ranks' needs together fit in ``headroom`` of
    the least free memory any of them saw (they read it at about the same time, before anyone unsharded)."""
    places: dict[str, list[MemoryReport]] = {}
    for report in reports:
        places.setdefault(report.place, []).append(report)
    for group in places.values():
        if any(r.available is None for r in group):
            return False
        least = min(r.available for r in group if r.available is not None)
        if sum(r.need for r in group) > headroom * least:
            return False
    return True


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters())
    return param.device  # a DTensor's device is its local shard's


def _gather_reports(model: nn.Module, need: int) -> list[MemoryReport]:
    """Every rank's ``MemoryReport`` (one small object all-gather: a host sync, once per evaluation)."""
    device = _device_of(model)
    place = socket.gethostname() if device.type == "cpu" else f"{socket.gethostname()}/{device}"
    mine = MemoryReport(place, need, available_bytes(device))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    return reports


def _info(message: str) -> None:
    # Rank 0 of torch.distributed: Lightning's rank_zero_info alone goes by environment variables that
    # processes started outside Lightning (torch.multiprocessing, tests, benchmarks) do not set.
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        rank_zero_info(message)


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


@contextmanager
def sharded_generation(
    model: nn.Module, policy: UnshardPolicy = "auto", headroom: float = GENERATION_HEADROOM
) -> Iterator[GenerationMode]:
    """Prepare ``model`` for a whole evaluation's generation; yields the ``GenerationMode`` to generate in.

    FSDP2 model and it fits (or ``policy="always"``): every FSDP module is unsharded once and kept so; on exit
    (also on error) each gets back its own ``reshard_after_forward`` and is resharded if that setting is on
    (the root, off by FSDP's default, keeps its parameters as after any forward). Under several
    processes every rank must enter (the memory check and the unshard are collectives); all ranks take the
    same decision from the same all-gathered reports.
    """
    if policy not in ("auto", "always", "never"):
        raise ValueError(f"unshard policy must be 'auto', 'always' or 'never', got {policy!r}")
    modules = fsdp_modules(model)
    if any(expert_shard(m) is not None for m in model.modules()):
        # Expert parallel: every forward sends tokens to the experts' owners, so all ranks must step together.
        _info("ESFT generation under expert parallelism: ranks in lockstep (tokens travel to their experts' owners)")
        yield "gathered"
        return
    if not modules:
        # Sharded some other way (DTensor parameters without FSDP2): forwards may communicate, keep in step.
        yield "gathered" if model_is_sharded(model) else "local"
        return
    need, largest = unsharded_bytes(model)
    if policy == "auto":
        reports = _gather_reports(model, need + largest)
        unshard = unshard_fits(reports, headroom)
        mine = reports[dist.get_rank() if len(reports) > 1 else 0]
        ranks_here = sum(r.place == mine.place for r in reports)
        why = (
            f"{ranks_here} rank(s) x {_gib(need + largest)} needed, {_gib(mine.available)} available on "
            f"{mine.place}, headroom {headroom}"
        )
    else:
        unshard, why = policy == "always", f"policy {policy!r}"
    if not unshard:
        _info(
            f"ESFT generation under FSDP2: gathered per layer at every forward, ranks in lockstep ({why}); "
            "slower than unsharding once"
        )
        yield "gathered"
        return
    _info(f"ESFT generation under FSDP2: model unsharded once for the evaluation ({why})")
    if modules[0] is model:
        # FSDP's lazy init (run by the root's first forward) turns the root's resharding off unless it was set
        # explicitly; run it first, so what is saved and restored below is what training runs with.
        modules[0]._get_fsdp_state()._lazy_init()
    saved = [_reshard_setting(m) for m in modules]
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
        for module in modules:  # one module at a time: one flat all-gather buffer alive at once
            module.unshard()
        yield "unsharded"
    except BaseException:
        if modules[0] is model:
            # A forward that raised leaves FSDP mid-iteration (training states, forward root): clear that
            # before training touches the model again. Not the root (sharded inside a bigger FSDP tree):
            # FSDP refuses, and the root's owner must reset it.
            with suppress(RuntimeError):
                modules[0].reset_iter_state()
        raise
    finally:
        for module, setting in zip(modules, saved):
            _restore_reshard_setting(module, setting)
            # Leave each module as a forward would: FSDP frees what reshards after forward (a reshard outside
            # a forward always frees), and keeps the root's parameters (its default: the next forward or
            # backward needs them at once). Code that runs a submodule directly, bypassing the root's hooks
            # (profile_routing calls the decoder), relies on that, as it did after per-forward gathering.
            if any(mesh_info is not None for mesh_info in setting[1]):
                module.reshard()


def _reshard_setting(module: FSDPModule) -> tuple[Any, list[Any]]:
    # No public getter: read what ``set_reshard_after_forward`` writes. ``post_forward_mesh_info`` None means
    # no reshard after forward; ``_auto_reshard_after_forward`` lets a root not yet lazily initialised (one
    # that is not ``model`` itself) still opt out of resharding at its first forward.
    state = module._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in _param_groups(module)]


def _restore_reshard_setting(module: FSDPModule, setting: tuple[Any, list[Any]]) -> None:
    auto, mesh_infos = setting
    module._get_fsdp_state()._auto_reshard_after_forward = auto
    for group, mesh_info in zip(_param_groups(module), mesh_infos):
        group.post_forward_mesh_info = mesh_info
