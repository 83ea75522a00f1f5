"""Small things a user notices: the progress bar label, the license, the torch pin, logs without a logger."""

import re

import lightning as L
import pytest
import torch
from packaging.specifiers import SpecifierSet

from esft_lightning import ESFTModule
from esft_lightning.callbacks import ExpertSelectionCallback, RichEpochProgressBar
from esft_lightning.cli import make_cli

from .conftest import REPO
from .test_cli import fit_one_step, quick_config


@pytest.mark.parametrize("limits, label", [({"max_steps": 5}, "Epoch 0"), ({"max_epochs": 3}, "Epoch 0/2")])
def test_progress_bar_label_without_negative_epochs(limits, label):
    bar = RichEpochProgressBar()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, callbacks=[bar], **limits)
    bar.setup(trainer, None, "fit")
    assert bar._get_train_description(0).strip() == label


def test_the_cli_uses_the_fixed_progress_bar_unless_bars_are_off(tmp_path):
    cfg = quick_config(tmp_path)
    on = make_cli(["--config", str(cfg), "--trainer.enable_progress_bar", "true"], run=False)
    assert isinstance(on.trainer.progress_bar_callback, RichEpochProgressBar)
    off = make_cli(["--config", str(cfg)], run=False)  # quick_config turns bars off: no conflict, no bar
    assert off.trainer.progress_bar_callback is None


def test_license_file_matches_pyproject_and_torch_pin_matches_readme():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    torch_spec = SpecifierSet(next(d for d in project["dependencies"] if d.startswith("torch>")).removeprefix("torch"))
    pins = set(re.findall(r"torch==([\d.]+)", (REPO / "README.md").read_text()))
    assert pins and all(pin in torch_spec for pin in pins)  # the README's pin is what pyproject admits
    assert torch.__version__.split("+")[0] in torch_spec  # and what the tests run on


def test_callback_without_a_logger_warns_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = ESFTModule(family="qwen2_moe")
    callback = ExpertSelectionCallback(max_tokens=256, plot=False)  # save_adapter on, but no log dir
    with pytest.warns(UserWarning, match="no logger, so no log directory"):
        fit_one_step(module, callback, tmp_path)
    assert not list(tmp_path.rglob("expert_cfg.json")) and not list(tmp_path.rglob("adapter.safetensors"))
