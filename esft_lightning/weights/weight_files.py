"""Read a model's weights from its safetensors files by parameter name, only the rows asked for."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quantized import (
    check_fp8_scale_shape,
    dequantize_fp8_rows,
    dequantize_mxfp4,
    quantized_tensor_names,
    read_quantization,
    transposed_parameters,
)

__all__ = ["RowsSpec", "SafetensorsFile", "UnusedWeightsError", "WeightFiles", "has_safetensors", "return_freed_memory"]

logger = logging.getLogger(__name__)


class UnusedWeightsError(ValueError):
    """Tensors stored in a model directory that no parameter or buffer of the model reads."""


RowsSpec = range | Sequence[int] | None
"""Rows of dim 0 to read: a range (contiguous: one slice read), a list of indices, or None for all."""


def has_safetensors(directory: str | Path | None) -> bool:
    """Whether ``directory`` holds the model as safetensors files (what ``WeightFiles`` reads per shard)."""
    return directory is not None and Path(directory).is_dir() and any(Path(directory).glob("*.safetensors"))


class WeightFiles(Mapping[str, torch.Tensor]):
    """The tensors of a model directory's safetensors files, under the model's own parameter names.

    transformers 5 stores fused experts one expert at a time on disk (``experts.0.gate_proj.weight``, ...) and
    fuses them while loading (``experts.gate_up_proj``, [E, 2F, D]). This reader applies the same conversions
    (transformers' own weight-conversion mapping for ``model``) to the rows asked for only: ``read(name, rows)``
    touches just those rows' bytes of the memory-mapped files, so a rank that owns experts 8..15 of a layer never
    reads experts 0..7, and nothing is held in memory between calls. As a ``Mapping`` (``files[name]``) it serves
    whole tensors one at a time, which is how profiling streams one layer's weights after another.

    Quantized checkpoints (``quantization_config`` in ``config.json``: block FP8, MXFP4) are dequantized as they
    are read, rows included (``quantized.py``): their scale tensors are consumed by their weights.

    Nothing stored is ignored silently: a tensor that no parameter or buffer reads raises ``UnusedWeightsError``
    naming it, except whole decoder layers past the model's last one (DeepSeek-V3's multi-token-prediction layer
    ``model.layers.61``), skipped with one log line; a scale whose grid does not match its weight, or an FP8
    weight without its scale, is a ``ValueError`` naming both.

    ``model`` only names the parameters (it may live on the meta device). Raises ``FileNotFoundError`` for a
    directory without safetensors files and ``KeyError`` naming the file for a parameter no file holds.
    """

    def __init__(self, directory: str | Path, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.directory = Path(directory)
        files = _safetensors_files(self.directory)
        self._handles = {f.name: SafetensorsFile(f) for f in files}
        where = {key: name for name, handle in self._handles.items() for key in handle.keys()}
        self.scheme = read_quantization(self.directory)
        self._quantized = self._pair_quantized(where)
        self._transposed = transposed_parameters(model)  # MXFP4 files store [E, out, in]
        self.skipped = _layers_past_the_model(where, model)
        if self.skipped:
            layers = sorted({int(re.search(r"\.layers\.(\d+)\.", k)[1]) for k in self.skipped})
            logger.info(
                "%s: skipping %d stored tensors of decoder layers %s, which this architecture has no place for "
                "(e.g. DeepSeek-V3's multi-token-prediction layer)",
                self.directory,
                len(self.skipped),
                layers,
            )
            skipped = set(self.skipped)
            where = {k: v for k, v in where.items() if k not in skipped}
        aliases = _names_by_tensor(model)
        wanted = {name for names in aliases for name in names}
        present = dict.fromkeys(wanted, True)  # (rename_source_key only asks whether a name exists)
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        self._plain: dict[str, tuple[str, str]] = {}  # model name -> (file, key)
        self._fused: dict[str, tuple[Any, dict[str, list[tuple[str, str]]]]] = {}  # name -> converter, sources
        self.unused: list[str] = []
        prefix = getattr(model, "base_model_prefix", None)
        for key in sorted(where, key=dot_natural_key):  # natural order: expert 2 before expert 10
            target, pattern = rename_source_key(key, renamings, converters, prefix, present)
            if target not in present and key in present:
                target, pattern = key, None
            if target not in present:
                self.unused.append(key)
            elif pattern is None:
                self._plain[target] = (where[key], key)
            else:
                _, sources = self._fused.setdefault(target, (by_pattern[pattern], defaultdict(list)))
                sources[pattern].append((where[key], key))
        # Tied parameters (lm_head tied to the embeddings) are stored once, under any of their names.
        self._alias: dict[str, str] = {}
        for names in aliases:
            stored = next((n for n in names if n in self._plain or n in self._fused), None)
            for name in names:
                if stored is not None:
                    self._alias[name] = stored
        self.missing = sorted(name for name in wanted if name not in self._alias)
        if self.unused:
            shown = ", ".join(self.unused[:8]) + (f" and {len(self.unused) - 8} more" if len(self.unused) > 8 else "")
            raise UnusedWeightsError(
                f"{self.directory}: {len(self.unused)} stored tensors are read by no parameter or buffer of the "
                f"{type(model).__name__}: {shown} (a checkpoint of another architecture or config, or a storage "
                "format esft-lightning does not know)"
            )

    def _pair_quantized(self, where: dict[str, str]) -> dict[str, tuple[str, str, str, str]]:
        """Quantized tensors by the name they are read under -> (kind, value key, scale key, scale file); their
        stored keys are replaced in ``where`` by that name. Checks scale grids and unpaired FP8 weights."""
        pairs = quantized_tensor_names(list(where), self.scheme)
        out = {}
        for name, (kind, value_key, scale_key) in pairs.items():
            value_file, scale_file = where.pop(value_key), where.pop(scale_key)
            if kind == "fp8":
                check_fp8_scale_shape(
                    self._handles[value_file].shape(value_key),
                    self._handles[scale_file].shape(scale_key),
                    self.scheme.block_size,
                    value_key,
                    scale_key,
                )
            where[name] = value_file
            out[name] = (kind, value_key, scale_key, scale_file)
        for key, file in where.items():
            if key not in out and self._handles[file].dtype_name(key).startswith("F8_"):
                raise ValueError(
                    f"{self.directory}/{file}: {key} is stored in FP8 without a `{key}_scale_inv` scale (or the "
                    "config.json has no fp8 quantization_config): its raw values are not the weights"
                )
        return out

    def _read_key(self, file: str, key: str, rows: RowsSpec = None) -> torch.Tensor:
        """Stored tensor ``key`` (or ``rows`` of it): as stored, or dequantized to float32 when it is quantized."""
        quantized = self._quantized.get(key)
        if quantized is None:
            return self._handles[file].read(key, rows)
        kind, value_key, scale_key, scale_file = quantized
        if kind == "fp8":
            weight = self._handles[file].read(value_key, rows)
            rows = range(self._handles[file].shape(value_key)[0]) if rows is None else rows
            block = self.scheme.block_size
            return dequantize_fp8_rows(weight, lambda b: self._handles[scale_file].read(scale_key, b), rows, block)
        value = dequantize_mxfp4(
            self._handles[file].read(value_key, rows), self._handles[scale_file].read(scale_key, rows)
        )
        return value.transpose(1, 2).contiguous() if key in self._transposed else value

    # -- Mapping: whole tensors by name ------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._alias)

    def __len__(self) -> int:
        return len(self._alias)

    def __contains__(self, name: object) -> bool:
        return name in self._alias

    # -- reading ------------------------------------------------------------------------------------
    def read(self, name: str, rows: RowsSpec = None) -> torch.Tensor:
        """Parameter ``name`` (the model's naming) as stored, or only ``rows`` of its dim 0, in the file's dtype
        (float32 for quantized tensors, dequantized)."""
        return_freed_memory()  # the previous read's buffers, freed by now
        stored = self._alias.get(name)
        if stored is None:
            raise KeyError(f"no safetensors file in {self.directory} holds {name!r}")
        if stored in self._plain:
            file, key = self._plain[stored]
            return self._read_key(file, key, rows)
        if rows is not None and len(rows) == 0:  # a rank may own no row of a small tensor
            return self.read(name, [0])[0:0]
        converter, sources = self._fused[stored]
        count = len(next(iter(sources.values())))
        if rows is not None and any(not 0 <= i < count for i in rows):
            raise IndexError(f"{name}: rows {rows} out of range, {self.directory} holds {count}")
        fresh = copy.deepcopy(converter)  # a converter collects tensors: one per read
        for pattern in fresh.source_patterns:
            listed = sources.get(pattern, [])
            for index in range(len(listed)) if rows is None else rows:
                file, key = listed[index]
                fresh.add_tensor(stored, key, pattern, lambda f=file, k=key: self._read_key(f, k))
        converted = fresh.convert(stored)
        value = converted[stored]
        return value[0] if isinstance(value, list) else value


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class SafetensorsFile:
    """One safetensors file read with plain file reads, a byte range per run of rows.

    Why not ``safetensors.safe_open``: it memory-maps the file, and every page a rank reads then counts in its
    resident memory until the file is closed, so reading a rank's shards tensor after tensor would show as the
    shards twice over. A safetensors file is an 8-byte header length, a JSON header (dtype, shape, byte offsets
    per tensor) and the C-contiguous tensors, so rows ``a..b`` of dim 0 are one contiguous byte range.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self.path, self._data_start, self._header = path, 8 + length, header

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> list[int]:
        return list(self._header[key]["shape"])

    def dtype_name(self, key: str) -> str:
        return str(self._header[key]["dtype"])

    def data_bytes(self) -> int:
        """Bytes of all tensors stored in the file (the header excluded)."""
        return sum(end - start for start, end in (entry["data_offsets"] for entry in self._header.values()))

    def read(self, key: str, rows: RowsSpec = None) -> torch.Tensor:
        """Tensor ``key``, or only ``rows`` of its dim 0, in the stored dtype."""
        entry = self._header[key]
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        start, end = entry["data_offsets"]
        if rows is None or not shape:
            count, runs = (shape[0] if shape else 1), [(0, shape[0] if shape else 1)]
        else:
            rows = list(rows)
            count, runs = len(rows), _runs(rows)
        row_bytes = (end - start) // max(shape[0] if shape else 1, 1)
        buffer = bytearray(count * row_bytes)
        view, filled = memoryview(buffer), 0
        with open(self.path, "rb", buffering=0) as f:
            for first, stop in runs:
                f.seek(self._data_start + start + first * row_bytes)
                want = (stop - first) * row_bytes
                while want:
                    got = f.readinto(view[filled : filled + want])
                    if not got:
                        raise OSError(f"{self.path}: truncated file while reading {key}")
                    filled, want = filled + got, want - got
        out = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return out.reshape([count, *shape[1:]] if shape else [])


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Consecutive rows as (first, stop) runs, in the order given: [3, 4, 5, 9] -> [(3, 6), (9, 10)]."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def return_freed_memory() -> None:
    """Give memory freed since the last read back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Streaming a model tensor by tensor frees a large block after every read; glibc keeps such blocks in the
    heap (it raises its mmap threshold after each large free), so without this the process's resident memory
    grows by the stream's size, not one tensor's: measured 0.3x of a 0.87 GiB model for reading its experts once.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _safetensors_files(directory: Path) -> list[Path]:
    """The files of a checkpoint: the index's list when there is one (sharded saves), else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    return files


def _layers_past_the_model(where: dict[str, str], model: nn.Module) -> list[str]:
    """Stored keys of whole decoder layers numbered past the model's last layer (``...layers.N.`` with N beyond
    every ``layers.N`` the model has): extra layers such as multi-token prediction, which the model never runs."""
    pattern = re.compile(r"^(.*\.layers)\.(\d+)\.")
    last: dict[str, int] = {}
    for name, _ in model.named_parameters():
        found = pattern.match(name)
        if found:
            last[found[1]] = max(last.get(found[1], -1), int(found[2]))
    if not last:
        return []
    skipped = []
    for key in where:
        found = pattern.match(key)
        if found and int(found[2]) > max(last.values()) and any(found[1].endswith(p) for p in last):
            skipped.append(key)
    return skipped


def _names_by_tensor(model: nn.Module) -> list[list[str]]:
    """Every parameter and persistent buffer, grouped by tensor: a tied weight has several names."""
    groups: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for name, tensor in tensors:
            if tensor is None:
                continue
            names = groups.setdefault(id(tensor), [])
            if prefix + name not in names:
                names.append(prefix + name)
    return list(groups.values())
