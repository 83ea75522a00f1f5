"""Shared helpers for the benchmarks: model builders, random batches, interleaved timing, tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Make `python benchmarks/<script>.py` work from the repo root without installing anything extra.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from esft_lightning.experts.state import expert_param_names  # noqa: E402
from esft_lightning.models import build_tiny_model, find_moe_layers  # noqa: E402

# Sized so that compute (not Python overhead) dominates a step on a 2-core CPU, while a step stays
# well under a second: hidden 256, 32 routed experts (top-4), 4 MoE layers.
MODEL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            first_k_dense_replace=0,
            n_routed_experts=32,
            num_experts_per_tok=4,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=64,
            q_lora_rank=128,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=2048,
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_experts=32,
            num_experts_per_tok=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
        ),
    ),
}
VOCAB_SIZE = 320


def setup(threads: int | None = None, quiet: bool = True, flush_denormal: bool = True) -> None:
    """Common process setup: flush denormals (CPU grouped_mm), optional thread count, fewer warnings."""
    torch.set_flush_denormal(flush_denormal)
    if threads:
        torch.set_num_threads(threads)
    if quiet:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        import datasets

        datasets.disable_progress_bars()


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}; {load_line()}"
    )


def load_line() -> str:
    """The machine's load average: timings on a shared CPU are only as good as this is low."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def build_model(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random MoE causal LM of the benchmark size (``name`` is a key of MODEL_CONFIGS)."""
    family, config = MODEL_CONFIGS[name]
    model = build_tiny_model(family, vocab_size=VOCAB_SIZE, seed=seed, **{**config, **overrides})
    model.train()
    return model


def expert_lora_targets(model: nn.Module) -> list[str]:
    """PEFT ``target_parameters`` for the fused routed experts of every MoE layer (up and down projections)."""
    experts = {id(layer.experts) for layer in find_moe_layers(model)}
    return sorted(
        {
            ".".join([*name.split(".")[-2:], p])
            for name, module in model.named_modules()
            if id(module) in experts
            for p in expert_param_names(module)[:2]
        }
    )


def random_batches(
    num: int, batch_size: int, seq_length: int, seed: int = 0, vocab: int = 256
) -> list[dict[str, torch.Tensor]]:
    """``num`` batches of random byte tokens (labels = input_ids, full attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, vocab, (batch_size, seq_length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each function ``warmup`` times, then ``repeats`` rounds A, B, C, ... (order rotated each round,
    so slow drifts of a shared machine hit every variant alike). Returns seconds per call per variant."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float], fmt: str = ".3f") -> str:
    """Inter-quartile range (min-max under 4 values) as a compact string: a noise indicator."""
    lo, hi = (min(values), max(values)) if len(values) < 4 else statistics.quantiles(values, n=4)[::2]
    return f"{lo:{fmt}}-{hi:{fmt}}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain Markdown table (pastes straight into benchmarks/README.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{'OK' if ok else 'MISS'} (target {'>=' if higher_is_better else '<='} {target})"
