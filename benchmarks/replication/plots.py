"""The replication's routing figures: concentration (paper Fig. 2), task overlap (Fig. 3), overlap before / after
disjoint selection."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from esft_lightning.data import synthetic
from esft_lightning.data.datamodule import ESFTDataModule
from esft_lightning.data.sources import Source
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.models import find_moe_layers
from esft_lightning.selection.rules import select_experts

from .data import base_model, profile
from .experiments import jaccard


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix(ax: Any, matrix: list[list[float]], names: list[str], title: str) -> Any:
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_title(title, fontsize=9)
    return image


def routing_figures(args: argparse.Namespace, tmp: Path, out: Path) -> dict[str, Any]:
    """Figures 2 and 3 in miniature: top-n routing share per task and layer, and task x task selection overlap."""
    plt = _pyplot()
    model = base_model()
    tokenizer = byte_tokenizer()
    names = [*args.tasks, *sorted(synthetic.GENERAL_DOMAINS)]
    selections, shares = {}, {}
    for name in names:
        records = synthetic.chat_records(name, args.profile_records)
        path = synthetic.write_jsonl(tmp / "profiles" / f"{name}.jsonl", records)
        dm = ESFTDataModule(
            task=[Source(str(path), name=name)],
            general_ratio=0.0,
            seq_length=args.seq_length,
            batch_size=args.batch_size,
            cache_dir=str(tmp / "cache"),
        )
        dm.tokenizer = tokenizer
        scores = profile(model, dm.task_dataloader(), args.profile_tokens).token_scores
        selections[name] = select_experts(scores, top_p=0.2)
        shares[name] = {k: torch.sort(s, descending=True).values.cumsum(0)[:8].tolist() for k, s in scores.items()}
    layers = sorted(next(iter(shares.values())))
    num_experts = find_moe_layers(model)[0].num_experts
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True)
    for ax, layer in zip(axes, layers):
        for name in names:
            style = "-" if name in args.tasks else "--"
            ax.plot(range(1, 9), shares[name][layer], style, marker="o", ms=3, label=name)
        ax.plot(range(1, 9), [n / num_experts for n in range(1, 9)], ":", color="grey", label="uniform")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("top-n experts")
    axes[0].set_ylabel("share of the layer's routing (token scores)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("How concentrated routing is: share carried by each task's top-n experts")
    fig.tight_layout()
    fig.savefig(out / "concentration.png", dpi=110)
    plt.close(fig)

    matrix = [[jaccard(selections[a], selections[b]) for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(6, 5))
    image = _matrix(ax, matrix, names, "Selected experts shared between tasks")
    fig.colorbar(image, label="overlap of ESFT-Token selections (Jaccard, mean over layers)")
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=110)
    plt.close(fig)
    top6 = {n: statistics.mean(shares[n][k][5] for k in layers) for n in names}
    counts = {n: statistics.mean(len(v) for v in selections[n].experts.values()) for n in names}
    return {
        "top6_share": top6,
        "experts_per_layer": counts,
        "overlap": dict(zip(names, matrix)),
        "uniform_top6": 6 / num_experts,
    }


def plot_disjoint(overlap: dict[str, Any], tasks: list[str], num_experts: int, out: Path) -> None:
    """Seed 0's task x task overlap before (ESFT-Token per task) and after joint selection (select_disjoint), and
    per layer which experts each task holds (an expert two tasks hold is marked in red)."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    layers = sorted(int(k) for k in next(iter(overlap["selections"].values()))["before"])
    fig = plt.figure(figsize=(3.0 * max(len(layers), 2) + 1, 6.4))
    grid = fig.add_gridspec(2, 2 + len(layers), width_ratios=[1.4, 1.4, *[1] * len(layers)])
    for row, (when, title) in enumerate([("before", "ESFT-Token per task"), ("after", "select_disjoint")]):
        ax = fig.add_subplot(grid[row, 0:2])
        matrix = [overlap[f"jaccard_{when}"][t] for t in tasks]
        count = overlap[f"shared_experts_{when}"]
        _matrix(ax, matrix, tasks, f"{title}: Jaccard\n({count} experts held by two tasks)")
        for col, layer in enumerate(layers):
            ax = fig.add_subplot(grid[row, 2 + col])
            held = torch.zeros(len(tasks), num_experts)
            for i, task in enumerate(tasks):
                selection = overlap["selections"][task][when]
                ids = selection.get(layer, selection.get(str(layer), []))
                held[i, ids] = 1.0
            clash = held.sum(0) > 1
            colours = held.clone()
            colours[:, clash] *= 2.0  # held by two tasks: the third colour
            palette = ListedColormap(["#eeeeee", "#3b6ea5", "#c0392b"])
            ax.imshow(colours, vmin=0, vmax=2, cmap=palette, interpolation="nearest")
            ax.set_yticks(range(len(tasks)), tasks if col == 0 else [""] * len(tasks))
            ax.set_xticks(range(0, num_experts, 8))
            ax.set_title(f"layer {layer}", fontsize=8)
            ax.set_aspect("auto")
    fig.suptitle("Task selections before and after disjoint selection (blue: held by one task, red: by two)")
    fig.tight_layout()
    fig.savefig(out / "disjoint.png", dpi=110)
    plt.close(fig)
