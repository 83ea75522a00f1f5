"""The miniature replication: its --quick run's tables, plots and results.json (structure, never the outcome), and
the parts that decide what it reports (lr choice on validation only, summaries, composed ratio, runtime plan)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from .conftest import REPO

sys.path.append(str(REPO / "benchmarks"))  # after installed packages: none shadowed

from replication import experiments, report  # noqa: E402
from replication.data import new_tokens  # noqa: E402
from replication.methods import LR_GRID, SWEPT  # noqa: E402

from esft_lightning.data import synthetic  # noqa: E402
from esft_lightning.selection.rules import ExpertConfig  # noqa: E402

GRANULARITY_KEYS = {"group_size", "method", "task_em", "general_em", "trained_experts", "trained_params"}


@pytest.mark.slow  # a subprocess of about 45 s
def test_quick_replication_writes_every_table_plot_and_result(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks/replicate_paper.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for name in ("table.md", "results.json", "concentration.png", "overlap.png", "disjoint.png", "granularity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "table.md").read_text()
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["method", "lexicon EM / chrF", "cipher EM / chrF"] and len(header) == 10
    methods = [line.split("|")[1].strip().split(" ")[0] for line in lines[2:9]]
    assert methods == ["pretrained", "full", "ESFT-Token", "ESFT-Gate", "LoRA", "random", "frozen"]
    for section in ("Learning-rate sweep", "Ablation", "Composed adapters", "Expert granularity"):
        assert f"## {section}" in text
    assert "n/a: the model has no shared experts" in text

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"settings", "rows", "granularity", "sweep", "composed", "learning_rates"} <= set(results)
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {*report.ORDER} - {"esft_token_shared", "shared_only"}
    assert all(isinstance(rows[m][f"{t}_em"], float) for m in rows for t in ("lexicon", "cipher"))
    # every swept method: two grid points per task in --quick, the chosen lr one of them, used for the row
    for method in SWEPT:
        for task in ("lexicon", "cipher"):
            tried = {p["lr"] for p in results["sweep"] if (p["method"], p["task"]) == (method, task)}
            assert tried == set(LR_GRID[method][:2])
            assert results["learning_rates"]["chosen"][method][task] in tried
            assert rows[method][f"{task}_lr"] == results["learning_rates"]["chosen"][method][task]
    assert rows["random"]["cipher_lr"] == rows["esft_token"]["cipher_lr"]  # borrowed: same lr as ESFT-Token
    overlap = results["composed"]["overlap"]["0"]
    assert overlap["shared_experts_after"] == 0 and overlap["jaccard_after"]["lexicon"][1] == 0.0
    assert {r["overlap"] for r in results["runs"] if r["method"] == "merged"} <= {"refuse", "average"}
    granularity = results["granularity"]
    assert {(g["group_size"], g["method"]) for g in granularity} == {
        (size, method) for size in (1, 2, 4) for method in ("base", "esft_token", "esft_gate", "fft")
    }
    assert all(GRANULARITY_KEYS <= set(g) for g in granularity)
    assert results["full_run_estimate_minutes"]["total"] < 45


def fake_data(task: str = "cipher") -> SimpleNamespace:
    val = [{"prompt": "v", "answers": ["a"]}]
    test = [{"prompt": "t", "answers": ["b"]}]
    return SimpleNamespace(task=task, seed=0, val=val, test=test, general=test)


def test_the_sweep_chooses_on_the_validation_set_and_never_looks_at_the_test_set(monkeypatch):
    val_em = {1.5e-3: 0.5, 5e-3: 0.75, 1.5e-2: 0.75}  # a tie at the top: chrF decides, then the lower lr
    chrf = {1.5e-3: 0.9, 5e-3: 0.8, 1.5e-2: 0.8}
    seen = []

    def fit(method, data, selections, lr, args):
        return SimpleNamespace(lr=lr), {"lr": lr, "step_s": 0.1, "train_s": 1.0}

    def evaluate(model, samples, args):
        seen.append(samples[0]["prompt"])
        return {"exact_match": val_em[model.lr], "chrf": chrf[model.lr]}

    monkeypatch.setattr(experiments, "fit", fit)
    monkeypatch.setattr(experiments, "evaluate", evaluate)
    study = SimpleNamespace(args=SimpleNamespace(quick=False), sweep=[], lrs={"esft_token": {}})
    model, facts = experiments.sweep(study, "esft_token", fake_data(), {})
    assert seen == ["v", "v", "v"]  # validation only
    assert facts["lr"] == model.lr == 5e-3 == study.lrs["esft_token"]["cipher"]
    assert [p["lr"] for p in study.sweep] == list(LR_GRID["esft_token"])


def run(method: str, task: str, seed: int, em: float, general: float = 0.5, **extra) -> dict:
    return dict(method=method, task=task, seed=seed, task_em=em, task_chrf=em, general_em=general, **extra)


def test_summary_means_sample_sd_and_one_general_score_per_model():
    runs = [run("esft_token", "cipher", s, em, lr=5e-3, step_s=0.1) for s, em in enumerate([0.5, 0.7, 0.9])]
    runs += [run("esft_token", "command", s, 0.2, general=0.6) for s in range(3)]
    runs += [run("composed", t, 0, 0.4, general=0.3) for t in ("cipher", "command")]
    rows = {r["method"]: r for r in report.summarise(runs, ["command", "cipher"], {})}
    token = rows["esft_token"]
    assert token["cipher_em"] == pytest.approx(0.7) and token["cipher_em_sd"] == pytest.approx(0.2)
    assert token["task_em"] == pytest.approx((0.7 + 0.2) / 2) and token["cipher_lr"] == 5e-3
    assert token["general_em"] == pytest.approx(0.55) and token["seeds"] == 3
    assert rows["composed"]["general_em"] == 0.3 and rows["composed"]["general_em_sd"] is None
    table = report.main_table(list(rows.values()), ["command", "cipher"])
    assert "0.700 ± 0.200 / 0.700" in table and "5.0e-03" in table


def test_composed_ratio_is_against_the_disjoint_adapter_alone():
    runs = [run("disjoint", "cipher", s, 1.0) for s in range(2)] + [run("composed", "cipher", s, 0.85) for s in (0, 1)]
    runs += [run("disjoint", "command", 0, 0.0), run("composed", "command", 0, 0.0)]
    summary = report.composed_summary(runs, ["cipher", "command"])
    assert summary["cipher"]["ratio"] == pytest.approx(0.85) and summary["cipher"]["target_met"] is False
    assert summary["command"]["ratio"] is None  # nothing learned alone: no ratio, no verdict
    assert "0.85 (missed)" in report.composed_table(summary, ["cipher", "command"])


def test_selection_overlap_helpers():
    a = ExpertConfig({0: [1, 2], 1: [3]})
    b = ExpertConfig({0: [2, 4], 1: [5]})
    assert experiments.jaccard(a, b) == pytest.approx((1 / 3 + 0) / 2)
    assert experiments.shared_count({"a": a, "b": b}) == 1 and experiments.shared_count({"a": a}) == 0


def test_generation_length_covers_the_longest_answer():
    intent = synthetic.eval_records("intent", 64)
    assert new_tokens(intent, 96) >= max(len(r["answers"][0]) for r in intent) > 48  # what 48 bytes cut short
    assert new_tokens([{"prompt": "p", "answers": ["abc", "abcdef"]}], 96) == 6 + 8
    assert new_tokens(intent, 16) == 16


def test_the_default_run_fits_the_budget_by_the_reference_step_times():
    import replicate_paper

    args = replicate_paper.parser().parse_args([])
    assert args.seeds >= 3 and args.eval_samples >= 128 and all(len(LR_GRID[m]) >= 3 for m in SWEPT)
    plan = report.training_plan(args, ablation=1)
    assert plan["fft"] == len(args.tasks) * (len(LR_GRID["fft"]) + args.seeds - 1)
    assert plan["grouped_fft"] == len(args.group_sizes) * args.granularity_seeds
    assert report.estimate_minutes(args, ablation=1)["total"] < 45
