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


def test_fsdp_two_processes_shards_and_selects_identically(tmp_path):
    cfg = quick_config(tmp_path, steps=4)
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
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert re.search(r"the same \d+ experts selected on all 2 ranks", out)
    shares = [float(s) for s in re.findall(r"ESFT FSDP rank \d: parameter bytes \d+ local of \d+ \(([\d.]+)\)", out)]
    assert len(shares) == 2 and all(0.45 <= s <= 0.55 for s in shares), shares
    run = sorted((tmp_path / "run" / "logs").glob("version_*"))[-1]
    config = ExpertConfig.load(run / "expert_cfg.json")
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    for layer, ids in config.experts.items():
        assert adapter[f"model.layers.{layer}.mlp.experts.gate_up_proj"].shape[0] == len(ids)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all("esft_" in k for k in ckpt["state_dict"])  # gathered trainable tensors only
