"""The granularity experiment end to end: group experts at each G, fine-tune (ESFT-Token / -Gate / FFT), score."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.datamodule import ESFTDataModule
from ..data.sources import Source
from ..evaluation.evaluate import EvalSample, evaluate_set, load_eval_set
from ..experts.split import apply_expert_config
from ..models import find_moe_layers
from ..routing.profile import profile_routing
from ..weights.loading import load_model, load_tokenizer
from .granularity import check_group_size, count_cooccurrence, expert_groups, grouped_routing, select_expert_groups

__all__ = ["GRANULARITY_METHODS", "granularity_rows", "summarise_granularity"]

GRANULARITY_METHODS = ("base", "esft_token", "esft_gate", "fft")
"""``base``: the grouped model untrained (what grouping alone costs); the others fine-tune under grouped routing."""
LEARNING_RATES = {"esft_token": 5e-3, "esft_gate": 5e-3, "fft": 1e-3}
"""benchmarks/replicate_paper.py's rates, the default when ``lr`` is not given per method."""
TOP_P = {"esft_token": 0.2, "esft_gate": 0.1}
"""The paper's thresholds (token scores 0.2, gate scores 0.1)."""

PathOrSamples = str | os.PathLike | Sequence[EvalSample]


def _eval_set(data: PathOrSamples, max_samples: int | None) -> list[EvalSample]:
    if isinstance(data, (str, os.PathLike)):
        return load_eval_set(data, max_samples)
    return list(data)[:max_samples]


def forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def train_steps(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float) -> float:
    """The replication's training loop: AdamW (0.9, 0.95, wd 0.1), constant lr, clip 1.0; returns the median seconds
    per step after 3 warm-up steps (benchmarks/replication uses it too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    times = []
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    model.eval()
    return statistics.median(times[3:] or times) if times else 0.0


def granularity_rows(
    model_dir: str | os.PathLike,
    task_data: str | os.PathLike,
    general_data: str | os.PathLike,
    task_eval: PathOrSamples,
    general_eval: PathOrSamples,
    *,
    group_sizes: Sequence[int] = (1, 2, 4),
    methods: Sequence[str] = ("esft_token", "esft_gate", "fft"),
    steps: int = 300,
    lr: float | Mapping[str, float] | None = None,
    seeds: Sequence[int] = (0,),
    top_p: Mapping[str, float] | None = None,
    seq_length: int = 256,
    batch_size: int = 8,
    general_ratio: float = 1.0,
    profile_tokens: int = 16384,
    eval_samples: int | None = None,
    max_new_tokens: int = 48,
    eval_batch: int = 32,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (group size G, method, seed): fine-tune under G-grouped routing and score.

    ``task_data`` / ``general_data``: training sources (chat JSONL or any ``Source`` format), mixed
    ``general_ratio`` : 1 for training; the experts are grouped on co-occurrence counted on ``general_data``
    (up to ``profile_tokens`` tokens, the pretrained model's own routing). ``task_eval`` / ``general_eval``: eval
    sets (paths or ``EvalSample`` lists; ``eval_samples`` caps them), scored by greedy exact match. Every method
    starts from a fresh ``model_dir`` model and trains, profiles and is scored under the grouped routing;
    ESFT selects whole groups (``top_p`` per method, over group scores).

    Rows: ``group_size, method, seed, task_em, task_chrf, general_em, trained_experts`` (routed experts trained,
    all layers), ``trained_params``, ``step_s`` (median seconds per step) and ``seconds`` (the whole run).
    ``log`` gets each row as it is made. ``summarise_granularity`` averages them over seeds.
    """
    unknown = sorted(set(methods) - set(GRANULARITY_METHODS))
    if unknown:
        raise ValueError(f"unknown granularity methods {unknown}; known: {', '.join(GRANULARITY_METHODS)}")
    rates = {**LEARNING_RATES, **(lr if isinstance(lr, Mapping) else {} if lr is None else dict.fromkeys(methods, lr))}
    thresholds = {**TOP_P, **(top_p or {})}
    tokenizer = load_tokenizer(model_path=str(model_dir))
    model_path = str(model_dir)

    def fresh() -> nn.Module:
        return load_model(model_path, dtype=torch.float32).eval()

    base = fresh()
    for size in group_sizes:  # a clear error before any training if some G cannot work on this model
        check_group_size(base, size)
    task_set, general_set = _eval_set(task_eval, eval_samples), _eval_set(general_eval, eval_samples)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(cache_dir or Path(tmp) / "cache")
        general_only = ESFTDataModule(
            task=[Source(str(general_data), name="general")],
            general_ratio=0.0,
            seq_length=seq_length,
            batch_size=batch_size,
            cache_dir=cache,
        )
        general_only.tokenizer = tokenizer
        general_only.setup("fit")
        counts = count_cooccurrence(base, general_only.task_dataloader(shard=False), max_tokens=profile_tokens)
        groups = {size: expert_groups(counts, size) for size in group_sizes}
        num_experts = sum(layer.num_experts for layer in find_moe_layers(base))
        for seed in seeds:
            data = ESFTDataModule(
                task=[Source(str(task_data), name="task")],
                general=[Source(str(general_data), name="general")],
                general_ratio=general_ratio,
                seq_length=seq_length,
                batch_size=batch_size,
                seed=seed,
                cache_dir=cache,
            )
            data.tokenizer = tokenizer
            data.setup("fit")
            for size in group_sizes:
                for method in methods:
                    started = time.perf_counter()
                    torch.manual_seed(seed)
                    model = base if method == "base" else fresh()
                    with grouped_routing(model, groups[size]):
                        trained_experts, step_s = 0, 0.0
                        if method == "fft":
                            model.requires_grad_(True)
                            trained_experts = num_experts
                        elif method in ("esft_token", "esft_gate"):
                            kind = "token" if method == "esft_token" else "gate"
                            # Scores under grouped routing: members of a group are chosen together.
                            profile = profile_routing(
                                model, data.task_dataloader(shard=False), max_tokens=profile_tokens, progress=False
                            )
                            config = select_expert_groups(
                                profile.scores(kind), groups[size], thresholds[method], meta={"score_function": kind}
                            )
                            apply_expert_config(model, config)
                            trained_experts = config.num_selected
                        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
                        if method != "base":
                            step_s = train_steps(model, forever(data.train_dataloader()), steps, rates[method])
                        task, _ = evaluate_set(model, tokenizer, task_set, max_new_tokens, eval_batch)
                        general, _ = evaluate_set(model, tokenizer, general_set, max_new_tokens, eval_batch)
                    row = dict(
                        group_size=size,
                        method=method,
                        seed=seed,
                        task_em=task["exact_match"],
                        task_chrf=task.get("chrf"),
                        general_em=general["exact_match"],
                        trained_experts=trained_experts,
                        trained_params=0 if method == "base" else trained,
                        step_s=step_s,
                        seconds=time.perf_counter() - started,
                    )
                    rows.append(row)
                    if log is not None:
                        log(row)
    return rows


def summarise_granularity(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group size, method), means over seeds (``*_sd``: population sd of the exact matches),
    with the keys results.json's ``granularity`` list holds."""
    out = []
    keys = sorted({(r["group_size"], r["method"]) for r in rows}, key=lambda k: (k[0], GRANULARITY_METHODS.index(k[1])))
    for size, method in keys:
        mine = [r for r in rows if r["group_size"] == size and r["method"] == method]
        row: dict[str, Any] = {"group_size": size, "method": method, "seeds": len(mine)}
        for key in ("task_em", "general_em", "task_chrf", "trained_experts", "trained_params", "step_s"):
            values = [r[key] for r in mine if r.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
        for key in ("task_em", "general_em"):
            row[f"{key}_sd"] = statistics.pstdev([r[key] for r in mine]) if len(mine) > 1 else None
        out.append(row)
    return out
