"""Find the Hugging Face MoE model inside any module (e.g. a researcher's own LightningModule) by structure."""

from __future__ import annotations

from torch import nn

from .discovery import is_experts_module

__all__ = ["find_moe_model"]


def find_moe_model(root: nn.Module, model_attr: str | None = None) -> nn.Module | None:
    """The one transformers model inside ``root`` that holds MoE experts, whatever attribute holds it.

    Candidates are ``PreTrainedModel`` submodules containing a fused experts module; one nested inside another
    (a causal LM's base model) counts as the outer one. ``model_attr`` (a dotted path such as ``student`` or
    ``net.lm``) picks one explicitly. Returns None when ``root`` holds no MoE model (yet: it may be built in
    ``configure_model``); raises ``ValueError`` naming the candidates when there are several.
    """
    if model_attr:
        model = root
        for name in model_attr.split("."):
            if not hasattr(model, name):
                raise ValueError(f"model_attr={model_attr!r}: {type(root).__name__} has no submodule {model_attr!r}")
            model = getattr(model, name)
            if model is None:
                return None  # not built yet (configure_model builds it)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model_attr={model_attr!r}: {type(model).__name__} is not a torch module")
        if not any(is_experts_module(m) for m in model.modules()):
            raise ValueError(
                f"model_attr={model_attr!r}: {type(model).__name__} holds no MoE experts module (transformers fused "
                "experts): not a model esft-lightning can select experts in"
            )
        return model
    from transformers import PreTrainedModel

    named = [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, PreTrainedModel) and any(is_experts_module(m) for m in module.modules())
    ]
    outermost = [
        (name, module)
        for name, module in named
        if not any(other is not module and any(m is module for m in other.modules()) for _, other in named)
    ]
    if len(outermost) > 1:
        names = ", ".join(repr(name or "<root>") for name, _ in outermost)
        raise ValueError(
            f"{type(root).__name__} holds {len(outermost)} MoE models ({names}): say which one to fine-tune with "
            f"model_attr=... (e.g. model_attr={outermost[0][0]!r})"
        )
    return outermost[0][1] if outermost else None
