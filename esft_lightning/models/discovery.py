"""Find a model's MoE layers by structure: transformers' fused experts modules, their routers and shared experts."""

from __future__ import annotations

from torch import nn

from .base import MoEFamily, MoELayer, UnsupportedModelError

# The layout flags transformers' `use_experts_implementation` decorator sets on every experts instance.
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def is_experts_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused experts module (its class decorated by
    ``use_experts_implementation``, so its forward dispatches through ``ExpertsInterface``)."""
    forward = type(module).forward
    qualname = getattr(getattr(forward, "__code__", None), "co_qualname", None)  # Python >= 3.11
    if qualname is not None:
        decorated = "use_experts_implementation" in qualname
    else:  # the wrapper keeps the class's own forward as __wrapped__ and sets the layout flags on the instance
        decorated = hasattr(forward, "__wrapped__") and all(hasattr(module, flag) for flag in LAYOUT_FLAGS)
    return decorated and hasattr(module, "num_experts")


def _router_recorders(model: nn.Module) -> list[tuple[type, int]]:
    """Router classes (and which output holds their logits) from transformers' ``_can_record_outputs``."""
    found = []
    for module in model.modules():
        recorders = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        for recorder in recorders if isinstance(recorders, (list, tuple)) else [recorders]:
            target = getattr(recorder, "target_class", recorder)
            if isinstance(target, type) and (target, getattr(recorder, "index", 0)) not in found:
                found.append((target, getattr(recorder, "index", 0)))
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layer list (also inside vision-language models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder layer list (`layers`) found: not a causal LM esft-lightning can train"
    )


def _find_router(layer: nn.Module, block: nn.Module, recorders: list[tuple[type, int]]) -> tuple[nn.Module | None, int]:
    for scope in (block, layer):  # the router sits in the MoE block, in a few families on the decoder layer
        for module in scope.modules():
            for cls, index in recorders:
                if isinstance(module, cls):
                    return module, index
    for name in ("gate", "router"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module, 0
    return None, 0


def _shared_modules(block: nn.Module, family: MoEFamily) -> list[nn.Module]:
    if family.shared_expert_attrs is not None:
        return [getattr(block, a) for a in family.shared_expert_attrs if getattr(block, a, None) is not None]
    return [m for name, m in block.named_children() if "shared" in name]


def discover_moe_layers(model: nn.Module, family: MoEFamily) -> list[MoELayer]:
    """Every decoder layer holding a fused experts module, with the model's own layer numbering."""
    model_type = family.model_type
    if family.unsupported:
        raise UnsupportedModelError(
            f"{model_type}: esft-lightning cannot train this family's experts: {family.unsupported}"
        )
    layers = decoder_layers(model)
    recorders = _router_recorders(model)
    found = []
    for index, layer in enumerate(layers):
        named = [(n, m) for n, m in layer.named_modules() if is_experts_module(m)]
        if not named:
            continue
        if len(named) > 1:
            raise UnsupportedModelError(
                f"{model_type}: decoder layer {index} holds {len(named)} experts modules "
                f"({', '.join(n for n, _ in named)}); esft-lightning supports one routed-experts module per layer"
            )
        name, experts = named[0]
        block = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        router, output_index = _find_router(layer, block, recorders)
        found.append(MoELayer(index, block, router, experts, _shared_modules(block, family), family, output_index))
    if not found:
        if any(is_experts_module(m) for m in model.modules()):
            raise UnsupportedModelError(f"{model_type}: its experts modules are outside the text decoder's layers")
        if any(isinstance(m, cls) for m in model.modules() for cls, _ in recorders):
            raise UnsupportedModelError(
                f"{model_type}: routed experts are not a transformers fused experts module "
                "(`use_experts_implementation`), the layout esft-lightning trains"
            )
        raise ValueError(f"{type(model).__name__} ({model_type}) has no MoE layers")
    return found
