"""The replication's fine-tuning methods: what each trains, learning-rate grids, the loop, one scored run."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import expert_lora_targets
from torch import nn

from esft_lightning.adapters import save_adapter
from esft_lightning.analysis.granularity_run import forever  # one training loop for both
from esft_lightning.analysis.granularity_run import train_steps as train
from esft_lightning.callbacks.routing_drift import layer_drift
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.experts.state import expert_config_of
from esft_lightning.models import find_moe_layers
from esft_lightning.routing.profile import RoutingProfile
from esft_lightning.selection.rules import ExpertConfig, no_experts, random_experts

from .data import TaskData, base_model, evaluate, profile

METHODS = ("fft", "esft_token", "esft_gate", "lora", "random", "frozen")
"""The main comparison (the paper's Tables 1-2 and its random-experts / non-expert ablations)."""
SWEPT = ("fft", "esft_token", "esft_gate", "lora")
"""Methods whose learning rate is chosen per task on the validation set, over ``LR_GRID``."""
LR_GRID = {
    "fft": (1.5e-3, 5e-3, 1.5e-2),
    "esft_token": (1.5e-3, 5e-3, 1.5e-2),
    "esft_gate": (1.5e-3, 5e-3, 1.5e-2),
    "lora": (3e-3, 1e-2, 3e-2),
}
"""Half-decade steps around the previous version's fixed rates (ESFT 5e-3, LoRA 1e-2). Full fine-tuning shares
ESFT's grid: its first grid (3e-4, 1e-3, 3e-3) put fft's best validation score on the edge (docs/replication.md)."""
ABLATION = ("esft_token", "esft_token_shared", "esft_token_non_expert", "shared_only")
"""The paper's Table 3 in miniature: selected experts alone, + shared experts, + non-expert modules, shared only."""
SHARED = ("esft_token_shared", "shared_only")
"""Ablation rows that need shared experts (the shipped Qwen3-MoE-style model has none: they are skipped)."""
BORROWS = {"random": "esft_token", "frozen": "esft_token", **dict.fromkeys(ABLATION[1:], "esft_token")}
"""Methods run at another method's chosen lr: the ablations change only what trains, not how fast."""
LABELS = {
    "base": "pretrained model (no fine-tuning)",
    "fft": "full fine-tuning",
    "esft_token": "ESFT-Token (p=0.2)",
    "esft_gate": "ESFT-Gate (p=0.1)",
    "lora": "LoRA r=8 (experts + attention)",
    "random": "random experts (ESFT-Token's count)",
    "frozen": "frozen experts (non-expert modules train)",
    "esft_token_shared": "ESFT-Token + shared experts",
    "esft_token_non_expert": "ESFT-Token + non-expert modules",
    "shared_only": "shared experts only",
    "disjoint": "ESFT-Token, disjoint selection, alone",
    "composed": "one model, every task's disjoint adapter",
    "merged": "one model, every task's ESFT-Token adapter (shared experts averaged)",
}
ESFT_LIKE = ("esft_token", "esft_gate", "random", "frozen", "disjoint", *ABLATION[1:])
"""Methods whose result is an adapter folder (ESFT's format)."""


def has_shared_experts(model: nn.Module) -> bool:
    return any(len(layer.shared) > 0 for layer in find_moe_layers(model))


def add_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    targets = expert_lora_targets(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=attention, target_parameters=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


def expert_config(method: str, selections: dict[str, ExpertConfig], num_experts: dict[int, int], seed: int):
    """The ``ExpertConfig`` an adapter method trains (``selections``: ``token``, ``gate``, maybe ``disjoint``)."""
    token = selections["token"]
    return {
        "esft_token": lambda: token,
        "esft_gate": lambda: selections["gate"],
        "random": lambda: random_experts(token, num_experts, seed=seed),
        "frozen": lambda: no_experts(num_experts, non_expert_modules=True),
        "esft_token_shared": lambda: ExpertConfig(token.experts, shared_experts=True, meta=token.meta),
        "esft_token_non_expert": lambda: ExpertConfig(token.experts, non_expert_modules=True, meta=token.meta),
        "shared_only": lambda: no_experts(num_experts, shared_experts=True),
        "disjoint": lambda: selections["disjoint"],
    }[method]()


def prepare(method: str, selections: dict[str, ExpertConfig], seed: int) -> nn.Module:
    """A fresh pretrained model with exactly the method's parameters trainable."""
    model = base_model()
    num_experts = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
    if method == "fft":
        model.requires_grad_(True)
    elif method == "lora":
        model = add_lora(model)
    else:
        apply_expert_config(model, expert_config(method, selections, num_experts, seed))
    return model


def fit(method: str, data: TaskData, selections: dict[str, ExpertConfig], lr: float, args: argparse.Namespace):
    """Train ``method`` on ``data`` at ``lr``: (model, facts: lr, trainable params, s / step, experts, seconds)."""
    started = time.perf_counter()
    torch.manual_seed(data.seed)
    model = prepare(method, selections, data.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_s = train(model, forever(data.dm.train_dataloader()), args.steps, lr)
    config = expert_config_of(model)
    facts = dict(
        lr=lr,
        trainable_params=trainable,
        step_s=step_s,
        experts=config.num_selected if config is not None and method != "frozen" else None,
        train_s=time.perf_counter() - started,
    )
    return model, facts


def stored_bytes(method: str, model: nn.Module, folder: Path) -> int:
    """What a user keeps per task: the adapter folder (ESFT variants), the LoRA weights, or the whole model."""
    if method in ESFT_LIKE:
        save_adapter(model, folder)
        return sum(f.stat().st_size for f in folder.iterdir())
    params = [p for p in model.parameters() if p.requires_grad or method == "fft"]
    return sum(p.numel() * p.element_size() for p in params)


def drift(model: nn.Module, before: RoutingProfile, loader: torch.utils.data.DataLoader, max_tokens: int) -> float:
    """Mean over layers of the JS divergence of token scores after training from those before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    after = profile(inner, loader, max_tokens)
    return statistics.mean(layer_drift(before.token_scores, after.token_scores).values())


def score_run(
    method: str,
    model: nn.Module,
    facts: dict[str, Any],
    data: TaskData,
    before: dict[str, RoutingProfile],
    folder: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A trained model's row: test and general scores, routing drift, stored bytes, plus ``facts``."""
    started = time.perf_counter()
    scores, general = evaluate(model, data.test, args), evaluate(model, data.general, args)
    row = dict(
        task=data.task,
        method=method,
        seed=data.seed,
        task_em=scores["exact_match"],
        task_chrf=scores["chrf"],
        general_em=general["exact_match"],
        **facts,
        stored_bytes=stored_bytes(method, model, folder),
        drift_task=drift(model, before["task"], data.dm.task_dataloader(), args.profile_tokens),
        drift_general=drift(model, before["general"], data.dm.general_dataloader(), args.profile_tokens),
    )
    row["eval_s"] = time.perf_counter() - started
    return row
