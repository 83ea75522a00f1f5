"""The replication's experiments: per task the lr sweep, seeds and ablation; adapters composed by disjoint selection."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from esft_lightning.adapters import load_adapters
from esft_lightning.routing.profile import RoutingProfile
from esft_lightning.selection.rules import ExpertConfig, select_disjoint, select_experts

from .data import TaskData, base_model, evaluate, make_data, profile
from .methods import BORROWS, LR_GRID, SHARED, SWEPT, fit, has_shared_experts, score_run


class Study:
    """State shared by the experiments: data, profiles and selections per (task, seed), chosen lrs, every run."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.runs: list[dict[str, Any]] = []
        self.sweep: list[dict[str, Any]] = []
        self.lrs: dict[str, dict[str, float]] = {m: {} for m in SWEPT}
        self.adapters: dict[tuple[str, int], Path] = {}  # (task, seed) -> its ESFT-Token adapter
        self.composed: dict[str, Any] = {}
        self.shared_experts = has_shared_experts(base_model())
        self._data: dict[tuple[str, int], TaskData] = {}
        self._before: dict[tuple[str, int], tuple[dict[str, RoutingProfile], dict[str, ExpertConfig]]] = {}

    def data(self, task: str, seed: int) -> TaskData:
        if (task, seed) not in self._data:
            self._data[task, seed] = make_data(self.tmp, task, self.args, seed)
        return self._data[task, seed]

    def before(self, task: str, seed: int) -> tuple[dict[str, RoutingProfile], dict[str, ExpertConfig]]:
        """The pretrained model's routing profiles (task, general) and the ESFT-Token / -Gate selections."""
        if (task, seed) not in self._before:
            data, model, tokens = self.data(task, seed), base_model(), self.args.profile_tokens
            profiles = {
                "task": profile(model, data.dm.task_dataloader(), tokens),
                "general": profile(model, data.dm.general_dataloader(), tokens),
            }
            selections = {
                "token": select_experts(profiles["task"].token_scores, 0.2, meta={"score_function": "token"}),
                "gate": select_experts(profiles["task"].gate_scores, 0.1, meta={"score_function": "gate"}),
            }
            self._before[task, seed] = profiles, selections
        return self._before[task, seed]

    def ablation_methods(self) -> list[str]:
        extra = ["esft_token_shared", "esft_token_non_expert", "shared_only"]
        return [m for m in extra if self.shared_experts or m not in SHARED]

    def record(self, row: dict[str, Any]) -> None:
        self.runs.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    def folder(self, task: str, seed: int, method: str) -> Path:
        return self.tmp / "adapters" / f"{task}-{seed}-{method}"


def grid(method: str, args: argparse.Namespace) -> tuple[float, ...]:
    """The lrs tried for ``method``: the whole grid, or in --quick its first two points."""
    return LR_GRID[method][:2] if args.quick else LR_GRID[method]


def sweep(study: Study, method: str, data: TaskData, selections: dict[str, ExpertConfig]):
    """Train ``method`` at each lr of its grid (seed 0); keep the model best on the validation set.

    Best: highest validation exact match, then chrF; a tie keeps the lower lr. The test set is not looked at."""
    best = None
    for lr in grid(method, study.args):
        model, facts = fit(method, data, selections, lr, study.args)
        val = evaluate(model, data.val, study.args)
        point = dict(task=data.task, method=method, lr=lr, val_em=val["exact_match"], val_chrf=val["chrf"])
        study.sweep.append({**point, "step_s": facts["step_s"], "train_s": facts["train_s"]})
        print(json.dumps({"sweep": point}), flush=True)
        key = (val["exact_match"], val["chrf"])
        if best is None or key > best[0]:
            best = (key, model, facts)
    study.lrs[method][data.task] = best[2]["lr"]
    return best[1], best[2]


def run_task(study: Study, task: str) -> None:
    """``task``: the pretrained baseline; each swept method (lr chosen at seed 0, reused for the other seeds);
    random and frozen experts and the ablation at ESFT-Token's lr; every seed."""
    args = study.args
    for seed in range(args.seeds):
        data = study.data(task, seed)
        before, selections = study.before(task, seed)
        if seed == 0:
            model = base_model()
            scores, general = evaluate(model, data.test, args), evaluate(model, data.general, args)
            base = dict(task=task, method="base", seed=0, task_em=scores["exact_match"], task_chrf=scores["chrf"])
            study.record({**base, "general_em": general["exact_match"]})
        for method in SWEPT:
            if seed == 0:
                model, facts = sweep(study, method, data, selections)
            else:
                model, facts = fit(method, data, selections, study.lrs[method][task], args)
            folder = study.folder(task, seed, method)
            study.record(score_run(method, model, facts, data, before, folder, args))
            if method == "esft_token":
                study.adapters[task, seed] = folder
        for method in ("random", "frozen", *study.ablation_methods()):
            model, facts = fit(method, data, selections, study.lrs[BORROWS[method]][task], args)
            study.record(score_run(method, model, facts, data, before, study.folder(task, seed, method), args))


def jaccard(a: ExpertConfig, b: ExpertConfig) -> float:
    """Mean over layers of |a & b| / |a | b| of two selections."""
    layers = sorted(set(a.experts) | set(b.experts))
    values = []
    for k in layers:
        x, y = set(a.experts.get(k, ())), set(b.experts.get(k, ()))
        values.append(len(x & y) / max(len(x | y), 1))
    return sum(values) / max(len(values), 1)


def shared_count(configs: dict[str, ExpertConfig]) -> int:
    """Experts (over all layers) selected by more than one task."""
    seen: dict[tuple[int, int], int] = {}
    for config in configs.values():
        for layer, ids in config.experts.items():
            for e in ids:
                seen[layer, e] = seen.get((layer, e), 0) + 1
    return sum(n > 1 for n in seen.values())


def run_composed(study: Study) -> None:
    """Per seed: joint selection (select_disjoint, token scores, p = 0.2), each task's adapter trained on it alone,
    all of them loaded into one model (no overlap to resolve) and scored on every task; and, for comparison, the
    unconstrained ESFT-Token adapters put into one model (shared experts averaged, as the previous version did)."""
    args, tasks = study.args, list(study.args.tasks)
    overlap: dict[int, dict[str, Any]] = {}
    for seed in range(args.seeds):
        token = {t: study.before(t, seed)[1]["token"] for t in tasks}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            disjoint = select_disjoint({t: study.before(t, seed)[0]["task"] for t in tasks}, 0.2, strict=False)
        folders = []
        for task in tasks:
            data = study.data(task, seed)
            before, selections = study.before(task, seed)
            selections = {**selections, "disjoint": disjoint[task]}
            model, facts = fit("disjoint", data, selections, study.lrs["esft_token"][task], args)
            folder = study.folder(task, seed, "disjoint")
            study.record(score_run("disjoint", model, facts, data, before, folder, args))
            folders.append(folder)
        overlap[seed] = dict(
            jaccard_before={a: [jaccard(token[a], token[b]) for b in tasks] for a in tasks},
            jaccard_after={a: [jaccard(disjoint[a], disjoint[b]) for b in tasks] for a in tasks},
            shared_experts_before=shared_count(token),
            shared_experts_after=shared_count(disjoint),
            experts_before={t: token[t].num_selected for t in tasks},
            experts_after={t: disjoint[t].num_selected for t in tasks},
            shortfall={t: disjoint[t].meta.get("top_p_shortfall") for t in tasks},
            warnings=[str(w.message) for w in caught],
            selections={t: {"before": token[t].experts, "after": disjoint[t].experts} for t in tasks},
        )
        combined = base_model()
        load_adapters(combined, folders)  # overlap="refuse": disjoint by construction, so this must pass
        score_together(study, "composed", combined, seed, {})
        merged, policy = base_model(), "refuse"
        paths = [study.adapters[t, seed] for t in tasks]
        try:
            load_adapters(merged, paths)
        except ValueError:
            merged, policy = base_model(), "average"  # the tasks share experts: their trained values averaged
            load_adapters(merged, paths, overlap="average")
        score_together(study, "merged", merged, seed, {"overlap": policy})
    study.composed = {"overlap": overlap, "tasks": tasks}


def score_together(study: Study, method: str, model: Any, seed: int, extra: dict[str, Any]) -> None:
    """One model holding several adapters: scored on every task's test set and once on the general set."""
    started = time.perf_counter()
    general = evaluate(model, study.data(study.args.tasks[0], seed).general, study.args)
    for task in study.args.tasks:
        scores = evaluate(model, study.data(task, seed).test, study.args)
        row = dict(task=task, method=method, seed=seed, task_em=scores["exact_match"], task_chrf=scores["chrf"])
        study.record({**row, "general_em": general["exact_match"], **extra, "eval_s": time.perf_counter() - started})
