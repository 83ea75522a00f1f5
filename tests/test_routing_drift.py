"""RoutingDriftCallback: JS divergence of token scores from fit start; 0 when nothing trains, > 0 after training."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from esft_lightning import ESFTDataModule, ESFTModule
from esft_lightning.callbacks import ExpertSelectionCallback, RoutingDriftCallback
from esft_lightning.callbacks.routing_drift import js_divergence
from esft_lightning.data.sources import Source

from .conftest import chat, write_jsonl


def test_js_divergence_bounds():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, torch.tensor([0.0, 0.0, 1.0])) == pytest.approx(math.log(2))
    assert 0 < js_divergence(p, torch.tensor([0.4, 0.6, 0.0])) < 0.05


def _fit(tmp_path, lr: float, score_function: str) -> tuple[RoutingDriftCallback, list[dict]]:
    task = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(32)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"some general text number {i}"} for i in range(32)])
    dm = ESFTDataModule(task=[Source(str(task))], general=[Source(str(general))], seq_length=32, batch_size=4)
    drift = RoutingDriftCallback(max_tokens=512)
    logger = CSVLogger(tmp_path, name=f"lr{lr}")
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[ExpertSelectionCallback(score_function, plot=False, save_adapter=False), drift],
    )
    trainer.fit(ESFTModule(family="qwen3_moe", optimizer=lambda p: torch.optim.AdamW(p, lr=lr)), dm)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return drift, list(csv.DictReader(f))


def test_drift_is_zero_when_nothing_changes_and_positive_after_training(tmp_path):
    still, _ = _fit(tmp_path, lr=0.0, score_function="all")
    assert still.history[-1]["drift/task/js_mean"] == 0.0 and still.history[-1]["drift/general/js_mean"] == 0.0
    # Training the routed experts changes the input of every later layer, so its routing moves; the first MoE
    # layer's router sees only frozen embeddings and attention, so its routing stays exactly where it was.
    moved, rows = _fit(tmp_path, lr=0.05, score_function="all")
    last = moved.history[-1]
    assert last["drift/task/js_mean"] > 1e-4 and last["drift/general/js_mean"] > 1e-4
    assert last["drift/task/js_layer0"] == 0.0 and last["drift/task/js_layer1"] > 1e-4
    logged = {k for r in rows for k, v in r.items() if v and k.startswith("drift/")}
    assert {"drift/task/js_mean", "drift/general/js_mean", "drift/task/js_layer0", "drift/general/js_layer1"} <= logged


def test_drift_without_general_data_measures_the_task_only(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(16)])
    dm = ESFTDataModule(task=[Source(str(task))], seq_length=32, batch_size=4, general_ratio=0)
    drift = RoutingDriftCallback(max_tokens=256)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[ExpertSelectionCallback(max_tokens=256, plot=False, save_adapter=False), drift],
    )
    with pytest.warns(UserWarning, match="task drift only"):
        trainer.fit(ESFTModule(family="qwen3_moe"), dm)
    assert "drift/task/js_mean" in drift.history[-1] and not any("general" in k for k in drift.history[-1])
