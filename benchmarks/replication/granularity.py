"""The replication's expert-granularity part (paper §6.4): esft_lightning.analysis at G = 1, 2, 4, and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esft_lightning.analysis import granularity_rows, summarise_granularity
from esft_lightning.resources import pretrained_path

from .data import new_tokens
from .experiments import Study

METHODS = ("base", "esft_token", "esft_gate", "fft")
"""``base``: the grouped model untrained (what grouping alone costs the pretrained model)."""
KEYS = ("group_size", "method", "task_em", "general_em", "trained_experts", "trained_params")
"""What results.json's ``granularity`` list holds per (G, method) (besides seeds, sd, chrF and s / step)."""


def granularity_task(args: Any) -> str:
    """The task the granularity runs fine-tune: --granularity-task, else cipher (learned by every method in the
    previous version) when it is among the tasks, else the first task."""
    if args.granularity_task:
        return args.granularity_task
    return "cipher" if "cipher" in args.tasks else args.tasks[0]


def run_granularity(study: Study) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw rows (per G, method, seed) and their summary; each method at the lr the sweep chose for the task."""
    args = study.args
    task = granularity_task(args)
    data = study.data(task, 0)
    rates = {m: study.lrs[m][task] for m in ("esft_token", "esft_gate", "fft")}
    rows = granularity_rows(
        pretrained_path(),
        data.task_path,
        data.general_path,
        data.test,
        data.general,
        group_sizes=tuple(args.group_sizes),
        methods=METHODS,
        steps=args.steps,
        lr=rates,
        seeds=tuple(range(args.granularity_seeds)),
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        profile_tokens=args.profile_tokens,
        max_new_tokens=max(new_tokens(data.test, args.max_new_tokens), new_tokens(data.general, args.max_new_tokens)),
        eval_batch=args.eval_batch,
        cache_dir=study.tmp / "cache",
        log=lambda row: print({"granularity": {k: row[k] for k in (*KEYS, "seed")}}, flush=True),
    )
    for row in rows:
        row["task"] = task
    return rows, summarise_granularity(rows)


def plot_granularity(summary: list[dict[str, Any]], task: str, out: Path) -> None:
    """Per-G curves: task score, general score and trained parameters of each method (the paper's Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["group_size"] for r in summary})
    panels = [("task_em", f"{task} exact match"), ("general_em", "general exact match"), ("trained_params", None)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}  # one colour a method in every panel
    for ax, (key, title) in zip(axes, panels):
        for method in METHODS:
            mine = sorted((r for r in summary if r["method"] == method), key=lambda r: r["group_size"])
            if not mine or (key == "trained_params" and method == "base"):
                continue
            values = [r[key] for r in mine]
            errors = [r.get(f"{key}_sd") or 0.0 for r in mine]
            style = "--" if method == "base" else "-"
            sizes_of = [r["group_size"] for r in mine]
            ax.errorbar(sizes_of, values, yerr=errors, fmt=style, marker="o", ms=4, color=colors[method], label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"G={g}" for g in sizes])
        ax.set_title(title or "trained parameters")
        if key == "trained_params":
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("exact match")
    axes[0].legend(fontsize=7)
    fig.suptitle("Coarser experts (G experts grouped, routing as one): ESFT vs full fine-tuning")
    fig.tight_layout()
    fig.savefig(out / "granularity.png", dpi=110)
    plt.close(fig)
