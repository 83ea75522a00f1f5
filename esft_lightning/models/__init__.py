"""MoE families: find any transformers MoE model's layers by structure, describe families, build tiny models."""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
from typing import Any

import torch
from torch import nn

from . import deepseek_v2, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import MoEFamily, MoELayer, UnsupportedModelError
from .discovery import LAYOUT_FLAGS, decoder_layers, discover_moe_layers, is_experts_module
from .locate import find_moe_model
from .overrides import REFUSED, TINY_FIXES
from .tiny import shrink_config_dict
from .verified import VERIFIED, VERIFIED_WITH

FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        *(m.FAMILY for m in (deepseek_v3, deepseek_v2, qwen3_moe, qwen2_moe, mixtral, olmoe)),
        *TINY_FIXES,
        *REFUSED,
    )
}
"""Families with something that cannot be discovered (scoring, shared experts, tiny config) or that are refused."""

__all__ = [
    "FAMILIES",
    "LAYOUT_FLAGS",
    "MoEFamily",
    "MoELayer",
    "UnsupportedModelError",
    "VERIFIED",
    "VERIFIED_WITH",
    "build_tiny_model",
    "causal_lm_moe_families",
    "decoder_layers",
    "enable_activation_checkpointing",
    "find_moe_layers",
    "find_moe_model",
    "get_family",
    "is_experts_module",
    "tiny_config",
]


@functools.cache
def causal_lm_moe_families() -> tuple[str, ...]:
    """Model types of the installed transformers whose causal LM is an MoE (routers recorded as ``router_logits``
    or experts decorated with ``use_experts_implementation``)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            cls = getattr(transformers, class_name)
            source = inspect.getsource(sys.modules[cls.__module__])
        except (AttributeError, ImportError, OSError, TypeError):
            continue  # a model class this installation cannot import (missing optional dependency)
        recorded = "router_logits" in (getattr(cls, "_can_record_outputs", None) or {})
        if recorded or "@use_experts_implementation" in source or model_type in FAMILIES:
            found.append(model_type)
    return tuple(sorted(found))


def _model_type(model_or_type: nn.Module | str) -> str:
    if isinstance(model_or_type, str):
        return model_or_type
    config = getattr(model_or_type, "config", None)
    return getattr(config, "model_type", None) or type(model_or_type).__name__


def _infer_scoring(config: Any) -> str | None:
    """The router's scoring function when the config names it (``scoring_func``), else None (inferred later)."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "scoring_func", None) if cfg is not None else None
        if isinstance(value, str) and value in ("softmax", "sigmoid", "sqrtsoftplus"):
            return value
    return None


def _unknown_family_message(model_type: str) -> str:
    """Why ``model_type`` is no family: the supported families of the installed transformers, close matches first."""
    supported = [f for f in causal_lm_moe_families() if f in VERIFIED]
    close = difflib.get_close_matches(model_type, supported, n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return (
        f"Unsupported MoE architecture {model_type!r}: not a causal-LM MoE family of the installed transformers"
        f"{hint}; supported families: {', '.join(supported)} (see docs/families.md)"
    )


def get_family(model_or_type: nn.Module | str) -> MoEFamily:
    """The family description of a model (or a ``model_type``); a clear error for unsupported ones.

    Families without a file in ``models/`` get a generic description (``discovered=True``): their MoE layers are
    found by structure, their router's scoring function from the config or from the router's own outputs.
    """
    model_type = _model_type(model_or_type)
    family = FAMILIES.get(model_type)
    if family is not None and family.unsupported:
        raise UnsupportedModelError(
            f"{model_type}: esft-lightning cannot train this family's experts: {family.unsupported}"
        )
    if isinstance(model_or_type, str):
        if family is None and model_type not in causal_lm_moe_families():
            raise UnsupportedModelError(_unknown_family_message(model_type))
        return family or MoEFamily(model_type, discovered=True)
    if family is None:
        if not any(is_experts_module(m) for m in model_or_type.modules()):
            if model_type in causal_lm_moe_families():
                discover_moe_layers(model_or_type, MoEFamily(model_type))  # raises the specific reason
            raise UnsupportedModelError(
                f"Unsupported MoE architecture {model_type!r}: it has no transformers fused experts module "
                "(`use_experts_implementation`), so no routed experts esft-lightning can find (supported families, "
                "e.g. deepseek_v3, mixtral, qwen3_moe: see docs/families.md)"
            )
        family = MoEFamily(model_type, scoring=_infer_scoring(model_or_type.config), discovered=True)
        if model_type not in VERIFIED:
            _warn_unverified(model_type)
    return family


@functools.cache
def _warn_unverified(model_type: str) -> None:
    """Once per family: a family newer than the project's checks is tried by structure, and the user is told so."""
    import warnings

    warnings.warn(
        f"{model_type}: this MoE family was not among those esft-lightning trained end to end (transformers "
        f"{VERIFIED_WITH} and older); its experts were found by structure. Check the selection and a few training "
        "steps before a long run, and report problems.",
        stacklevel=3,
    )


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every decoder layer whose MLP is an MoE block, with the model's own layer numbering."""
    return discover_moe_layers(model, get_family(model))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(family: str, vocab_size: int = 320, **overrides: Any) -> Any:
    """The config of a tiny random ``family`` model: the family's own config class, sizes shrunk generically."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    description = get_family(family)  # an unknown family names the supported ones, a refused one says why
    if family not in CONFIG_MAPPING:  # described here, but not in the installed transformers
        raise UnsupportedModelError(_unknown_family_message(family))
    special = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}  # the byte tokenizer's ids
    if description.tiny_config_is_complete:
        kwargs = {**description.tiny_config, "vocab_size": vocab_size, **special, **overrides}
        return AutoConfig.for_model(family, **kwargs)
    config_class = CONFIG_MAPPING[family]
    values = shrink_config_dict(config_class().to_dict())
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path"):
        values.pop(key, None)
    tokens = {"vocab_size": vocab_size, **special}
    for key, value in values.items():  # sub-configs of vision-language models share the tokenizer
        if isinstance(value, dict) and "vocab_size" in value:
            values[key] = {**value, **tokens}
    values = _merge(_merge(values, description.tiny_config), {**tokens, **overrides})
    return config_class(**values)


def build_tiny_model(
    family: str, vocab_size: int = 320, seed: int = 0, experts_implementation: str | None = None, **overrides: Any
) -> nn.Module:
    """A small randomly initialised causal LM of ``family`` (tests, quickstart, benchmarks)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    return AutoModelForCausalLM.from_config(config, **extra)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant), whatever the transformers 5.x."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
