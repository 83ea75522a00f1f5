"""Registry of supported MoE families: find a model's MoE layers and build tiny random models."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import deepseek_v2, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import MoEFamily, MoELayer

FAMILIES: dict[str, MoEFamily] = {
    m.FAMILY.model_type: m.FAMILY for m in (deepseek_v3, deepseek_v2, qwen3_moe, qwen2_moe, mixtral, olmoe)
}

__all__ = [
    "FAMILIES",
    "MoEFamily",
    "MoELayer",
    "get_family",
    "find_moe_layers",
    "build_tiny_model",
    "enable_activation_checkpointing",
]


def get_family(model_or_type: nn.Module | str) -> MoEFamily:
    """The family description of a model (or a ``model_type``); a clear error for unsupported ones."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported MoE architecture {model_type!r}. Supported model types: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder `layers` ModuleList: not a supported causal LM")
    return layers


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every decoder layer whose MLP is an MoE block, with the model's own layer numbering."""
    family = get_family(model)
    found = []
    for index, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if block is None or not hasattr(block, family.experts_attr) or not hasattr(block, family.router_attr):
            continue
        experts = getattr(block, family.experts_attr)
        if not hasattr(experts, "gate_up_proj") or getattr(experts, "is_transposed", False):
            raise ValueError(
                f"layer {index}: routed experts of {family.model_type} are not fused [E, 2I, H] tensors; "
                "this transformers version stores them in a layout esft-lightning does not support"
            )
        shared = [getattr(block, a) for a in family.shared_expert_attrs if getattr(block, a, None) is not None]
        found.append(MoELayer(index, block, getattr(block, family.router_attr), experts, shared, family))
    if not found:
        raise ValueError(f"{type(model).__name__} ({family.model_type}) has no MoE layers")
    return found


def build_tiny_model(
    family: str, vocab_size: int = 320, seed: int = 0, experts_implementation: str | None = None, **overrides: Any
) -> nn.Module:
    """A small randomly initialised causal LM of ``family`` (tests, quickstart, benchmarks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    special = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}  # the byte tokenizer's ids
    kwargs = {**get_family(family).tiny_config, "vocab_size": vocab_size, **special, **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    return AutoModelForCausalLM.from_config(config, **extra)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant), whatever the transformers 5.x."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
