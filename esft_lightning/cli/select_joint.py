"""`esft select --joint`: disjoint expert configs for several tasks from their scores files (no model loaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..selection.rules import ExpertConfig, select_disjoint

USAGE_EXAMPLE = (
    "esft select --joint intent=runs/intent/logs/version_0/expert_scores.json law=law_scores.json --out configs/"
)


def parse_tasks(pairs: list[str]) -> dict[str, str]:
    """``TASK=SCORES.json`` pairs (a bare path is named after its file) -> task -> scores file, in order."""
    tasks: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:  # no task name given: the file's stem (the callback's expert_scores.json names no task)
            path, name = pair, Path(pair).stem
            if name == "expert_scores":
                raise SystemExit(f"esft select --joint: name the task of {pair}: TASK={pair}")
        if not name or not path:
            raise SystemExit(f"esft select --joint: {pair!r} is not TASK=SCORES.json")
        if name in tasks:
            raise SystemExit(f"esft select --joint: task {name!r} given twice (name them: TASK=SCORES.json)")
        tasks[name] = path
    return tasks


def joint_main(argv: list[str]) -> dict[str, ExpertConfig]:
    """Parse `esft select --joint ...`, write ``<out>/<task>.json`` for every task, print a summary."""
    parser = argparse.ArgumentParser(
        prog="esft select --joint",
        description="Select experts for several tasks at once so that no expert serves two tasks (adapters that "
        "compose in one model). Each contested expert goes to the task that scores it higher; the other takes its "
        f"next-best. Example: {USAGE_EXAMPLE}",
    )
    parser.add_argument(
        "--joint",
        nargs="+",
        required=True,
        metavar="TASK=SCORES.json",
        help="each task's scores file, as `esft profile` or ExpertSelectionCallback (expert_scores.json) write it",
    )
    parser.add_argument("--out", required=True, help="output directory: one <task>.json expert config per task")
    parser.add_argument("--score_function", choices=["token", "gate"], default="token")
    parser.add_argument("--top_p", type=float, default=None, help="default: 0.2 token, 0.1 gate")
    add_exclusion_arguments(
        parser,
        exclude_help="expert_cfg.json files or adapter directories whose experts no task may take",
        best_effort_help="a task that cannot reach top_p without contested or excluded experts keeps what it got "
        "(warning) instead of failing",
    )
    ns = parser.parse_args(argv)
    tasks = parse_tasks(ns.joint)
    top_p = ns.top_p if ns.top_p is not None else (0.1 if ns.score_function == "gate" else 0.2)
    configs = select_disjoint(
        tasks, top_p, score_function=ns.score_function, exclude=ns.exclude, strict=not ns.best_effort
    )
    out = Path(ns.out)
    for task, config in configs.items():
        config.save(out / f"{task}.json")
        short = config.meta.get("top_p_shortfall")
        note = f"; below top_p in layers {', '.join(short)}" if short else ""
        print(f"{task}: {config.num_selected} experts in {len(config.experts)} layers{note} -> {out / f'{task}.json'}")
    print(f"no expert is selected for two of the {len(configs)} tasks (top_p {top_p}, {ns.score_function} scores)")
    return configs


def add_exclusion_arguments(
    parser: argparse.ArgumentParser, exclude_help: str, best_effort_help: str, best_effort_default: bool | None = False
) -> None:
    """``--exclude A/expert_cfg.json B/adapter ...`` and ``--best_effort``, for `esft select` and its ``--joint``."""
    parser.add_argument(
        "--exclude", nargs="+", action="extend", default=None, metavar="CONFIG_OR_ADAPTER", help=exclude_help
    )
    parser.add_argument("--best_effort", action="store_true", default=best_effort_default, help=best_effort_help)
