"""The replication's report: summary rows per method, Markdown tables, and the full run's runtime estimate."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

from .methods import ABLATION, LABELS, LR_GRID, METHODS, SHARED, SWEPT

REFERENCE_STEP_S = {
    "fft": 0.175,
    "esft_token": 0.104,
    "esft_gate": 0.104,
    "lora": 0.180,
    "random": 0.102,
    "frozen": 0.148,
    "esft_token_non_expert": 0.16,
}
"""Median seconds per step (batch 8 x 256 bytes, torch's 2 threads on this 2-core machine) measured by the previous
full run (docs/replication/results.json of commit ebc4f68); ``esft_token_non_expert`` was not run there: frozen
experts' step plus a margin for the selected experts' gradients."""
REFERENCE_SET_S = 2.5
"""Seconds to generate on one eval set of 128 samples: an allowance (the previous full run spent 119 s outside its
training steps, on 58 eval sets of 64 samples, 50 drift profiles, 8 routing profiles and the data)."""
REFERENCE_OTHER_S = 180.0
"""Seconds outside training and generation: routing figures, data, drift and selection profiles, adapter files."""
ORDER = ("base", *METHODS, *ABLATION[1:], "disjoint", "composed", "merged")
COSTS = ("trainable_params", "step_s", "stored_bytes", "drift_task", "drift_general", "experts")


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def _sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1) over seeds; None for fewer than two."""
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict[str, Any]], tasks: Sequence[str], lrs: dict[str, dict[str, float]]) -> list[dict]:
    """One row per method: per task the mean exact match over seeds (``<task>_em``), its sd and chrF, the lr used;
    the mean over tasks, general exact match, costs."""
    rows = []
    for method in ORDER:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row: dict[str, Any] = {"method": method, "label": LABELS[method], "seeds": len({r["seed"] for r in mine})}
        for task in tasks:
            values = [r["task_em"] for r in mine if r["task"] == task]
            row[f"{task}_em"] = _mean(values)
            row[f"{task}_em_sd"] = _sd(values)
            row[f"{task}_chrf"] = _mean([r["task_chrf"] for r in mine if r["task"] == task])
            row[f"{task}_lr"] = _mean([r["lr"] for r in mine if r["task"] == task and r.get("lr") is not None])
        per_task = [row[f"{t}_em"] for t in tasks if row[f"{t}_em"] is not None]
        row["task_em"] = _mean(per_task)
        # The general score once per (seed, model): the pretrained model and the models holding several adapters
        # repeat it per task.
        general = {
            (r["seed"], r["task"] if method not in ("composed", "merged") else ""): r["general_em"] for r in mine
        }
        row["general_em"] = _mean(list(general.values()))
        row["general_em_sd"] = _sd(list(general.values()))
        for key in COSTS:
            row[key] = _mean([r[key] for r in mine if r.get(key) is not None])
        rows.append(row)
    return rows


def _cell(value: float | None, fmt: str, sd: float | None = None) -> str:
    if value is None:
        return "-"
    return format(value, fmt) + ("" if sd is None else f" ± {sd:{fmt}}")


def _table(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def main_table(rows: list[dict], tasks: Sequence[str]) -> str:
    """The methods compared (Tables 1-2 of the paper, with random and frozen experts)."""
    head = [
        "method",
        *[f"{t} EM / chrF" for t in tasks],
        "task mean EM",
        "general EM",
        "lr (" + " / ".join(tasks) + ")",
        "trainable params",
        "s / step",
        "stored per task",
        "routing drift task / general (JS)",
    ]
    lines = []
    for r in rows:
        if r["method"] not in ("base", *METHODS):
            continue
        per_task = [f"{_cell(r[f'{t}_em'], '.3f', r[f'{t}_em_sd'])} / {_cell(r[f'{t}_chrf'], '.3f')}" for t in tasks]
        lr = " / ".join(_cell(r[f"{t}_lr"], ".1e") for t in tasks)
        stored = "-" if r["stored_bytes"] is None else f"{r['stored_bytes'] / 2**20:.2f} MiB"
        drift = "-" if r["drift_task"] is None else f"{r['drift_task']:.4f} / {r['drift_general']:.4f}"
        general = _cell(r["general_em"], ".3f", r["general_em_sd"])
        costs = [_cell(r["trainable_params"], ",.0f"), _cell(r["step_s"], ".3f"), stored, drift]
        lines.append([r["label"], *per_task, _cell(r["task_em"], ".3f"), general, lr, *costs])
    return _table(head, lines)


def sweep_table(sweep: list[dict], tasks: Sequence[str], lrs: dict[str, dict[str, float]]) -> str:
    """Validation exact match / chrF per (method, lr) and task; the chosen lr in bold."""
    head = ["method", "lr", *[f"{t} val EM / chrF" for t in tasks]]
    lines = []
    for method in SWEPT:
        for lr in LR_GRID[method]:
            cells = []
            for task in tasks:
                point = next((p for p in sweep if (p["method"], p["task"], p["lr"]) == (method, task, lr)), None)
                text = "-" if point is None else f"{point['val_em']:.3f} / {point['val_chrf']:.3f}"
                cells.append(f"**{text}**" if lrs.get(method, {}).get(task) == lr and point else text)
            lines.append([LABELS[method], f"{lr:.1e}", *cells])
    return _table(head, lines)


def ablation_table(rows: list[dict], tasks: Sequence[str], shared_experts: bool) -> str:
    """The paper's Table 3 in miniature: what trains besides the selected experts."""
    wanted = [("esft_token", "selected experts alone"), ("esft_token_shared", "+ shared experts")]
    wanted += [("esft_token_non_expert", "+ non-expert modules"), ("shared_only", "shared experts only")]
    wanted += [("frozen", "non-expert modules only"), ("fft", "everything (full fine-tuning)")]
    by_method = {r["method"]: r for r in rows}
    head = ["trains", *[f"{t} EM" for t in tasks], "task mean EM", "general EM", "trainable params"]
    lines = []
    for method, label in wanted:
        r = by_method.get(method)
        if r is None:
            why = "n/a: the model has no shared experts" if method in SHARED and not shared_experts else "not run"
            lines.append([label, *[why] + ["-"] * (len(tasks) + 2)])
            continue
        per_task = [_cell(r[f"{t}_em"], ".3f", r[f"{t}_em_sd"]) for t in tasks]
        general = _cell(r["general_em"], ".3f", r["general_em_sd"])
        lines.append([label, *per_task, _cell(r["task_em"], ".3f"), general, _cell(r["trainable_params"], ",.0f")])
    return _table(head, lines)


def composed_summary(runs: list[dict], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task: its adapter alone (unconstrained and disjoint selection), in one model with the others (composed:
    disjoint; merged: unconstrained, shared experts averaged), and composed / alone (target >= 0.9)."""
    out = {}
    for task in tasks:

        def values(method: str, task: str = task) -> list[float]:
            return [r["task_em"] for r in runs if r["method"] == method and r["task"] == task]

        entry: dict[str, Any] = {}
        for method in ("esft_token", "disjoint", "composed", "merged"):
            entry[method] = _mean(values(method))
            entry[f"{method}_sd"] = _sd(values(method))
        alone = entry["disjoint"]
        entry["ratio"] = None if not alone else entry["composed"] / alone
        entry["target_met"] = None if entry["ratio"] is None else entry["ratio"] >= 0.9
        out[task] = entry
    general = {m: _mean([r["general_em"] for r in runs if r["method"] == m]) for m in ("composed", "merged")}
    out["general"] = general
    return out


def composed_table(summary: dict[str, dict[str, Any]], tasks: Sequence[str]) -> str:
    head = [
        "task",
        "ESFT-Token alone",
        "disjoint selection, alone",
        "composed (disjoint, one model)",
        "composed / alone",
        "merged (unconstrained, averaged)",
    ]
    lines = []
    for task in tasks:
        s = summary[task]
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f} ({'met' if s['target_met'] else 'missed'})"
        cells = [_cell(s[m], ".3f", s[f"{m}_sd"]) for m in ("esft_token", "disjoint", "composed")]
        lines.append([task, *cells, ratio, _cell(s["merged"], ".3f", s["merged_sd"])])
    general = summary["general"]
    lines.append(["general", "-", "-", _cell(general["composed"], ".3f"), "-", _cell(general["merged"], ".3f")])
    return _table(head, lines)


def granularity_table(summary: list[dict], task: str) -> str:
    head = ["G", "method", f"{task} EM", "general EM", "trained experts", "trained params", "s / step"]
    lines = []
    for r in summary:
        lines.append(
            [
                str(r["group_size"]),
                r["method"],
                _cell(r["task_em"], ".3f", r.get("task_em_sd")),
                _cell(r["general_em"], ".3f", r.get("general_em_sd")),
                _cell(r["trained_experts"], ".0f"),
                _cell(r["trained_params"], ",.0f"),
                _cell(r["step_s"] or None, ".3f"),
            ]
        )
    return _table(head, lines)


def training_plan(args: argparse.Namespace, ablation: int) -> dict[str, int]:
    """Training runs (each ``args.steps`` steps) per method of a run with ``args``'s settings; ``grouped_<m>``:
    the granularity runs. ``ablation``: the ablation methods actually run (no shared experts: one)."""
    tasks, seeds = len(args.tasks), args.seeds
    grid = {m: (2 if args.quick else len(LR_GRID[m])) for m in SWEPT}
    plan = {m: tasks * (grid[m] + seeds - 1) for m in SWEPT}
    plan.update({m: tasks * seeds for m in ("random", "frozen", "disjoint")})
    plan["ablation"] = tasks * seeds * ablation
    for m in ("esft_token", "esft_gate", "fft"):
        plan[f"grouped_{m}"] = len(args.group_sizes) * args.granularity_seeds
    return plan


def eval_sets(args: argparse.Namespace, ablation: int) -> int:
    """Eval sets (``args.eval_samples`` each) a run generates on."""
    tasks, seeds = len(args.tasks), args.seeds
    sweep = tasks * sum(2 if args.quick else len(LR_GRID[m]) for m in SWEPT)
    scored = 2 * tasks * seeds * (len(SWEPT) + 3 + ablation)  # test + general; + random, frozen, disjoint
    together = 2 * seeds * (tasks + 1)  # composed and merged: every task + general
    return sweep + 2 * tasks + scored + together + 2 * len(args.group_sizes) * 4 * args.granularity_seeds


def estimate_minutes(
    args: argparse.Namespace,
    ablation: int,
    step_s: dict[str, float] = REFERENCE_STEP_S,
    set_s: float = REFERENCE_SET_S,
    other_s: float = REFERENCE_OTHER_S,
) -> dict[str, float]:
    """Minutes of a run with ``args``: training (runs x ``args.steps`` x ``step_s`` of the method; disjoint and
    grouped runs at their method's), generation (eval sets x ``set_s``, scaled to ``args.eval_samples``) and
    ``other_s``."""
    plan = training_plan(args, ablation)
    per_method = {m: step_s[m.removeprefix("grouped_")] for m in plan if m not in ("ablation", "disjoint")}
    per_method["ablation"], per_method["disjoint"] = step_s["esft_token_non_expert"], step_s["esft_token"]
    train = sum(plan[m] * args.steps * per_method[m] for m in plan)
    generate = eval_sets(args, ablation) * set_s * args.eval_samples / 128
    total = train + generate + other_s
    return {"train": train / 60, "generate": generate / 60, "other": other_s / 60, "total": total / 60}
