"""Routing heatmap: layers x experts scores with the selected experts marked (PNG via matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .rules import ExpertConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def routing_heatmap(scores: dict[int, torch.Tensor], config: ExpertConfig, path: str | Path, title: str = "") -> Figure:
    """Save a heatmap PNG to ``path`` and return the matplotlib figure (for loggers that take images)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = sorted(scores)
    grid = torch.stack([torch.as_tensor(scores[k], dtype=torch.float32) for k in layers]).numpy()
    fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] * 0.18 + 2), max(3, len(layers) * 0.3 + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, layer in enumerate(layers):
        chosen = config.experts.get(layer, [])
        ax.scatter(chosen, [row] * len(chosen), marker="o", s=14, facecolors="none", edgecolors="red", linewidths=1)
    ax.set_yticks(range(len(layers)), [str(k) for k in layers])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_title(title or f"routing scores (red: {config.num_selected} selected experts)")
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
