"""Save / load / merge the trained experts as a small adapter: expert_cfg.json + adapter.safetensors."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .distributed.expert_parallel import gather_expert_rows
from .dtensors import full_on_host
from .experts.split import remove_expert_split, validate_expert_config
from .experts.state import TRAINED_PREFIX, expert_config_of, expert_param_names, expert_shard
from .files import atomic_write_dir
from .models import find_moe_layers
from .selection.rules import CONFIG_FILE, ExpertConfig
from .weights.loading import load_model
from .weights.quantized import read_quantization, transposed_parameters
from .weights.quantized_export import write_in_base_format

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter.safetensors"  # beside selection.CONFIG_FILE, the expert config
# ESFT's released adapters (DeepSeek-V2-Lite remote code): one tensor per expert and projection.
_RELEASED_KEY = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors keyed by the model's own names; routed experts as [k, ...] rows in config order."""
    config: ExpertConfig | None = expert_config_of(model)
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
        # Expert parallel: this rank holds its own experts only; the rows are gathered from their owners.
        parallel = expert_shard(module) is not None
        for proj in expert_param_names(module):
            trained = getattr(module, TRAINED_PREFIX + proj, None)
            fused = getattr(module, proj)
            if trained is not None:
                rows = full_on_host(trained)
                if parallel:
                    rows = gather_expert_rows(module, TRAINED_PREFIX + proj, rows)
                tensors[f"{name}.{proj}"] = rows.contiguous()
            elif fused.requires_grad:  # every expert of the layer trained
                every = gather_expert_rows(module, proj, full_on_host(fused)) if parallel else full_on_host(fused)
                tensors[f"{name}.{proj}"] = every[torch.tensor(ids)].contiguous()
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if p.requires_grad and owner not in experts_names:
            tensors[name] = full_on_host(p).contiguous()
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``expert_cfg.json`` (ESFT format) and ``adapter.safetensors`` (only trained tensors) atomically."""
    path = Path(path)
    config = expert_config_of(model)
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


@dataclass
class _Write:
    """One adapter tensor bound for the model: whole (``rows`` None) or into the rows of the fused experts."""

    key: str
    target: torch.Tensor
    rows: list[int] | None
    value: torch.Tensor
    layer: int | None = None


def _plan(base_model: nn.Module, path: Path) -> tuple[ExpertConfig, list[_Write]]:
    """Read an adapter and check that all of it fits ``base_model``; changes nothing."""
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
    writes: list[_Write] = []
    for key, value in tensors.items():
        owner, _, proj = key.rpartition(".")
        if owner in experts_names and proj in expert_param_names(experts_names[owner]):
            ids = config.experts.get(index_of[owner], [])
            target = getattr(experts_names[owner], proj)
            expected = (len(ids), *target.shape[1:])
            if tuple(value.shape) != expected:
                raise ValueError(f"adapter tensor {key}: shape {tuple(value.shape)}, the model expects {expected}")
            writes.append(_Write(key, target, list(ids), value, index_of[owner]))
        elif key in params:
            if params[key].shape != value.shape:
                raise ValueError(
                    f"adapter tensor {key}: shape {tuple(value.shape)}, the model has {tuple(params[key].shape)}"
                )
            writes.append(_Write(key, params[key], None, value))
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
    return config, writes


def _write(target: torch.Tensor, row: int | None, value: torch.Tensor) -> None:
    value = value.to(target.device, target.dtype)
    if row is None:
        target.copy_(value)
    else:
        target[row] = value


@torch.no_grad()
def load_adapter(base_model: nn.Module, path: str | os.PathLike) -> ExpertConfig:
    """Write an adapter's trained values into ``base_model`` in place (also ESFT's released layout).

    Afterwards ``base_model`` computes what the trained model computed. Mismatches (model family,
    layers, expert counts, shapes, unknown tensors) raise an error naming what differs; nothing is
    written into the model unless the whole adapter fits.
    """
    return load_adapters(base_model, [path])[0]


OverlapPolicy = Literal["refuse", "first", "average"]
MergeFormat = Literal["bf16", "original"]


@torch.no_grad()
def load_adapters(
    base_model: nn.Module, paths: list[str | os.PathLike], overlap: OverlapPolicy = "refuse"
) -> list[ExpertConfig]:
    """Write several task adapters into one model: each keeps its experts, so the model serves every task.

    ESFT's expert sets of different tasks rarely overlap. Where two adapters train the same expert (or the
    same shared / non-expert tensor), ``overlap`` decides: ``refuse`` (default) raises an error naming the
    layers, experts and adapters; ``first`` keeps the first adapter's values; ``average`` writes their mean.
    Every adapter is checked before anything is written.
    """
    if overlap not in ("refuse", "first", "average"):
        raise ValueError(f"overlap must be refuse, first or average, got {overlap!r}")
    plans = [(Path(p), *_plan(base_model, Path(p))) for p in paths]
    # (tensor, row) -> the write that targets it and every adapter's value for it, in adapter order
    slots: dict[tuple[int, int | None], tuple[_Write, list[tuple[int, torch.Tensor]]]] = {}
    for i, (_path, _config, writes) in enumerate(plans):
        for w in writes:
            for r, row in enumerate(w.rows if w.rows is not None else [None]):
                value = w.value if row is None else w.value[r]
                slots.setdefault((id(w.target), row), (w, []))[1].append((i, value))
    shared = {key: (w, values) for key, (w, values) in slots.items() if len(values) > 1}
    if shared and overlap == "refuse":
        raise ValueError(_overlap_message(shared, [p for p, _, _ in plans]))
    remove_expert_split(base_model)  # only now: every check passed, the model is about to change
    for (_tensor, row), (w, values) in slots.items():
        if overlap == "average" and len(values) > 1:
            _write(w.target, row, torch.stack([v.float() for _, v in values]).mean(0))
        else:
            _write(w.target, row, values[0][1])
    return [config for _, config, _ in plans]


def _overlap_message(shared: dict, paths: list[Path]) -> str:
    experts: dict[tuple[int, tuple[int, ...]], set[int]] = {}
    whole: dict[str, tuple[int, ...]] = {}
    for (_tensor, row), (w, values) in shared.items():
        owners = tuple(i for i, _ in values)
        if row is None:
            whole[w.key] = owners
        else:
            experts.setdefault((w.layer, owners), set()).add(row)
    names = [str(p) for p in paths]
    parts = [
        f"layer {layer} experts {sorted(ids)} (adapters {', '.join(names[i] for i in owners)})"
        for (layer, owners), ids in sorted(experts.items())
    ]
    parts += [f"{key} (adapters {', '.join(names[i] for i in owners)})" for key, owners in sorted(whole.items())]
    return (
        "adapters overlap: " + "; ".join(parts) + ". Each expert can carry one task: pass overlap='first' (keep the "
        "first adapter's values) or overlap='average' (their mean) to merge anyway (esft merge --overlap ...)"
    )


def merge_adapter(
    base_dir: str,
    adapter_dir: str | list[str],
    out_dir: str,
    trust_remote_code: bool = False,
    overlap: OverlapPolicy = "refuse",
    format: MergeFormat = "bf16",
) -> Path:
    """Base model directory + one or more adapters -> a standard ``save_pretrained`` directory (with tokenizer).

    A quantized base (block FP8, MXFP4) is dequantized while it loads, like every other load path. ``format``:
    ``bf16`` writes the merged model in bfloat16 without a quantization config; ``original`` writes the base's own
    format (``quantized_export.write_in_base_format``: untouched tensors keep the base's bytes, trained ones are
    re-quantized in the same blocks; the error is logged). A plain base is written in its own dtype either way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if format not in ("bf16", "original"):
        raise ValueError(f"format must be 'bf16' or 'original', got {format!r}")
    quantized = read_quantization(base_dir) is not None
    if quantized:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        dtype = (getattr(config, "dtype", None) or torch.bfloat16) if format == "original" else torch.bfloat16
        model = load_model(base_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=trust_remote_code, dtype="auto")
    load_adapters(model, [adapter_dir] if isinstance(adapter_dir, (str, os.PathLike)) else list(adapter_dir), overlap)
    out = Path(out_dir)
    model.save_pretrained(out)
    if quantized and format == "original":
        log.info(f"{out}: {write_in_base_format(out, base_dir, transposed_parameters(model)).describe()}")
    try:
        AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code).save_pretrained(out)
    except (OSError, ValueError):
        pass  # base directory without a tokenizer: the merged model is still complete
    return out
