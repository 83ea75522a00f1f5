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
            cmd = [
                sys.executable,
                "-m",
                "esft_lightning.cli",
                "fit",
                "--config",
                str(cfg_path),
                "--config",
                str(REPO / "configs/fsdp.yaml"),
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "2",
            ]
            done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
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
