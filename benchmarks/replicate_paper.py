"""The ESFT paper in miniature on CPU: routing, methods (lr-swept), ablation, composed adapters, expert granularity.

    python benchmarks/replicate_paper.py            # the full run (estimate in docs/replication.md); docs/replication/
    python benchmarks/replicate_paper.py --quick    # every table and plot from a few steps (< 1 minute): CI

On the shipped pretrained tiny MoE (esft_lightning/resources/pretrained, pretrained on six general synthetic
domains) and new tasks it never saw (esft_lightning/data/synthetic.py; by default ``lexicon`` and ``cipher``):
1. profiles each task and general domain: how much of a layer's routing its top-n experts carry (paper Fig. 2)
   and how much the ESFT-Token selections of different tasks overlap (Fig. 3);
2. per task, fine-tunes (mixed 1:1 with general data) with full fine-tuning, ESFT-Token (p=0.2), ESFT-Gate
   (p=0.1) and LoRA, each at the lr of its grid that scores best on a validation set (seed 0), then over every
   seed; random experts, frozen experts and the ablation (Table 3: + shared experts, + non-expert modules, shared
   only) at ESFT-Token's lr;
3. selects the tasks' experts jointly so that no expert serves two tasks (``select_disjoint``), trains each task's
   adapter on its share and scores one model holding them all, next to each adapter alone;
4. simulates coarser experts (G = 1, 2, 4: esft_lightning.analysis) and fine-tunes under them;
5. scores by greedy generation (exact match, chrF) on test sets disjoint from the validation sets, and reports
   trainable parameters, time per step, adapter bytes and routing drift. The benchmarks/replication package
   holds the parts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from replication import report
from replication.data import DEFAULT_TASKS, EVAL_CLOCK, base_model
from replication.experiments import Study, run_composed, run_task
from replication.granularity import granularity_task, plot_granularity, run_granularity
from replication.methods import BORROWS, LR_GRID, METHODS
from replication.plots import plot_disjoint, routing_figures

from esft_lightning.data import synthetic
from esft_lightning.models import find_moe_layers

REPO = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps and samples: structure only, for CI")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(synthetic.ALL_TASKS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-records", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=128, help="per eval set (validation, test, general)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="cap; a set generates its longest answer + 8")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--profile-tokens", type=int, default=16384)
    p.add_argument("--profile-records", type=int, default=256, help="per domain, for the routing figures")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--granularity-seeds", type=int, default=1)
    p.add_argument("--granularity-task", choices=sorted(synthetic.ALL_TASKS), default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --quick: 1)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "replication")
    return p


def measured_step_s(study: Study, granularity_runs: list[dict]) -> dict[str, float]:
    """Median seconds per step per method over this run's training (sweep, scored runs and granularity)."""
    times: dict[str, list[float]] = {}
    for row in [*study.sweep, *study.runs]:
        if row.get("step_s"):
            times.setdefault(row["method"], []).append(row["step_s"])
    for row in granularity_runs:
        if row.get("step_s"):
            times.setdefault(f"grouped_{row['method']}", []).append(row["step_s"])
    return {m: sorted(v)[len(v) // 2] for m, v in times.items()}


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        # Every part, from a few steps and samples: the structure, not the outcome.
        args.steps, args.seeds, args.train_records, args.eval_samples = 3, 1, 120, 4
        args.max_new_tokens, args.profile_tokens, args.profile_records, args.seq_length = 16, 1024, 32, 128
        # One thread: on a shared CPU, two threads per process spin against other jobs' (a 30 s run took 10 min).
        args.threads = args.threads or 1
    if len(args.tasks) < 2:
        raise SystemExit("--tasks: the composed adapters need at least two tasks")
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        phases[name] = (time.perf_counter() - since) / 60
        return time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        study = Study(args, tmp)
        mark = time.perf_counter()
        figures = routing_figures(args, tmp, args.out)
        mark = lap("figures", mark)
        for task in args.tasks:
            run_task(study, task)
        mark = lap("methods", mark)
        run_composed(study)
        mark = lap("composed", mark)
        granularity_runs, granularity = run_granularity(study)
        lap("granularity", mark)
        num_experts = find_moe_layers(base_model())[0].num_experts
    tasks = list(args.tasks)
    rows = report.summarise(study.runs, tasks, study.lrs)
    composed = report.composed_summary(study.runs, tasks)
    plot_disjoint(study.composed["overlap"][0], tasks, num_experts, args.out)
    g_task = granularity_task(args)
    plot_granularity(granularity, g_task, args.out)
    minutes = (time.perf_counter() - started) / 60
    ablation = len(study.ablation_methods())
    step_s = measured_step_s(study, granularity_runs)
    sample_s = EVAL_CLOCK["seconds"] / max(EVAL_CLOCK["samples"], 1)
    full = parser().parse_args([])  # the defaults: what `python benchmarks/replicate_paper.py` runs
    estimate = report.estimate_minutes(full, ablation)
    plan = {"training_runs": report.training_plan(full, ablation), "eval_sets": report.eval_sets(full, ablation)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "settings": settings,
        "learning_rates": {"chosen": study.lrs, "grid": {m: list(v) for m, v in LR_GRID.items()}, "borrowed": BORROWS},
        "figures": figures,
        "rows": rows,
        "sweep": study.sweep,
        "ablation": {"shared_experts": study.shared_experts, "methods": ["esft_token", *study.ablation_methods()]},
        "composed": {"summary": composed, "overlap": {str(k): v for k, v in study.composed["overlap"].items()}},
        "granularity_task": g_task,
        "granularity": granularity,
        "granularity_runs": granularity_runs,
        "runs": study.runs,
        "minutes": minutes,
        "phase_minutes": phases,
        "measured": {"step_s": step_s, "eval_sample_s": sample_s, "eval": dict(EVAL_CLOCK)},
        "full_run_plan": plan,
        "full_run_estimate_minutes": estimate,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = "\n".join(
        [
            report.main_table([r for r in rows if r["method"] in ("base", *METHODS)], tasks),
            "## Learning-rate sweep (validation set, seed 0; chosen in bold)\n",
            report.sweep_table(study.sweep, tasks, study.lrs),
            "## Ablation: what trains besides the selected experts\n",
            report.ablation_table(rows, tasks, study.shared_experts),
            "## Composed adapters: one model, every task's adapter\n",
            report.composed_table(composed, tasks),
            f"## Expert granularity ({g_task})\n",
            report.granularity_table(granularity, g_task),
        ]
    )
    (args.out / "table.md").write_text(text)
    print(text)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    print(f"{minutes:.1f} minutes ({parts}); written to {args.out}")
    runs = sum(plan["training_runs"].values())
    print(
        f"full run: {runs} training runs of {full.steps} steps, {plan['eval_sets']} eval sets of {full.eval_samples}; "
        "estimate from the previous full run's step times: "
        + ", ".join(f"{k} {v:.1f}" for k, v in estimate.items())
        + " minutes"
    )


if __name__ == "__main__":
    main()
