"""TaskEvalCallback and RoutingDriftCallback under two FSDP2 processes (gloo): shards generated, gathered, logged."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from .conftest import REPO, chat, write_jsonl
from .test_fsdp import two_process_fit

pytestmark = pytest.mark.slow  # two processes; CI runs it too


def test_task_eval_and_drift_under_two_fsdp_ranks(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(40)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general text {i}"} for i in range(40)])
    evals = [{"prompt": f"User: question {i}\n\nAssistant:", "answers": [f"answer {i}"]} for i in range(5)]
    eval_path = write_jsonl(tmp_path / "qa.jsonl", evals)  # 5 samples: the two ranks' shards are padded
    root = str(tmp_path / "run")
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 2,
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": root,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root}},
            "callbacks": [
                {"class_path": "esft_lightning.callbacks.ExpertSelectionCallback", "init_args": {"max_tokens": 512}},
                {
                    "class_path": "esft_lightning.callbacks.TaskEvalCallback",
                    "init_args": {"eval_sets": [{"path": str(eval_path), "name": "qa"}], "max_new_tokens": 4},
                },
                {"class_path": "esft_lightning.callbacks.RoutingDriftCallback", "init_args": {"max_tokens": 256}},
            ],
        },
        "model": {"family": "qwen3_moe"},
        "data": {
            "task": [{"path": str(task), "name": "task"}],
            "general": [{"path": str(general), "name": "general"}],
            "seq_length": 32,
            "batch_size": 2,
        },
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = two_process_fit(config, REPO)
    run = sorted((tmp_path / "run" / "lightning_logs").glob("version_*"))[-1]
    saved = json.loads((run / "task_eval.json").read_text())
    assert [e["step"] for e in saved["evaluations"]] == [0, 2]
    # A tiny model fits: gathered once per evaluation (before training and after it), not at every new token.
    assert [e["generation"]["mode"] for e in saved["evaluations"]] == ["unsharded", "unsharded"]
    assert out.count("ESFT generation under FSDP2: model unsharded once for the evaluation") == 2
    predictions = saved["evaluations"][0]["sets"]["qa"]["predictions"]
    assert [p["prompt"] for p in predictions] == [e["prompt"] for e in evals]  # every sample once, in order
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {int(r["step"]) for r in rows if r.get("eval/qa/exact_match")} == {0, 2}
    assert any(r.get("drift/task/js_mean") for r in rows) and any(r.get("drift/general/js_mean") for r in rows)
