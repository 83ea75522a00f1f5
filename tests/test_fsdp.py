"""FSDP2 (ModelParallelStrategy) with two CPU processes over gloo, end to end through `esft fit`."""

import os
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file

from esft_lightning.selection import ExpertConfig

from .conftest import REPO
from .test_cli import quick_config


def fsdp_fit(cfg, cwd, *extra: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "esft_lightning.cli",
        "fit",
        "--config",
        str(cfg),
        "--config",
        str(REPO / "configs/fsdp.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        *extra,
    ]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


def test_fsdp_two_processes_shards_and_selects_identically(tmp_path):
    out = fsdp_fit(quick_config(tmp_path, steps=4), tmp_path)
    assert re.search(r"the same \d+ experts selected on all 2 ranks", out)
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
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert all("esft_" in k for k in ckpt["state_dict"])  # gathered trainable tensors only


def test_fsdp_adapter_equals_single_process_run(tmp_path):
    """Plain-text data (every token trained, equal token counts per rank): 2 ranks x batch 2 == 1 x batch 4."""
    import yaml

    from esft_lightning.cli import main

    adapters = {}
    for name, devices, batch in (("fsdp", 2, 2), ("single", 1, 4)):
        cfg_path = quick_config(tmp_path / name, steps=3)
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["data"].update(
            task=[{"path": str(REPO / "esft_lightning/resources/quickstart/general.jsonl"), "name": "text"}],
            general=[],
            batch_size=batch,
        )
        cfg["trainer"]["callbacks"][0]["init_args"].update(max_tokens=1024)
        cfg_path.write_text(yaml.safe_dump(cfg))
        if devices == 2:
            fsdp_fit(cfg_path, tmp_path)
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


def test_fsdp_kill_and_resume_equals_uninterrupted(tmp_path):
    fsdp_fit(quick_config(tmp_path / "a", steps=6), tmp_path)
    run_a = sorted((tmp_path / "a/run/logs").glob("version_*"))[-1]
    cfg = quick_config(tmp_path / "b", steps=4)
    fsdp_fit(cfg, tmp_path)
    ckpt = sorted((tmp_path / "b/run/logs").glob("version_*"))[-1] / "checkpoints/last.ckpt"
    (ckpt.parent / "epoch=0-step=3.ckpt").replace(ckpt)  # as if killed during step 4
    out = fsdp_fit(cfg, tmp_path, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert "resuming with the checkpoint's expert selection" in out
    run_b = sorted((tmp_path / "b/run/logs").glob("version_*"))[-1]
    a, b = load_file(str(run_a / "adapter/adapter.safetensors")), load_file(str(run_b / "adapter/adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
