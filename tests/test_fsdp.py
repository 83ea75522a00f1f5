"""FSDP2 (ModelParallelStrategy) with two CPU processes over gloo, end to end through `esft fit`."""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from esft_lightning.selection.rules import ExpertConfig

from .conftest import REPO
from .test_cli import quick_config

pytestmark = pytest.mark.slow  # two processes each; CI runs them too


def two_process_fit(cfg, cwd, *extra: str, strategy_config: str = "configs/fsdp.yaml", devices: int = 2) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    strategy = ["--config", str(REPO / strategy_config)] if strategy_config else ["--trainer.strategy", "ddp"]
    cmd = [
        sys.executable,
        "-m",
        "esft_lightning.cli",
        "fit",
        "--config",
        str(cfg),
        *strategy,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        *extra,
    ]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


def test_fsdp_two_processes_shards_and_selects_identically(tmp_path):
    out = two_process_fit(
        quick_config(tmp_path, steps=3, save_merged=True), tmp_path, "--model.save_trainable_only", "false"
    )
    assert re.search(r"rank 0 selected \d+ experts; broadcast to 2 ranks", out)
    shares = [float(s) for s in re.findall(r"ESFT FSDP rank \d: parameter bytes \d+ local of \d+ \(([\d.]+)\)", out)]
    assert len(shares) == 2 and all(0.45 <= s <= 0.55 for s in shares), shares
    memory = re.findall(r"ESFT memory rank \d: param_bytes (\d+), grad_bytes (\d+), optimizer_state_bytes (\d+)", out)
    assert len(memory) == 2
    for param, grad, state in memory:  # each rank holds a shard of the trainables' grads and AdamW state
        assert int(grad) > 0 and int(state) == 2 * int(grad) and int(grad) < int(param) / 10
    run = sorted((tmp_path / "run" / "logs").glob("version_*"))[-1]
    config = ExpertConfig.load(run / "expert_cfg.json")
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    for layer, ids in config.experts.items():
        assert adapter[f"model.layers.{layer}.mlp.experts.gate_up_proj"].shape[0] == len(ids)
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/ppl")]
    assert rows  # perplexity of the global loss, not the mean of the ranks' exp(partial loss)
    for row in rows:
        assert float(row["train/ppl"]) == pytest.approx(math.exp(float(row["train/loss"])), rel=1e-5)
    # save_trainable_only: false -> the whole model under its own keys and shapes, trained rows merged in
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert {k for k in state if "esft_" in k} == {
        f"model.model.layers.{layer}.mlp.experts.esft_{name}"
        for layer in config.experts
        for name in ("gate_up_proj", "down_proj")
    }  # the whole model under its own keys, plus the small trained copies
    for layer, ids in config.experts.items():
        fused = state[f"model.model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert fused.device.type == "cpu" and fused.shape[0] == 16  # every routed expert, merged on CPU
        torch.testing.assert_close(fused[ids], adapter[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
        copy = state[f"model.model.layers.{layer}.mlp.experts.esft_gate_up_proj"]  # resume loads these directly
        torch.testing.assert_close(copy, adapter[f"model.layers.{layer}.mlp.experts.gate_up_proj"])
    # save_merged: a save_pretrained directory gathered from the shards, which stock transformers loads
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in merged.parameters())
    for layer, ids in config.experts.items():
        fused = merged.model.layers[layer].mlp.experts.gate_up_proj.detach()
        torch.testing.assert_close(fused[ids], adapter[f"model.layers.{layer}.mlp.experts.gate_up_proj"])


@pytest.mark.parametrize("ranks", [2, 3])
def test_fsdp_adapter_equals_single_process_run(tmp_path, ranks):
    """Plain-text data (every token trained, equal token counts per rank): N ranks x batch b == 1 x batch N*b, the
    model saved in several safetensors shards, every rank reading only its own shards of it."""
    from esft_lightning import ESFTModule
    from esft_lightning.cli import main

    adapters = {}
    per_rank = 4 // ranks if 4 % ranks == 0 else 1
    for name, devices, batch in (("fsdp", ranks, per_rank), ("single", 1, ranks * per_rank)):
        cfg_path = quick_config(tmp_path / name, steps=3)
        cfg = yaml.safe_load(cfg_path.read_text())
        if devices > 1:  # a model directory in several files; every rank builds on meta and reads its shards
            saved = ESFTModule(family=cfg["model"]["family"], model_config=cfg["model"]["model_config"], seed=0)
            saved.build_model().save_pretrained(tmp_path / "model", max_shard_size="300KB")
            assert len(list((tmp_path / "model").glob("*.safetensors"))) > 1
        cfg["model"] = {"model": str(tmp_path / "model")}
        cfg["data"].update(
            task=[{"path": str(REPO / "esft_lightning/resources/quickstart/general.jsonl"), "name": "text"}],
            general=[],
            batch_size=batch,
        )
        cfg["trainer"]["callbacks"][0]["init_args"].update(max_tokens=1024)
        cfg_path.write_text(yaml.safe_dump(cfg))
        if devices > 1:
            out = two_process_fit(cfg_path, tmp_path, devices=devices)
            assert "every rank reads its own shards from the safetensors files" in out
            read = [int(b) for b in re.findall(r"(\d+) bytes read from the safetensors files", out)]
            assert len(read) == ranks and all(0 < b < 0.75 * sum(read) for b in read), read
        else:
            main(["fit", "--config", str(cfg_path)])
        run = sorted((tmp_path / name / "run" / "logs").glob("version_*"))[-1]
        adapters[name] = (
            ExpertConfig.load(run / "expert_cfg.json").experts,
            load_file(str(run / "adapter/adapter.safetensors")),
        )
    assert adapters["fsdp"][0] == adapters["single"][0]  # same profile -> same selection
    for key, value in adapters["single"][1].items():
        torch.testing.assert_close(adapters["fsdp"][1][key], value, atol=1e-5, rtol=1e-4)


def resume_equals_uninterrupted(
    tmp_path, *settings: str, strategy_config: str = "configs/fsdp.yaml", devices: int = 2
) -> Path:
    """Two ``esft fit`` runs on ``devices`` ranks: 6 steps uninterrupted (keeping its step-3 checkpoint), and one
    resumed from that checkpoint to step 6, as if killed during step 4. Their adapters are bitwise equal. Returns
    the step-3 checkpoint. (``--ckpt_path last`` after a real SIGKILL: tests/test_determinism.py.)"""
    uninterrupted = quick_config(tmp_path / "a", steps=6)
    cfg = yaml.safe_load(uninterrupted.read_text())
    cfg["trainer"]["callbacks"][1]["init_args"]["save_top_k"] = -1  # keep step 3's checkpoint next to step 6's
    uninterrupted.write_text(yaml.safe_dump(cfg))
    two_process_fit(uninterrupted, tmp_path, *settings, strategy_config=strategy_config, devices=devices)
    run_a = sorted((tmp_path / "a/run/logs").glob("version_*"))[-1]
    ckpt = run_a / "checkpoints/epoch=0-step=3.ckpt"
    resumed = quick_config(tmp_path / "b", steps=6)
    resume = ("--ckpt_path", str(ckpt))
    out = two_process_fit(resumed, tmp_path, *settings, *resume, strategy_config=strategy_config, devices=devices)
    assert "resuming with the checkpoint's expert selection" in out
    assert "resumed exactly" in out and "not restored" not in out  # the resume check, on every rank's states
    run_b = sorted((tmp_path / "b/run/logs").glob("version_*"))[-1]
    a, b = load_file(str(run_a / "adapter/adapter.safetensors")), load_file(str(run_b / "adapter/adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # bitwise: resumed exactly, not close
        assert torch.equal(b[key], a[key]), (key, float((b[key] - a[key]).abs().max()))
    return ckpt


HOST_ADAMW = ("--model.optimizer", "esft_lightning.optimizers.HostOffloadAdamW")
HOST_ADAMW += ("--model.optimizer.chunk_bytes", "4096")  # several chunks a step


@pytest.mark.parametrize(
    "settings",
    [
        # small checkpoints (trainable tensors only) of an fp32 model, AdamW's state in host memory: DTensor state
        # with host shards, gathered into the file by torch.distributed.checkpoint and broadcast back on resume
        HOST_ADAMW,
        # whole-model checkpoints of a bf16 model with fp32 trained copies, torch's AdamW: the default GPU recipe
        ("--model.save_trainable_only", "false", "--model.dtype", "bfloat16"),
    ],
    ids=["small-fp32-host-adamw", "full-bf16"],
)
def test_fsdp_kill_and_resume_equals_uninterrupted(tmp_path, settings):
    ckpt = resume_equals_uninterrupted(tmp_path, *settings)
    saved = torch.load(ckpt, weights_only=True)
    if settings == HOST_ADAMW:  # AdamW's format: both estimates of every trained tensor, shaped like it
        state = saved["optimizer_states"][0]["state"]
        assert state and all(s["exp_avg"].shape == s["exp_avg_sq"].shape for s in state.values())
        assert any(bool(s["exp_avg_sq"].gt(0).any()) for s in state.values())  # updated in place on the host
    else:
        assert saved["esft"]["trainable_dtype"] == "torch.float32"


def test_ddp_two_processes_train_with_unused_experts_allowed(tmp_path):
    out = two_process_fit(quick_config(tmp_path, steps=3), tmp_path, strategy_config="")
    assert "find_unused_parameters=True" in out
    assert re.search(r"rank 0 selected \d+ experts; broadcast to 2 ranks", out)
    run = sorted((tmp_path / "run" / "logs").glob("version_*"))[-1]
    assert (run / "adapter" / "adapter.safetensors").exists()
