"""Apply: train only the selected routed experts of fused [E, ...] expert tensors, for real.

Each MoE layer with a selection keeps its fused ``gate_up_proj`` / ``down_proj`` as frozen parameters
and gains two small trainable parameters, ``esft_gate_up_proj`` [k, 2I, H] and ``esft_down_proj``
[k, H, I], holding the k selected experts. The experts forward routes token-expert pairs of frozen
experts through the frozen tensors and pairs of selected experts through the small ones (one grouped
matmul per group and projection), so gradients and optimizer state are sized to the selection, frozen
experts get no weight-gradient work, and no per-step copy of the expert weights is made.
``state_dict()`` still shows the model's own keys and shapes, with the trained rows in place.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models import MoELayer, find_moe_layers
from .selection import ExpertConfig

TRAINED_PREFIX = "esft_"
PROJECTIONS = ("gate_up_proj", "down_proj")


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
    model: nn.Module, config: ExpertConfig, trainable_dtype: torch.dtype | None = None
) -> dict[str, int]:
    """Freeze ``model`` except the experts ``config`` selects (and shared / non-expert modules if asked).

    Afterwards the parameters with ``requires_grad`` are exactly the selected experts' weights (as the
    small ``esft_*`` tensors), plus shared experts and non-expert modules when the config says so.
    Applying again first folds the previous selection's trained values back into the fused tensors.
    ``trainable_dtype`` (e.g. ``torch.float32`` for a bf16 model) keeps the selected experts' trainable
    copies, and so their gradients and AdamW state, in that dtype: small lr updates are not rounded away.
    Returns counts: trainable / total parameters and selected experts.
    """
    layers = find_moe_layers(model)
    validate_expert_config(layers, config)
    if trainable_dtype is not None and (config.shared_experts or config.non_expert_modules):
        model_dtypes = {p.dtype for p in model.parameters()} - {trainable_dtype}
        if model_dtypes:
            raise ValueError(
                f"trainable_dtype={trainable_dtype} applies to routed experts only; with shared_experts or "
                f"non_expert_modules the model's own {sorted(map(str, model_dtypes))} weights would train: load the "
                "model in that dtype instead"
            )
    remove_expert_split(model)
    model.requires_grad_(False)
    for layer in layers:
        ids = config.experts.get(layer.index, [])
        fused_dtype = layer.experts.gate_up_proj.dtype
        every_expert = len(ids) == layer.num_experts and sorted(ids) == list(range(layer.num_experts))
        if every_expert and trainable_dtype in (None, fused_dtype):
            for name in PROJECTIONS:  # every expert trains: the fused tensors themselves are the trainables
                getattr(layer.experts, name).requires_grad_(True)
        elif ids:
            _install_split(layer.experts, ids, trainable_dtype)
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
    model.esft_expert_config = config
    return trainable_summary(model)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (the small trained copies do not add to the total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The model's own size: the small esft_* copies are not extra model parameters.
    total = sum(p.numel() for n, p in model.named_parameters() if not _is_trained_copy(n))
    config = getattr(model, "esft_expert_config", None)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "selected_experts": config.num_selected if config is not None else 0,
    }


def _is_trained_copy(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith(TRAINED_PREFIX)


def has_split(experts: nn.Module) -> bool:
    """Whether apply_expert_config installed frozen/trained split tensors on this experts module."""
    return hasattr(experts, "esft_expert_ids")


def _install_split(experts: nn.Module, ids: list[int], dtype: torch.dtype | None = None) -> None:
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ValueError(f"{type(experts).__name__}: experts with biases or without a gate are not supported")
    device = experts.gate_up_proj.device
    slots = [-1] * experts.num_experts
    for slot, expert in enumerate(ids):
        slots[expert] = slot
    # Built from Python lists, so this also works on a meta-device model (FSDP ranks other than 0).
    index = torch.tensor(ids, dtype=torch.long, device=device)
    slot_of_expert = torch.tensor(slots, dtype=torch.long, device=device)
    experts.register_buffer("esft_expert_ids", index, persistent=False)
    experts.register_buffer("esft_slot_of_expert", slot_of_expert, persistent=False)
    for name in PROJECTIONS:
        full = getattr(experts, name)
        trained = full.detach()[index].to(dtype or full.dtype, copy=True)
        experts.register_parameter(TRAINED_PREFIX + name, nn.Parameter(trained))
    experts._esft_slots = slots
    experts._esft_hooks = [
        experts.register_state_dict_post_hook(_state_dict_with_trained_rows),
        experts.register_load_state_dict_pre_hook(_load_trained_rows),
    ]
    experts.forward = types.MethodType(split_experts_forward, experts)


def remove_expert_split(model: nn.Module) -> None:
    """Fold trained experts back into the fused tensors and restore the stock experts forward."""
    for module in model.modules():
        if not has_split(module):
            continue
        with torch.no_grad():
            for name in PROJECTIONS:
                getattr(module, name)[module.esft_expert_ids] = getattr(module, TRAINED_PREFIX + name).to(
                    getattr(module, name).dtype
                )
                delattr(module, TRAINED_PREFIX + name)
        for handle in module._esft_hooks:
            handle.remove()
        for attr in ("esft_expert_ids", "esft_slot_of_expert", "_esft_slots", "_esft_hooks", "forward"):
            delattr(module, attr)
    if hasattr(model, "esft_expert_config"):
        del model.esft_expert_config


def _state_dict_with_trained_rows(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
    # The merged copy is made in host memory: a GPU never holds a second copy of the experts. Sharded
    # (FSDP2 DTensor) tensors are gathered first (every rank runs this hook, as the gather needs).
    for name in PROJECTIONS:
        trained = state_dict.pop(prefix + TRAINED_PREFIX + name, None)
        if trained is None or prefix + name not in state_dict:
            continue
        merged = _on_host(state_dict[prefix + name], copy=True)
        merged[module.esft_expert_ids.cpu()] = _on_host(trained, copy=False).to(merged.dtype)
        state_dict[prefix + name] = merged


def _on_host(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):
        return t.full_tensor().cpu()
    return t.to("cpu", copy=copy)


def _load_trained_rows(module: nn.Module, state_dict: dict, prefix: str, *_args: Any) -> None:
    # A full state dict (the model's own keys) also fills the small trainable copies.
    for name in PROJECTIONS:
        full, trained = prefix + name, prefix + TRAINED_PREFIX + name
        if full in state_dict and trained not in state_dict:
            state_dict[trained] = state_dict[full][module.esft_expert_ids.to(state_dict[full].device)]


def split_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward with frozen and trained experts in separate tensors (same math as the stock one)."""
    if getattr(self.config, "_experts_implementation", None) == "eager" or not _grouped_mm_available(hidden_states):
        return _split_eager(self, hidden_states, top_k_index, top_k_weights)
    return _split_grouped(self, hidden_states, top_k_index, top_k_weights)


def _grouped_mm_available(x: torch.Tensor) -> bool:
    """torch has a grouped matmul kernel for this device (CPU from torch 2.9; CUDA from sm80)."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 0)


def _split_grouped(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    num_experts, num_slots = self.num_experts, self.esft_expert_ids.numel()
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    slots = self.esft_slot_of_expert[expert_ids]
    # One sort puts frozen pairs first (grouped by expert), then trained pairs (grouped by slot).
    group = torch.where(slots >= 0, num_experts + slots, expert_ids)
    group, order = torch.sort(group)
    counts = torch.bincount(group, minlength=num_experts + num_slots)
    num_frozen = int(counts[:num_experts].sum())  # one host sync per layer: grouped_mm needs the split point
    token_of_pair = order // top_k
    weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros_like(hidden_states)
    parts = (
        (slice(0, num_frozen), counts[:num_experts], self.gate_up_proj, self.down_proj),
        (slice(num_frozen, None), counts[num_experts:], self.esft_gate_up_proj, self.esft_down_proj),
    )
    for rows, group_counts, gate_up, down in parts:
        tokens = token_of_pair[rows]
        if tokens.numel() == 0:
            continue
        offsets = torch.cumsum(group_counts, dim=0, dtype=torch.int32)
        x = hidden_states[tokens].to(gate_up.dtype)
        h = self._apply_gate(_grouped_mm(x, gate_up.transpose(-2, -1), offsets))
        y = _grouped_mm(h, down.transpose(-2, -1), offsets) * weights[rows]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, w, offs=offsets)
    return torch._grouped_mm(x, w, offs=offsets)


def _split_eager(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        token_idx, k_pos = torch.where(top_k_index == expert)
        slot = self._esft_slots[expert]
        if slot >= 0:
            gate_up, down = self.esft_gate_up_proj[slot], self.esft_down_proj[slot]
        else:
            gate_up, down = self.gate_up_proj[expert], self.down_proj[expert]
        h = self._apply_gate(F.linear(hidden_states[token_idx].to(gate_up.dtype), gate_up))
        y = F.linear(h, down) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
