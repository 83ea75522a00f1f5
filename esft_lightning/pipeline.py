"""Decide -> apply -> restore without Lightning: profile and select, split the model, the checkpoint's selection entry.

The callback, the CLI and ``ESFTModule`` all call these; none of them holds its own copy of the rules
(which scores a score function uses, the trainable dtype, what a checkpoint's selection means).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .dtensors import model_is_sharded
from .experts.split import apply_expert_config, dtype_from_name, stored_expert_dtypes, trained_copies_dtype
from .experts.state import expert_config_of
from .models import find_moe_layers
from .routing.placement import placed_for_profiling
from .routing.profile import RoutingProfile, profile_routing
from .selection.rules import ExpertConfig, all_experts, load_exclusion, no_experts, random_experts, select_experts
from .selection.spec import SelectionSpec
from .weights.fp8_blocks import FP8

__all__ = [
    "Decision", "apply", "decide", "frozen_experts_in_fp8", "read_checkpoint_selection", "restore", "selection_entry",
    "trainable_dtype",
]  # fmt: skip


@dataclass
class Decision:
    """What ``decide`` chose, and the profile it chose from (None when nothing was profiled)."""

    config: ExpertConfig
    profile: RoutingProfile | None = None


def decide(
    model: nn.Module,
    batches: Any,
    spec: SelectionSpec,
    device: torch.device | None = None,
    world_size: int = 1,
    all_reduce: bool | None = None,
) -> Decision:
    """Profile ``batches`` (when the spec needs it) and select experts; the model is left unchanged.

    ``batches``: dicts with ``input_ids`` (and ``attention_mask``), or None when ``spec.needs_data`` is false.
    ``device``: where to profile (default: where the model is). With ``world_size`` > 1 and ``all_reduce`` each
    rank profiles its share of ``max_tokens`` and the sums are all-reduced.
    """
    excluded = load_exclusion(spec.exclude) if spec.exclude else None
    if spec.expert_config:
        config = ExpertConfig.load(spec.expert_config)
        if excluded is not None:
            _check_disjoint(config, excluded, spec.expert_config)
        return Decision(config)
    num_experts = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
    meta = {"score_function": spec.score_function, "model_type": model.config.model_type}
    if spec.score_function == "all":
        return Decision(all_experts(num_experts, exclude=excluded, **spec.flags, meta=meta))
    if spec.score_function == "none":
        return Decision(no_experts(num_experts, **spec.flags, meta=meta))
    if batches is None:
        raise ValueError(f"score_function {spec.score_function!r} profiles task data, but no batches were given")
    budget = None if spec.max_tokens is None else -(-spec.max_tokens // world_size)
    device = next(model.parameters()).device if device is None else device
    with placed_for_profiling(model, device, spec.placement, keep=False) as where:
        profile = profile_routing(
            model, batches, max_tokens=budget, device=where, all_reduce=all_reduce, score_averaging=spec.score_averaging
        )
    meta.update(num_tokens=profile.num_tokens, score_averaging=spec.score_averaging)
    config = select_experts(
        profile.scores(spec.score_kind), spec.p, **spec.flags, meta=meta, exclude=excluded, strict=spec.exclude_strict
    )
    if spec.score_function == "random":
        config = random_experts(config, num_experts, seed=spec.seed, exclude=excluded)
    return Decision(config, profile)


def _check_disjoint(config: ExpertConfig, excluded: ExpertConfig, source: str) -> None:
    """An explicit expert config is applied as it is: one that trains an excluded expert is a contradiction."""
    both = {k: sorted(set(v) & set(excluded.experts.get(k, ()))) for k, v in config.experts.items()}
    both = {k: v for k, v in both.items() if v}
    if both:
        where = "; ".join(f"layer {k} experts {v}" for k, v in sorted(both.items()))
        raise ValueError(
            f"{source} selects experts that exclude forbids ({', '.join(excluded.meta['sources'])}): {where}"
        )


def trainable_dtype(
    model: nn.Module, config: ExpertConfig, spec: SelectionSpec, saved: str | None = None
) -> torch.dtype | None:
    """The dtype of the trainable expert copies: an explicit ``spec.trainable_dtype`` wins, then the one a resumed
    checkpoint recorded (``saved``), then ``auto``: float32 when the routed experts are stored in 16 bits."""
    name = spec.trainable_dtype
    if name not in (None, "auto"):
        return dtype_from_name(name)
    if saved is not None:
        return dtype_from_name(saved)
    if name is None:
        return None
    sixteen_bit = stored_expert_dtypes(find_moe_layers(model)) & {torch.bfloat16, torch.float16}
    if not sixteen_bit:
        return None
    if config.shared_experts or config.non_expert_modules:
        warnings.warn(
            "ESFT: shared_experts / non_expert_modules train the model's own 16-bit weights, so the selected "
            "experts train in the model's dtype too (load the model in float32 to train everything in fp32)",
            stacklevel=2,
        )
        return None
    return torch.float32


def apply(model: nn.Module, config: ExpertConfig, spec: SelectionSpec, saved_dtype: str | None = None) -> dict:
    """``apply_expert_config`` with the spec's trainable and frozen dtypes; returns the trainable summary."""
    frozen = FP8 if spec.frozen_experts_dtype == "float8" else None
    return apply_expert_config(model, config, trainable_dtype(model, config, spec, saved_dtype), frozen)


def restore(model: nn.Module, saved: dict | None, spec: SelectionSpec | None = None) -> ExpertConfig | None:
    """Apply a checkpoint's selection (or the spec's explicit ``expert_config``) to ``model``, or check that the
    selection already applied is the same one; return the selection in force (None: nothing to restore).

    ``saved``: the checkpoint's ``esft`` entry (``model_type``, ``expert_config``, ``trainable_dtype``; see
    ``read_checkpoint_selection``). Raises ``ValueError`` naming the mismatch for a checkpoint of another model
    type, another selection or another trainable dtype, and for a model already sharded without a selection
    (the selection changes the parameters, so it must come before sharding).
    """
    spec = spec or SelectionSpec()
    saved = saved or {}
    if saved.get("frozen_experts_dtype") == "float8":  # a run that kept its frozen experts 8-bit resumes so
        spec = replace(spec, frozen_experts_dtype="float8")
    model_type = model.config.model_type
    if saved.get("model_type") not in (None, model_type):
        raise ValueError(f"checkpoint is for a {saved['model_type']} model, this run trains {model_type}")
    from_checkpoint = saved.get("expert_config")
    target = None if from_checkpoint is None else ExpertConfig.from_dict(from_checkpoint, source="checkpoint")
    if spec.expert_config:
        explicit = ExpertConfig.load(spec.expert_config)
        if spec.exclude:
            _check_disjoint(explicit, load_exclusion(spec.exclude), spec.expert_config)
        if target is not None and explicit.experts != target.experts:
            raise ValueError(f"{spec.expert_config} differs from the selection of the checkpoint being resumed")
        target = target or explicit
    current: ExpertConfig | None = expert_config_of(model)
    if target is None:
        return current
    saved_dtype = saved.get("trainable_dtype")
    if current is not None:
        if current.experts != target.experts:
            raise ValueError(
                f"the {'checkpoint' if from_checkpoint is not None else spec.expert_config} selects other experts "
                "than the ones this model trains: resume with the checkpoint's expert_cfg.json "
                "(ExpertSelectionCallback(expert_config=...)) or start afresh"
            )
        if saved_dtype is not None and saved_dtype != trained_copies_dtype(model):
            raise ValueError(
                f"checkpoint trained the selected experts in {saved_dtype}, this run in "
                f"{trained_copies_dtype(model)}: set ExpertSelectionCallback(trainable_dtype=...) to match"
            )
        return current
    if model_is_sharded(model):
        raise ValueError(
            "the model is already sharded without an expert selection: apply it before sharding "
            "(call esft_lightning.prepare_for_sharding(model, trainer) before fully_shard, or pass the run's "
            "expert_cfg.json as ExpertSelectionCallback(expert_config=...))"
        )
    apply(model, target, spec, saved_dtype)
    return target


def selection_entry(model: nn.Module, config: ExpertConfig) -> dict[str, Any]:
    """The ``esft`` entry a checkpoint records: model type, selection and trainable dtype (what ``restore`` reads),
    and how the selection's scores were averaged (None for a selection that profiled nothing)."""
    return {
        "model_type": model.config.model_type,
        "expert_config": config.to_dict(),
        "trainable_dtype": trained_copies_dtype(model),
        "score_averaging": config.meta.get("score_averaging"),
        "frozen_experts_dtype": "float8" if frozen_experts_in_fp8(model) else "model",
    }


def frozen_experts_in_fp8(model: nn.Module) -> bool:
    """Whether the model holds its frozen routed experts in block FP8 (``frozen_experts_dtype: float8``)."""
    return any(p.dtype == FP8 for p in model.parameters())


def read_checkpoint_selection(ckpt_path: str | Path | None) -> dict | None:
    """The ``esft`` entry (selection, trainable dtype) of a Lightning checkpoint file or distributed folder."""
    if not ckpt_path or not Path(ckpt_path).exists():
        return None
    path = Path(ckpt_path)
    if path.is_dir():  # Lightning's distributed checkpoints keep the non-tensor state in meta.pt
        path = path / "meta.pt"
        if not path.exists():
            return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=path.suffix != ".pt")
    return checkpoint.get("esft")
