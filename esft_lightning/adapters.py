"""Save / load / merge the trained experts as a small adapter: expert_cfg.json + adapter.safetensors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .distributed import full_on_host
from .experts import remove_expert_split, validate_expert_config
from .experts_forward import TRAINED_PREFIX, expert_param_names
from .files import atomic_write_dir
from .models import find_moe_layers
from .selection import ExpertConfig

CONFIG_FILE, WEIGHTS_FILE = "expert_cfg.json", "adapter.safetensors"
# ESFT's released adapters (DeepSeek-V2-Lite remote code): one tensor per expert and projection.
_RELEASED_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors keyed by the model's own names; routed experts as [k, ...] rows in config order."""
    config: ExpertConfig | None = getattr(model, "esft_expert_config", None)
    if config is None:
        raise ValueError("model has no expert selection applied (apply_expert_config first)")
    layer_of = {id(layer.experts): layer.index for layer in find_moe_layers(model)}
    tensors: dict[str, torch.Tensor] = {}
    experts_names = set()
    for name, module in model.named_modules():
        if id(module) not in layer_of:
            continue
        experts_names.add(name)
        ids = config.experts.get(layer_of[id(module)], [])
        for proj in expert_param_names(module):
            trained = getattr(module, TRAINED_PREFIX + proj, None)
            fused = getattr(module, proj)
            if trained is not None:
                tensors[f"{name}.{proj}"] = full_on_host(trained).contiguous()
            elif fused.requires_grad:  # every expert of the layer trained
                tensors[f"{name}.{proj}"] = full_on_host(fused)[torch.tensor(ids)].contiguous()
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if p.requires_grad and owner not in experts_names:
            tensors[name] = full_on_host(p).contiguous()
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``expert_cfg.json`` (ESFT format) and ``adapter.safetensors`` (only trained tensors) atomically."""
    path = Path(path)
    config = model.esft_expert_config if hasattr(model, "esft_expert_config") else None
    tensors = adapter_tensors(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return path  # every rank gathered (collective); rank 0 writes
    config_dict = {**config.to_dict(), "model_type": model.config.model_type}

    def fill(folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2) + "\n")
        metadata = {"format": "esft-lightning", "model_type": model.config.model_type}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)

    atomic_write_dir(path, fill)
    return path


def _read_adapter(path: Path) -> tuple[ExpertConfig, dict[str, torch.Tensor], dict[str, str]]:
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not an adapter: {CONFIG_FILE} is missing")
    config = ExpertConfig.load(cfg_file)
    files = [weights_file] if weights_file.exists() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} is not an adapter: no .safetensors weights next to {CONFIG_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            metadata.update(handle.metadata() or {})
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return config, _fuse_released_layout(tensors, config), metadata


def _fuse_released_layout(tensors: dict[str, torch.Tensor], config: ExpertConfig) -> dict[str, torch.Tensor]:
    """Per-expert ``experts.M.{gate,up,down}_proj.weight`` -> fused [k, 2I, H] / [k, H, I] in config order."""
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, t in tensors.items():
        m = _RELEASED_KEY.match(key)
        if m is None:
            out[key] = t
            continue
        per_expert.setdefault(m["prefix"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = t
    for prefix, experts in per_expert.items():
        found = re.search(r"layers\.(\d+)\.", prefix)
        if found is None:
            raise ValueError(f"adapter tensor {prefix}.*: no decoder layer index (layers.N) in its name")
        layer = int(found[1])
        ids = config.experts.get(layer, [])
        if sorted(experts) != sorted(ids):
            raise ValueError(
                f"adapter layer {layer}: tensors for experts {sorted(experts)}, but {CONFIG_FILE} lists {ids}"
            )
        for e in ids:
            if set(experts[e]) != {"gate", "up", "down"}:
                raise ValueError(f"adapter layer {layer} expert {e}: needs gate_proj, up_proj and down_proj weights")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down"] for e in ids])
    return out


@torch.no_grad()
def load_adapter(base_model: nn.Module, path: str | os.PathLike) -> ExpertConfig:
    """Write an adapter's trained values into ``base_model`` in place (also ESFT's released layout).

    Afterwards ``base_model`` computes what the trained model computed. Mismatches (model family,
    layers, expert counts, shapes, unknown tensors) raise an error naming what differs; nothing is
    written into the model unless the whole adapter fits.
    """
    path = Path(path)
    config, tensors, metadata = _read_adapter(path)
    model_type = base_model.config.model_type
    saved_type = metadata.get("model_type") or config.meta.get("model_type")
    if saved_type and saved_type != model_type:
        raise ValueError(f"adapter {path} was trained on a {saved_type} model, not {model_type}")
    layers = find_moe_layers(base_model)
    validate_expert_config(layers, config)
    params = dict(base_model.named_parameters())
    experts_names = {n: m for n, m in base_model.named_modules() if any(m is layer.experts for layer in layers)}
    index_of = {n: next(layer.index for layer in layers if layer.experts is m) for n, m in experts_names.items()}
    writes: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    for key, value in tensors.items():
        owner, _, proj = key.rpartition(".")
        if owner in experts_names and proj in expert_param_names(experts_names[owner]):
            ids = config.experts.get(index_of[owner], [])
            target = getattr(experts_names[owner], proj)
            expected = (len(ids), *target.shape[1:])
            if tuple(value.shape) != expected:
                raise ValueError(f"adapter tensor {key}: shape {tuple(value.shape)}, the model expects {expected}")
            writes.append((target, torch.tensor(ids, dtype=torch.long), value))
        elif key in params:
            if params[key].shape != value.shape:
                raise ValueError(
                    f"adapter tensor {key}: shape {tuple(value.shape)}, the model has {tuple(params[key].shape)}"
                )
            writes.append((params[key], None, value))
        else:
            raise ValueError(f"adapter tensor {key} matches no parameter of this {model_type} model")
    for name in experts_names:
        if config.experts.get(index_of[name]):
            missing = [p for p in expert_param_names(experts_names[name]) if f"{name}.{p}" not in tensors]
            if missing:
                raise ValueError(
                    f"adapter {path}: {CONFIG_FILE} selects experts in layer {index_of[name]}, "
                    f"but the weights lack {name}.{missing[0]}"
                )
    remove_expert_split(base_model)  # only now: every check passed, the model is about to change
    for target, ids, value in writes:
        value = value.to(target.device, target.dtype)
        if ids is None:
            target.copy_(value)
        else:
            target[ids.to(target.device)] = value
    return config


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str, trust_remote_code: bool = False) -> Path:
    """Base model directory + adapter -> a standard ``save_pretrained`` directory (with tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=trust_remote_code, dtype="auto")
    load_adapter(model, adapter_dir)
    out = Path(out_dir)
    model.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code).save_pretrained(out)
    except (OSError, ValueError):
        pass  # base directory without a tokenizer: the merged model is still complete
    return out
