"""Apply: train only the selected routed experts of fused [E, ...] expert tensors, for real.

Each MoE layer with a selection keeps its fused per-expert tensors (``gate_up_proj`` or ``up_proj``,
``down_proj``, and their biases where the layout has them) as frozen parameters and gains small trainable
copies, ``esft_<name>`` [k, ...], holding the k selected experts. The model switches to the ``esft`` experts
implementation (``experts/forward.py``), which routes token-expert pairs of frozen experts through the frozen
tensors and pairs of selected experts through the small ones, so gradients and optimizer state are sized to the
selection, frozen experts get no weight-gradient work, and no per-step copy of the expert weights is made.
``state_dict()`` still shows the model's own keys and shapes, with the trained rows merged in (on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dtensors import full_on_host
from ..models import MoELayer, UnsupportedModelError, find_moe_layers, is_experts_module
from ..selection.rules import ExpertConfig
from ..weights.fp8_blocks import FP8, SCALE_SUFFIX, dequantize_experts, quantize_experts, scale_grid
from .forward import register_esft_forward
from .fp8 import is_fp8_frozen
from .state import (
    ESFT_IMPLEMENTATION,
    EXPERT_IDS,
    GROUP_OF_EXPERT,
    SLOT_BUFFERS,
    SLOT_OF_EXPERT,
    STATE_ATTR,
    TRAINED_PREFIX,
    SplitState,
    expert_config_of,
    expert_param_names,
    experts_state,
    has_split,
    set_expert_config,
)

__all__ = [
    "apply_expert_config",
    "install_split",
    "remove_expert_split",
    "trainable_summary",
    "use_esft_implementation",
    "validate_expert_config",
]


def validate_expert_config(layers: list[MoELayer], config: ExpertConfig) -> None:
    """Raise a clear error if ``config`` names a layer or expert the model does not have."""
    by_index = {layer.index: layer for layer in layers}
    for index, ids in config.experts.items():
        if index not in by_index:
            raise ValueError(
                f"expert config names layer {index}, which is not an MoE layer of this model "
                f"(MoE layers: {sorted(by_index)})"
            )
        num = by_index[index].num_experts
        bad = [e for e in ids if not 0 <= e < num]
        if bad:
            raise ValueError(f"expert config, layer {index}: expert ids {bad} out of range (layer has {num} experts)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"expert config, layer {index}: an expert is listed twice: {ids}")


def apply_expert_config(
    model: nn.Module,
    config: ExpertConfig,
    trainable_dtype: torch.dtype | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Freeze ``model`` except the experts ``config`` selects (and shared / non-expert modules if asked).

    Afterwards the parameters with ``requires_grad`` are exactly the selected experts' weights (as the
    small ``esft_*`` tensors), plus shared experts and non-expert modules when the config says so.
    Applying again first folds the previous selection's trained values back into the fused tensors.
    ``trainable_dtype`` (e.g. ``torch.float32`` for a bf16 model) keeps the selected experts' trainable
    copies, and so their gradients and AdamW state, in that dtype: small lr updates are not rounded away.
    ``frozen_dtype=torch.float8_e4m3fn`` keeps every layer's frozen routed experts in block FP8 (``experts/fp8.py``):
    half the bytes of bf16, dequantized expert by expert as the forward uses them.
    Returns counts: trainable / total parameters and selected experts.
    """
    if frozen_dtype not in (None, FP8):
        raise ValueError(f"frozen_dtype must be None (the model's) or torch.float8_e4m3fn, got {frozen_dtype}")
    layers = find_moe_layers(model)
    validate_expert_config(layers, config)
    if stored_expert_dtypes(layers) == {trainable_dtype}:
        trainable_dtype = None  # the experts' own dtype: nothing to convert
    if trainable_dtype is not None and (config.shared_experts or config.non_expert_modules):
        model_dtypes = {p.dtype for p in model.parameters()} - {trainable_dtype}
        if model_dtypes:
            raise ValueError(
                f"trainable_dtype={trainable_dtype} applies to routed experts only; with shared_experts or "
                f"non_expert_modules the model's own {sorted(map(str, model_dtypes))} weights would train: load the "
                "model in that dtype instead"
            )
    for layer in layers:
        _check_layout(layer)
    remove_expert_split(model)
    model.requires_grad_(False)
    split = False
    for layer in layers:
        ids = config.experts.get(layer.index, [])
        names = expert_param_names(layer.experts)
        fused_dtype = getattr(layer.experts, names[0]).dtype
        every_expert = len(ids) == layer.num_experts and sorted(ids) == list(range(layer.num_experts))
        if every_expert and trainable_dtype in (None, fused_dtype):
            for name in names:  # every expert trains: the fused tensors themselves are the trainables
                getattr(layer.experts, name).requires_grad_(True)
        elif ids or frozen_dtype is not None:  # (8-bit frozen experts need the esft forward in every layer)
            install_split(layer.experts, ids, trainable_dtype, frozen_fp8=frozen_dtype is not None)
            split = True
    if split:
        use_esft_implementation(model)
    if config.shared_experts:
        for layer in layers:
            for module in layer.shared:
                module.requires_grad_(True)
    if config.non_expert_modules:
        expert_params = {id(p) for layer in layers for p in layer.experts.parameters()}
        expert_params |= {id(p) for layer in layers for m in layer.shared for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in expert_params:
                p.requires_grad_(True)
    set_expert_config(model, config)
    return trainable_summary(model)


def stored_expert_dtypes(layers: list[MoELayer]) -> set[torch.dtype]:
    """The dtypes the routed experts' fused tensors are stored in."""
    return {getattr(layer.experts, expert_param_names(layer.experts)[0]).dtype for layer in layers}


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (the small trained copies do not add to the total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The model's own size: the small esft_* copies are not extra model parameters.
    total = sum(p.numel() for n, p in model.named_parameters() if not is_trained_copy(n))
    config = expert_config_of(model)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "selected_experts": config.num_selected if config is not None else 0,
    }


def trained_copies_dtype(model: nn.Module) -> str | None:
    """dtype of the selected experts' trainable copies (e.g. ``torch.float32``), None without any."""
    first = next((p for n, p in model.named_parameters() if is_trained_copy(n)), None)
    return None if first is None else str(first.dtype)


def is_trained_copy(name: str) -> bool:
    """Whether a parameter name is one of the small trainable copies ``apply_expert_config`` adds."""
    return name.rsplit(".", 1)[-1].startswith(TRAINED_PREFIX)


def _check_layout(layer: MoELayer) -> None:
    """Refuse experts modules with per-expert tensors the esft implementation would not split."""
    experts, names = layer.experts, expert_param_names(layer.experts)
    missing = [n for n in names if not isinstance(getattr(experts, n, None), nn.Parameter)]
    extra = [
        n
        for n, p in experts.named_parameters(recurse=False)
        if n not in names and not n.startswith(TRAINED_PREFIX) and p.dim() > 0 and p.shape[0] == layer.num_experts
    ]
    if missing or extra or getattr(experts, "_is_expert_parallel", False):
        what = f"missing {missing}" if missing else f"extra per-expert tensors {extra}" if extra else "expert parallel"
        raise UnsupportedModelError(
            f"{layer.family.model_type}: layer {layer.index} experts ({type(experts).__name__}) have a layout "
            f"esft-lightning does not split ({what})"
        )


def _experts_configs(model: nn.Module) -> list[Any]:
    configs: dict[int, Any] = {}
    for module in model.modules():
        if is_experts_module(module):
            configs.setdefault(id(module.config), module.config)
    return list(configs.values())


def use_esft_implementation(model: nn.Module) -> None:
    """Dispatch every experts module of ``model`` to the ``esft`` implementation, remembering each one's own."""
    register_esft_forward()
    for module in model.modules():
        if is_experts_module(module) and module.config._experts_implementation != ESFT_IMPLEMENTATION:
            experts_state(module, create=True).base_implementation = module.config._experts_implementation
    for config in _experts_configs(model):
        config._experts_implementation = ESFT_IMPLEMENTATION


def _restore_implementation(model: nn.Module) -> None:
    for module in model.modules():
        state = experts_state(module)
        base = None if state is None else state.base_implementation
        if base is not None and module.config._experts_implementation == ESFT_IMPLEMENTATION:
            module.config._experts_implementation = base
        if state is not None:
            state.base_implementation = None
            if state.shard is None:  # nothing of ESFT's left on the module
                delattr(module, STATE_ATTR)


def install_split(
    experts: nn.Module, ids: list[int], dtype: torch.dtype | None = None, frozen_fp8: bool = False
) -> None:
    """Give ``experts`` trainable ``esft_*`` copies of experts ``ids`` (in ``dtype``, default the fused tensors'),
    the slot maps the esft forward uses, and state-dict hooks that show the model's own keys; ``frozen_fp8``: the
    fused weight tensors become block FP8 with ``<name>_scale_inv`` scales (biases stay as they are)."""
    names = expert_param_names(experts)
    device = getattr(experts, names[0]).device
    if device.type == "meta":  # a model filled from its files later: the slot maps are needed for real
        device = torch.device("cpu")
    slots = [-1] * experts.num_experts
    for slot, expert in enumerate(ids):
        slots[expert] = slot
    index = torch.tensor(ids, dtype=torch.long, device=device)
    slot_of_expert = torch.tensor(slots, dtype=torch.long, device=device)
    experts.register_buffer(EXPERT_IDS, index, persistent=False)
    experts.register_buffer(SLOT_OF_EXPERT, slot_of_expert, persistent=False)
    # Group ids of the esft forward: frozen expert e -> e, selected expert -> E + slot, placeholder (E) -> E + k.
    group_of_expert = torch.arange(experts.num_experts + 1, device=device)
    group_of_expert[index] = experts.num_experts + torch.arange(len(ids), device=device)
    group_of_expert[-1] = experts.num_experts + len(ids)
    experts.register_buffer(GROUP_OF_EXPERT, group_of_expert, persistent=False)
    for name in names:
        full = getattr(experts, name)
        trained = full.detach()[index].to(dtype or full.dtype, copy=True)
        experts.register_parameter(TRAINED_PREFIX + name, nn.Parameter(trained))
    frozen_dtype = _store_frozen_fp8(experts, names[:2]) if frozen_fp8 else None
    hooks = [
        experts.register_state_dict_post_hook(_state_dict_with_trained_rows),
        experts.register_load_state_dict_pre_hook(_load_trained_rows),
    ]
    experts_state(experts, create=True).split = SplitState(slots, hooks, frozen_dtype)


def remove_expert_split(model: nn.Module) -> None:
    """Fold trained experts back into the fused tensors and restore the stock experts forward."""
    for module in model.modules():
        if not has_split(module):
            continue
        split = experts_state(module).split
        with torch.no_grad():
            for name in expert_param_names(module):
                if is_fp8_frozen(module, name):  # back to the model's dtype before the trained rows fold in
                    scale = getattr(module, name + SCALE_SUFFIX)
                    full = dequantize_experts(getattr(module, name), scale, split.frozen_dtype)
                    delattr(module, name + SCALE_SUFFIX)
                    setattr(module, name, nn.Parameter(full, requires_grad=False))
                getattr(module, name)[getattr(module, EXPERT_IDS)] = getattr(module, TRAINED_PREFIX + name).to(
                    getattr(module, name).dtype
                )
                delattr(module, TRAINED_PREFIX + name)
        for handle in split.hooks:
            handle.remove()
        for buffer in SLOT_BUFFERS:
            delattr(module, buffer)
        experts_state(module).split = None
    _restore_implementation(model)
    set_expert_config(model, None)


def _state_dict_with_trained_rows(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
    # The merged copy is made in host memory: an accelerator never holds a second copy of the experts.
    # Sharded (FSDP2 DTensor) tensors are gathered first (every rank runs this hook, as the gather needs).
    for name in expert_param_names(module):
        trained = state_dict.pop(prefix + TRAINED_PREFIX + name, None)
        if trained is None or prefix + name not in state_dict:
            continue
        merged = full_on_host(state_dict[prefix + name], copy=True)
        scale = state_dict.pop(prefix + name + SCALE_SUFFIX, None)
        if scale is not None:  # 8-bit frozen experts: the model's own dtype in the state dict
            merged = dequantize_experts(merged, full_on_host(scale), experts_state(module).split.frozen_dtype)
        merged[getattr(module, EXPERT_IDS).cpu()] = full_on_host(trained, copy=False).to(merged.dtype)
        state_dict[prefix + name] = merged


def _load_trained_rows(module: nn.Module, state_dict: dict, prefix: str, *_args: Any) -> None:
    # A full state dict (the model's own keys) also fills the small trainable copies.
    for name in expert_param_names(module):
        full, trained = prefix + name, prefix + TRAINED_PREFIX + name
        if full in state_dict and trained not in state_dict:
            state_dict[trained] = state_dict[full][getattr(module, EXPERT_IDS).to(state_dict[full].device)]
        value = state_dict.get(full)
        if value is not None and is_fp8_frozen(module, name) and value.dtype != FP8:  # the model's own dtype
            state_dict[full], state_dict[full + SCALE_SUFFIX] = quantize_experts(value)


def _store_frozen_fp8(experts: nn.Module, names: tuple[str, ...]) -> torch.dtype:
    """Replace the fused weight tensors by block-FP8 ones plus scales (on the meta device: shapes only, filled
    from the files later); returns the dtype they held (what the forward dequantizes to)."""
    model_dtype = getattr(experts, names[0]).dtype
    for name in names:
        full = getattr(experts, name)
        if full.is_meta:
            e, a, b = full.shape
            grid = (e, *scale_grid(a, b))
            weight, scale = torch.empty(full.shape, dtype=FP8, device="meta"), torch.empty(grid, device="meta")
        else:
            weight, scale = quantize_experts(full.detach())
        setattr(experts, name, nn.Parameter(weight, requires_grad=False))
        experts.register_parameter(name + SCALE_SUFFIX, nn.Parameter(scale, requires_grad=False))
    return model_dtype


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"torch.float32"`` / ``"float32"`` -> ``torch.float32`` (None stays None): dtypes as recorded in checkpoints."""
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype name: {name!r}")
    return dtype
