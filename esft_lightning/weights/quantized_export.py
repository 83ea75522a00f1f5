"""Write a merged model in its quantized base's own format: untouched tensors keep the base's bytes, the trained
ones are re-quantized in the same blocks, so serving engines load it as they load the base."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models import find_moe_layers
from .loading import load_model
from .quantized import (
    dequantize_fp8_rows,
    dequantize_mxfp4,
    quantize_fp8_blocks,
    quantize_mxfp4,
    quantized_tensor_names,
    read_quantization,
)
from .weight_files import SafetensorsFile

__all__ = ["RequantizationReport", "write_fp8_checkpoint", "write_in_base_format"]


@dataclass
class RequantizationReport:
    """What re-quantizing the trained tensors cost."""

    requantized: list[str]
    """Stored tensors (or ``name[expert]`` rows of MXFP4 experts) whose values changed and were re-quantized."""
    max_relative_error: float
    """max |dequantized(re-quantized) - merged| / max |merged| over those tensors (0.0 when none changed)."""

    def describe(self) -> str:
        return (
            f"{len(self.requantized)} trained tensors re-quantized in the base's blocks; max relative error "
            f"{self.max_relative_error:.2e} (every other tensor keeps the base's bytes)"
        )


def write_in_base_format(out_dir: str | Path, base_dir: str | Path, transposed: set[str]) -> RequantizationReport:
    """Rewrite the plain merged model in ``out_dir`` (``save_pretrained``: the base's stored key names) in the
    quantization of ``base_dir``; ``transposed``: ``quantized.transposed_parameters`` of the merged model.

    A tensor equal to the base's dequantized value (in the merged dtype) is written with the base's own quantized
    bytes and scales; a changed one is re-quantized. Files are replaced atomically."""
    out, base = Path(out_dir), Path(base_dir)
    scheme = read_quantization(base)
    if scheme is None:
        raise ValueError(f"{base}: not a quantized checkpoint (config.json has no quantization_config)")
    handles = {f.name: SafetensorsFile(f) for f in sorted(base.glob("*.safetensors"))}
    where = {key: name for name, handle in handles.items() for key in handle.keys()}
    pairs = quantized_tensor_names(list(where), scheme)

    def stored(key: str) -> torch.Tensor:
        return handles[where[key]].read(key)

    requantized, worst = [], 0.0
    weight_map = {}
    for file in sorted(out.glob("*.safetensors")):
        written = {}
        for key, value in load_file(file).items():
            if key not in pairs:
                written[key] = value
                continue
            kind, value_key, scale_key = pairs[key]
            if kind == "fp8":
                weight, scale = stored(value_key), stored(scale_key)
                original = dequantize_fp8_rows(
                    weight, lambda rows, s=scale: s[rows], range(weight.shape[0]), scheme.block_size
                )
                if not torch.equal(original.to(value.dtype), value):
                    weight, scale = quantize_fp8_blocks(value, scheme.block_size)
                    again = dequantize_fp8_rows(
                        weight, lambda rows, s=scale: s[rows], range(weight.shape[0]), scheme.block_size
                    )
                    worst = max(worst, _relative_error(again, value))
                    requantized.append(key)
                written[value_key], written[scale_key] = weight, scale
            else:
                blocks, scales = stored(value_key), stored(scale_key)
                merged = value.transpose(1, 2) if key in transposed else value  # [E, out, in], as stored
                original = dequantize_mxfp4(blocks, scales)
                blocks, scales = blocks.clone(), scales.clone()
                for expert in range(merged.shape[0]):
                    if torch.equal(original[expert].to(merged.dtype), merged[expert]):
                        continue
                    new_blocks, new_scales = quantize_mxfp4(merged[expert : expert + 1])
                    blocks[expert], scales[expert] = new_blocks[0], new_scales[0]
                    again = dequantize_mxfp4(new_blocks, new_scales)[0]
                    worst = max(worst, _relative_error(again, merged[expert]))
                    requantized.append(f"{key}[{expert}]")
                written[value_key], written[scale_key] = blocks, scales
        temporary = file.with_name(file.name + ".tmp")
        save_file(written, temporary, metadata={"format": "pt"})
        temporary.replace(file)
        weight_map.update(dict.fromkeys(written, file.name))
    index = out / "model.safetensors.index.json"
    if index.exists():
        content = json.loads(index.read_text())
        content["weight_map"] = weight_map
        index.write_text(json.dumps(content, indent=2))
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = (
        base_config.get("quantization_config") or base_config["text_config"]["quantization_config"]
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return RequantizationReport(requantized, worst)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.float() - want.float()).abs().max().item() / scale


def write_fp8_checkpoint(src_dir: str | Path, dst_dir: str | Path, block_size: tuple[int, int] = (128, 128)) -> int:
    """Write the plain checkpoint ``src_dir`` as DeepSeek-V3 ships: every 2D weight of the decoder layers but the
    routers in block FP8 with ``weight_scale_inv``, the rest as stored (benchmarks, the GPU check). Returns the
    number of tensors quantized."""
    src, dst = Path(src_dir), Path(dst_dir)
    meta = load_model(str(src), on_meta=True)
    routers = {
        f"{name}.{leaf}"
        for layer in find_moe_layers(meta)
        if layer.router is not None
        for name, module in meta.named_modules()
        if module is layer.router
        for leaf, _ in module.named_parameters(recurse=False)
    }
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weight_map, quantized = {}, 0
    for file in sorted(src.glob("*.safetensors")):
        written = {}
        for key, value in load_file(file).items():
            if ".layers." in key and key.endswith(".weight") and value.dim() == 2 and key not in routers:
                written[key], written[key + "_scale_inv"] = quantize_fp8_blocks(value, block_size)
                quantized += 1
            else:
                written[key] = value
        save_file(written, dst / file.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(written, file.name))
    if (src / "model.safetensors.index.json").exists():
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block_size)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return quantized
