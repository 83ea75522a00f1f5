"""`esft plan` and the memory check `esft fit` runs first: a parsed config -> ``PlanRequest`` -> per-rank bytes."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ..callbacks import ExpertSelectionCallback
from ..constants import TRAINING_HEADROOM
from ..distributed.strategy import is_fsdp2
from ..module import ESFTModule
from ..optimizers import DEFAULT_CHUNK_BYTES
from ..planning.plan import HOST_OFFLOAD_ADAMW, GiB, PlanRequest, build_meta_model, parse_bytes, plan_memory, usable
from ..planning.storage import stored_weights
from ..selection.rules import ExpertConfig
from ..selection.spec import SelectionSpec
from ..weights.loading import MODEL_ARGS, load_tokenizer, resolve_model_path
from .fit_config import parse_config

if TYPE_CHECKING:
    import lightning as L

__all__ = ["MemoryPlanError", "check_memory_plan", "format_plan", "plan_inputs", "plan_main"]


def plan_main(argv: list[str]) -> None:
    """`esft plan [--expert_config F] [--json] <esft fit arguments>`."""
    parser = argparse.ArgumentParser(
        prog="esft plan",
        description="Memory per GPU of `esft fit` with the same arguments, from config.json alone. It takes "
        "`esft fit`'s arguments (--config, --model.*, --data.*, --trainer.*, callbacks, --plan.*); see `esft fit "
        "--help`. Its own options:",
    )
    parser.add_argument("--expert_config", default=None, help="an expert_cfg.json: exact trainable sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    ns, rest = parser.parse_known_args(argv)

    load_args, request = plan_inputs(parse_config(rest))
    if ns.expert_config:
        request.expert_config = ExpertConfig.load(ns.expert_config)

    model = build_meta_model(**load_args)
    path = resolve_model_path(load_args["model"], load_args["family"])
    storage = stored_weights(path, model, request.spec.frozen_experts_dtype)  # before selection
    plan = plan_memory(model, request)
    if ns.json:
        print(json.dumps({**plan.to_dict(), "checkpoint": storage.to_dict()}, indent=1))
    else:
        print(f"{format_plan(plan)}\n{storage.describe()}")


def plan_inputs(config: Any, trainer: L.Trainer | None = None, module: Any = None) -> tuple[dict, Any]:
    """``load_model`` arguments and a ``PlanRequest`` from a parsed `esft fit` config; with the run's ``trainer``
    (and module) the world size, strategy, device and dtype are the ones it resolved, else read from the config
    (``devices: auto`` counts the CUDA GPUs here, 1 without any)."""
    import torch

    model, data, tr = config.model, config.data, config.trainer
    load_args = {name: model[name] for name in MODEL_ARGS}
    on_cpu = str(tr.accelerator) == "cpu" if trainer is None else trainer.strategy.root_device.type != "cuda"
    if trainer is None and load_args["dtype"] == "auto":
        load_args["dtype"] = "float32" if on_cpu else "bfloat16"  # what `auto` loads where the run is planned for
    tokenizer = module.tokenizer if module is not None and hasattr(module, "tokenizer") else None
    if tokenizer is None and not load_args["model"]:  # a built model's vocabulary is its tokenizer's
        tokenizer = load_tokenizer(model.tokenizer, resolve_model_path(model.model, model.family))
    if tokenizer is not None:
        load_args["vocab_size"] = len(tokenizer)
    if trainer is not None:
        from lightning.pytorch.strategies import DDPStrategy

        world, per_node = trainer.world_size, trainer.num_devices
        strategy = (
            "fsdp2" if is_fsdp2(trainer.strategy) else "ddp" if isinstance(trainer.strategy, DDPStrategy) else "single"
        )
        expert_parallel = int(getattr(trainer.strategy, "expert_parallel_size", 1))
    else:
        per_node = _device_count(tr.devices, on_cpu)
        world = per_node * int(tr.num_nodes or 1)
        strategy = _strategy_name(tr.strategy, world)
        expert_parallel = int(_init_args(tr.strategy).get("expert_parallel_size") or 1)
    precision = str(tr.precision or "")
    compute = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else None
    if strategy == "fsdp2" and model.get("fsdp_bf16"):
        compute = torch.bfloat16
    spec, profile_batch = _selection_spec(tr.callbacks, trainer)
    device_memory = parse_bytes(config.plan.device_memory) if config.get("plan") else None
    if device_memory is None and trainer is not None and not on_cpu:
        device_memory = torch.cuda.get_device_properties(trainer.strategy.root_device).total_memory
    request = PlanRequest(
        world_size=world, strategy=strategy, micro_batch=int(data.batch_size), seq_length=int(data.seq_length),
        activation_checkpointing=bool(model.activation_checkpointing), compute_dtype=compute, spec=spec,
        profile_batch=profile_batch or int(data.batch_size), device_memory=device_memory, devices_per_node=per_node,
        expert_parallel_size=expert_parallel if strategy == "fsdp2" else 1,
        optimizer_on_host=_class_path(model.get("optimizer")) == HOST_OFFLOAD_ADAMW,
        optimizer_chunk_bytes=int(_init_args(model.get("optimizer")).get("chunk_bytes") or DEFAULT_CHUNK_BYTES),
    )  # fmt: skip
    return load_args, request


def _class_path(entry: Any) -> str | None:
    """A config entry's class path (``class_path: ...`` or a bare class name string), else None."""
    if hasattr(entry, "get"):
        return entry.get("class_path")
    return entry if isinstance(entry, str) else None


def _init_args(entry: Any) -> Any:
    """A config entry's ``init_args`` (empty when it has none)."""
    args = entry.get("init_args") if hasattr(entry, "get") else None
    return args if args is not None else {}


def _device_count(devices: Any, on_cpu: bool) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if devices in (None, "auto", -1, "-1"):
        import torch

        return 1 if on_cpu else max(1, torch.cuda.device_count())
    return int(devices)


def _strategy_name(strategy: Any, world: int) -> str:
    name = strategy.get("class_path", "") if hasattr(strategy, "get") else str(strategy or "auto")
    name = name.rsplit(".", 1)[-1].lower()
    if name in ("fsdp2strategy", "modelparallelstrategy", "model_parallel", "fsdp", "fsdpstrategy"):
        return "fsdp2"
    if name.startswith("ddp") or world > 1:  # Lightning's `auto` on several devices is DDP
        return "ddp"
    return "single"


def _selection_spec(callbacks: Any, trainer: L.Trainer | None) -> tuple[SelectionSpec, int | None]:
    """The ExpertSelectionCallback's spec (the run's instance, or its config entry), and its profiling batch size."""
    from dataclasses import fields

    if trainer is not None:
        found = ExpertSelectionCallback.of(trainer)
        return (found.spec, found.profile_batch_size) if found is not None else (SelectionSpec(), None)
    for entry in callbacks or []:
        if hasattr(entry, "get") and str(entry.get("class_path", "")).endswith("ExpertSelectionCallback"):
            args = dict(entry.get("init_args") or {})
            names = {f.name for f in fields(SelectionSpec)} - {"placement"}
            return SelectionSpec(**{k: v for k, v in args.items() if k in names}), args.get("profile_batch_size")
    return SelectionSpec(), None


class MemoryPlanError(RuntimeError):
    """`esft fit` cannot fit its device memory (``--plan.strict false`` makes it a warning)."""


def check_memory_plan(trainer: L.Trainer, module: Any, datamodule: Any, config: Any) -> None:
    """Plan the run before anything is loaded (on GPU, or wherever ``plan.device_memory`` is set); raise
    ``MemoryPlanError`` naming the shortfall and the cheapest fix when it cannot fit (a warning when not strict)."""
    options = config.get("plan")
    if options is None or not options.check or not isinstance(module, ESFTModule):
        return
    if options.device_memory is None and trainer.strategy.root_device.type != "cuda":
        return  # nothing to plan against on CPU
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    load_args, request = plan_inputs(config, trainer, module)
    plan = plan_memory(build_meta_model(**load_args), request)
    need = max(plan.per_rank.total_bytes, plan.profiling_bytes) / GiB
    head = (
        f"ESFT plan: {need:.2f} GiB per rank ({request.world_size} rank(s), {request.strategy}, micro-batch "
        f"{request.micro_batch} x {request.seq_length}; trainable sizes {plan.selection['kind']})"
    )
    if plan.fits:
        rank_zero_info(f"{head}: fits in {request.device_memory / GiB:.2f} GiB")
        return
    message = (
        f"{head} does not fit the device's {request.device_memory / GiB:.2f} GiB: short by "
        f"{plan.shortfall_bytes / GiB:.2f} GiB. Cheapest fix: {plan.fixes[0]}"
        + (f" (or: {'; '.join(plan.fixes[1:])})" if len(plan.fixes) > 1 else "")
        + ". `esft plan` with the same arguments prints the breakdown; --plan.strict false runs anyway."
    )
    if options.strict:
        raise MemoryPlanError(message)
    rank_zero_warn(message)


def format_plan(plan: Any) -> str:
    """A ``planning.Plan`` as the table ``esft plan`` prints: one column per scenario, GiB (or MiB) per rank."""

    r, sel = plan.request, plan.selection
    names = {"esft": "ESFT", "fft": "full FT"}
    columns = list(plan.scenarios)
    header = [f"{names[c.split('_')[0]]} {c.split('_')[1]}" for c in columns]
    rows = [
        ("weights (all parameters)", "params_bytes"), ("  of which trainable", "trainable_bytes"),
        ("gradients", "grads_bytes"), ("AdamW state", "optimizer_bytes"),
        ("activations, no checkpointing", "activations_no_checkpointing_bytes"),
        ("activations, checkpointing", "activations_checkpointing_bytes"),
        ("communication buffers", "comm_bytes"), ("total", "total_bytes"),
    ]  # fmt: skip
    kind = {"exact": "exact (expert config)", "bound": "an upper BOUND (no expert config: ceil(top_p x E) experts "
            "per layer, the most ESFT-Token can select)", "estimate": "an ESTIMATE (ESFT-Gate: ceil(top_p x E) "
            "experts per layer; gate scores do not sum to 1, so this is not a bound)"}[sel["kind"]]  # fmt: skip
    if sel["score_function"] in ("all", "none") and sel["kind"] == "exact" and r.expert_config is None:
        kind = f"exact (score_function {sel['score_function']})"
    big = max(v.total_bytes for v in plan.scenarios.values()) >= GiB
    ep = f" with expert parallelism {r.expert_parallel_size}" if r.expert_parallel_size > 1 else ""
    unit, scale = ("GiB", GiB) if big else ("MiB", 2**20)
    lines = [
        f"{plan.model_type}: {_count(plan.total_params)} parameters; {r.world_size} rank(s), strategy "
        f"{r.strategy}{ep}, micro-batch {r.micro_batch} x {r.seq_length} tokens, activation checkpointing "
        f"{'on' if r.activation_checkpointing else 'off'}",
        f"ESFT selection: {sel['selected_experts']} experts, {_count(sel['trainable_params'])} trainable "
        f"parameters ({sel['trainable_dtype'] or 'model dtype'}); trainable sizes are {kind}",
        f"full fine-tuning: every parameter trained in {sel['fft_dtype']}",
        "",
        f"{unit + ' per rank (largest rank)':32s}" + "".join(f"{h:>15s}" for h in header),
    ]
    for label, key in rows:
        lines.append(f"{label:32s}" + "".join(f"{getattr(plan.scenarios[c], key) / scale:15.2f}" for c in columns))
    if r.optimizer_on_host:
        lines.append(
            f"AdamW state in host memory ({HOST_OFFLOAD_ADAMW}): {plan.per_rank.host_optimizer_bytes / scale:.2f} "
            f"{unit} per rank; on the GPU only the two chunks a step brings over"
        )
    lines.append(f"profiling peak (rank 0, layers streamed): {plan.profiling_bytes / scale:.2f} {unit}")
    if r.device_memory is None:
        lines.append("device memory unknown: pass --plan.device_memory (e.g. 80GiB or H100-80GB) for a verdict")
    else:
        need = max(plan.per_rank.total_bytes, plan.profiling_bytes)
        verdict = "fits" if plan.fits else f"does NOT fit: short by {plan.shortfall_bytes / GiB:.2f} GiB"
        lines.append(
            f"this run (ESFT {'ep' if ep else r.strategy}): {need / GiB:.2f} GiB per rank of "
            f"{usable(r.device_memory) / GiB:.2f} GiB usable "
            f"({TRAINING_HEADROOM:.0%} of {r.device_memory / GiB:.2f} GiB): "
            f"{verdict}"
        )
        lines += [f"  fix: {fix}" for fix in plan.fixes]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
