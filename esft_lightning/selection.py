"""Decide: turn per-layer expert scores into an expert config (top-p rule), and read/write ESFT's JSON."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write_text

Scores = Mapping[int, torch.Tensor | Sequence[float] | Mapping[Any, float]]


@dataclass
class ExpertConfig:
    """Which routed experts of which layer to train (ESFT's ``expert_cfg.json``, docs/design.md section 2)."""

    experts: dict[int, list[int]]
    """decoder-layer index -> routed-expert ids, in selection order."""
    shared_experts: bool = False
    """Also train the shared experts of every MoE layer."""
    non_expert_modules: bool = False
    """Also train everything outside routed and shared experts (attention, norms, routers, embeddings, head)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra fields written beside ESFT's (score_function, top_p, num_tokens, model_type); ESFT ignores them."""

    @property
    def num_selected(self) -> int:
        """Selected routed experts over all layers."""
        return sum(len(v) for v in self.experts.values())

    def to_dict(self) -> dict[str, Any]:
        """ESFT's JSON object: string layer keys, plus our extra fields."""
        experts = {str(k): [int(e) for e in v] for k, v in sorted(self.experts.items())}
        return {
            "experts": experts,
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
            **self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "expert config") -> ExpertConfig:
        """Validate and read ESFT's JSON object; errors name ``source`` and the offending key."""
        if not isinstance(data, Mapping) or "experts" not in data:
            raise ValueError(f"{source}: expected a JSON object with an 'experts' key")
        raw = data["experts"]
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: 'experts' must map layer indices to lists of expert ids")
        experts: dict[int, list[int]] = {}
        for key, ids in raw.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: experts key {key!r} is not a layer index") from None
            if not isinstance(ids, list) or not all(type(e) is int and e >= 0 for e in ids):
                raise ValueError(f"{source}: experts[{key!r}] must be a list of non-negative ints, got {ids!r}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"{source}: experts[{key!r}] lists an expert twice: {ids}")
            experts[layer] = list(ids)
        for flag in ("shared_experts", "non_expert_modules"):
            if not isinstance(data.get(flag, False), bool):
                raise ValueError(f"{source}: {flag!r} must be true or false, got {data[flag]!r}")
        meta = {k: v for k, v in data.items() if k not in ("experts", "shared_experts", "non_expert_modules")}
        return cls(experts, bool(data.get("shared_experts", False)), bool(data.get("non_expert_modules", False)), meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write ESFT's JSON atomically (temp file + rename): a crash never leaves half a file."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertConfig:
        """Read an ``expert_cfg.json``; errors name the file (and line for malformed JSON)."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"expert config {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 (byte {err.start}); expert configs are UTF-8 JSON") from None
        except RecursionError:
            raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
        return cls.from_dict(data, source=str(path))


def _as_tensor(layer: int, values: torch.Tensor | Sequence[float] | Mapping[Any, float]) -> torch.Tensor:
    if isinstance(values, Mapping):  # ESFT's score JSON: {"0": 0.01, "1": ...}
        ids = sorted(int(k) for k in values)
        if ids != list(range(len(ids))):
            raise ValueError(f"scores of layer {layer}: expert ids must be 0..N-1, got {ids[:5]}...")
        values = [float(values[str(i)] if str(i) in values else values[i]) for i in ids]
    scores = torch.as_tensor(values, dtype=torch.float64).flatten()
    if scores.numel() == 0 or not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError(f"scores of layer {layer} must be a non-empty list of finite non-negative numbers")
    return scores


def select_experts(
    scores: Scores,
    top_p: float = 0.2,
    *,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> ExpertConfig:
    """Per layer: experts by descending score (ties: lower id first) until the cumulative score >= top_p.

    The expert that crosses ``top_p`` is included (paper Eq. 8). ``scores`` maps layer -> scores per
    expert, as tensors, lists or ESFT's ``{"expert": score}`` tables.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    experts: dict[int, list[int]] = {}
    for layer, values in scores.items():
        layer = int(layer)
        s = _as_tensor(layer, values)
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        chosen, total = [], 0.0
        for e in order:
            chosen.append(int(e))
            total += float(s[e])
            if total >= top_p:
                break
        experts[layer] = chosen
    return ExpertConfig(experts, shared_experts, non_expert_modules, {"top_p": top_p, **(meta or {})})


def all_experts(num_experts: Mapping[int, int], **flags: Any) -> ExpertConfig:
    """Baseline: every routed expert of every MoE layer (full fine-tuning of the experts)."""
    return ExpertConfig({k: list(range(n)) for k, n in num_experts.items()}, **flags)


def no_experts(num_experts: Mapping[int, int], **flags: Any) -> ExpertConfig:
    """Baseline: routed experts all frozen (with the flags, only shared / non-expert modules train)."""
    return ExpertConfig({k: [] for k in num_experts}, **flags)


def random_experts(like: ExpertConfig, num_experts: Mapping[int, int], seed: int = 0) -> ExpertConfig:
    """The paper's ablation: as many experts per layer as ``like`` selected, drawn uniformly at random."""
    rng = random.Random(seed)
    chosen = {k: rng.sample(range(num_experts[k]), len(v)) for k, v in like.experts.items()}
    return ExpertConfig(chosen, like.shared_experts, like.non_expert_modules, {**like.meta, "random_seed": seed})
