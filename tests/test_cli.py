"""End to end through `esft`: fit with ExpertSelectionCallback, resume, configs, profile/select, local dirs."""

import csv
import logging
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import load_file

from esft_lightning import ESFTDataModule, ESFTModule, Source
from esft_lightning.callbacks import ExpertSelectionCallback
from esft_lightning.cli import main
from esft_lightning.selection.rules import ExpertConfig, select_experts

from .conftest import FAMILIES, REPO, chat, write_jsonl

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


# Overrides of the deepseek_v3 family's own tiny config (models/deepseek_v3.py): 2 layers, 16 experts.
TINY_DEEPSEEK_V3 = dict(
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
)


def quick_config(tmp_path: Path, steps: int = 6, **callback_args) -> Path:
    """configs/quickstart.yaml shrunk to a few steps; only default_root_dir says where it writes (tmp_path/run)."""
    cfg = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    root = str(tmp_path / "run")
    cfg["trainer"].update(
        max_steps=steps,
        val_check_interval=3,
        limit_val_batches=1,
        default_root_dir=root,
        log_every_n_steps=1,
        enable_progress_bar=False,
    )
    # The quickstart's callbacks but generation-based evaluation and drift (tested on their own), a tiny random
    # DeepSeek-V3-style model instead of the embedded one, and the small intent data: seconds per fit.
    skipped = ("TaskEvalCallback", "RoutingDriftCallback")
    callbacks = [cb for cb in cfg["trainer"]["callbacks"] if not cb["class_path"].endswith(skipped)]
    cfg["trainer"]["callbacks"] = callbacks
    select, checkpoint = callbacks[:2]
    select["init_args"].update(max_tokens=2048, **callback_args)
    checkpoint["init_args"].update(every_n_train_steps=3)
    cfg["model"] = {
        "family": "deepseek_v3",
        "model_config": dict(TINY_DEEPSEEK_V3),
        "optimizer": cfg["model"]["optimizer"],
    }
    cfg["model"]["optimizer"]["init_args"]["lr"] = 1e-3
    cfg["data"].update(seq_length=64, batch_size=2)
    cfg["data"]["task"] = [{"path": str(REPO / "esft_lightning/resources/quickstart/task.jsonl"), "name": "intent"}]
    cfg["data"]["general"] = [
        {"path": str(REPO / "esft_lightning/resources/quickstart/general.jsonl"), "name": "general"}
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_one_step(module: ESFTModule, callback: ExpertSelectionCallback, tmp_path: Path) -> L.Trainer:
    """One training step of ``module`` on 16 small chat records, expert selection by ``callback``."""
    data = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(16)])
    dm = ESFTDataModule(task=[Source(str(data))], seq_length=32, batch_size=2, general_ratio=0)
    trainer = quiet_trainer(tmp_path, callbacks=[callback])
    trainer.fit(module, dm)
    return trainer


def quiet_trainer(tmp_path: Path, **overrides) -> L.Trainer:
    """A CPU Trainer for one step with no logger, checkpoints, progress bar or validation (``overrides`` win)."""
    settings = dict(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,  # nothing may land in the checkout (Lightning's default is the cwd)
    )
    return L.Trainer(**{**settings, **overrides})


def log_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "run" / "logs").glob("version_*"))


def test_fit_end_to_end_writes_selection_heatmap_adapter_and_metrics(tmp_path):
    main(["fit", "--config", str(quick_config(tmp_path))])
    run = log_dirs(tmp_path)[-1]
    config = ExpertConfig.load(run / "expert_cfg.json")
    assert config.num_selected > 0 and config.meta["score_function"] == "token"
    assert (run / "routing_heatmap.png").stat().st_size > 1000
    adapter = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert set(adapter) == {f"model.layers.1.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")}
    assert adapter["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == len(config.experts[1])
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    columns = set(rows[0])
    assert {"train/loss", "val/intent/loss", "val/general/loss", "val/intent/ppl", "train/tokens_per_sec"} <= columns
    assert any(r["val/general/loss"] for r in rows) and any(r["esft/trainable_params"] for r in rows)


def test_default_root_dir_alone_moves_every_output(tmp_path, monkeypatch):
    text = (REPO / "configs/quickstart.yaml").read_text()
    assert text.count("runs/quickstart") == 1  # only default_root_dir names a place; the rest derives from it
    cfg = yaml.safe_load(quick_config(tmp_path / "cfg").read_text())
    cfg["trainer"]["default_root_dir"] = "runs/quickstart"  # as shipped
    (tmp_path / "cfg/quick.yaml").write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "elsewhere"
    main(["fit", "--config", str(tmp_path / "cfg/quick.yaml"), "--trainer.default_root_dir", str(out)])
    assert not (work / "runs").exists() and list(work.iterdir()) == []
    run = out / "logs" / "version_0"
    for name in ("metrics.csv", "expert_cfg.json", "expert_scores.json", "adapter/adapter.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints/last.ckpt").is_file()
    # a second run gets its own version folder, checkpoints included: nothing is shared or renamed last-v1
    main(["fit", "--config", str(tmp_path / "cfg/quick.yaml"), "--trainer.default_root_dir", str(out)])
    assert (out / "logs/version_1/checkpoints/last.ckpt").is_file()
    assert not list(run.glob("checkpoints/last-v*.ckpt"))


def test_ckpt_path_last_resolves_as_lightning_does(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from esft_lightning.run_paths import resolve_ckpt_path

    older, newer = tmp_path / "a", tmp_path / "b"
    for folder, name in ((older, "last.ckpt"), (newer, "last-v1.ckpt")):
        folder.mkdir()
        (folder / name).write_bytes(b"x")
    os.utime(older / "last.ckpt", (1, 1))
    trainer = L.Trainer(
        logger=False,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=older), ModelCheckpoint(dirpath=newer, monitor="val/loss")],
    )
    connector = trainer._checkpoint_connector
    expected = connector._parse_ckpt_path(TrainerFn.FITTING, "last", model_provided=True, model_connected=False)
    assert resolve_ckpt_path(trainer, "last") == str(expected) == str(newer / "last-v1.ckpt")
    assert resolve_ckpt_path(trainer, str(older / "last.ckpt")) == str(older / "last.ckpt")
    empty = L.Trainer(logger=False, default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "c")])
    assert resolve_ckpt_path(empty, "last") is None


def test_kill_and_resume_equals_uninterrupted(tmp_path, caplog):
    epoch = ["--data.num_train_sequences", "10"]  # 5 batches an epoch: the resumed run crosses an epoch end
    main(["fit", "--config", str(quick_config(tmp_path / "a", steps=8)), *epoch])
    uninterrupted = load_file(str(log_dirs(tmp_path / "a")[-1] / "adapter" / "adapter.safetensors"))
    cfg = quick_config(tmp_path / "b", steps=4)  # stops after step 4; last checkpoint: step 3
    main(["fit", "--config", str(cfg), *epoch])
    ckpt = log_dirs(tmp_path / "b")[-1] / "checkpoints/last.ckpt"  # in the run's own version folder
    (ckpt.parent / "epoch=0-step=3.ckpt").replace(ckpt)  # as if killed during step 4
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(cfg), "--trainer.max_steps", "8", "--ckpt_path", "last", *epoch])
    check = (
        "ESFT resume check at global step 3: restored RNG states (numpy, python, torch), data position, optimizer state"
    )
    assert check in caplog.text and "resumed exactly" in caplog.text and "not restored" not in caplog.text
    assert len(log_dirs(tmp_path / "b")) == 1  # the resumed run continued in the version it resumed
    rows = list(csv.DictReader((log_dirs(tmp_path / "b")[-1] / "metrics.csv").open()))
    steps = {int(r["step"]) for r in rows if r["train/loss"]}
    assert {0, 7} <= steps  # the history before the crash is kept, the resumed steps appended
    resumed = load_file(str(log_dirs(tmp_path / "b")[-1] / "adapter" / "adapter.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key  # bitwise: resumed exactly, not close
    small = torch.load(ckpt, weights_only=False)
    assert all("esft_" in k for k in small["state_dict"])  # only trainable tensors are checkpointed


def test_resume_with_other_selection_is_refused(tmp_path):
    cfg = quick_config(tmp_path, steps=3)
    main(["fit", "--config", str(cfg)])
    other = tmp_path / "other.json"
    ExpertConfig({1: [0, 1, 2, 3, 4]}).save(other)
    cfg2 = quick_config(tmp_path, steps=6, expert_config=str(other))
    with pytest.raises(ValueError, match="differs from the selection of the checkpoint"):
        main(["fit", "--config", str(cfg2), "--ckpt_path", "last"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_print_config_round_trips(config, tmp_path, capsys):
    args = ["fit", "--config", str(config)]
    overlays = {
        "fsdp.yaml": "quickstart.yaml",
        "ep.yaml": "quickstart.yaml",
        "deepseek_v2_lite_ep.yaml": "deepseek_v2_lite.yaml",
    }
    if config.name in overlays:  # merged on top of another config
        args = ["fit", "--config", str(REPO / "configs" / overlays[config.name]), "--config", str(config)]
    with pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)


def test_profile_and_select_commands(tmp_path):
    cfg = quick_config(tmp_path)
    main(["select", "--out", str(tmp_path / "cfg.json"), "--max_tokens", "1024", "--config", str(cfg)])
    config = ExpertConfig.load(tmp_path / "cfg.json")
    assert config.experts and config.meta["top_p"] == 0.2
    main(["profile", "--out", str(tmp_path / "scores.json"), "--max_tokens", "1024", "--config", str(cfg)])
    import json

    scores = json.loads((tmp_path / "scores.json").read_text())
    assert abs(sum(scores["token_scores"]["1"].values()) - 1) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_one_step_in_lightning(family, tmp_path):
    module = ESFTModule(family=family, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = fit_one_step(module, ExpertSelectionCallback(max_tokens=256, save_adapter=False, plot=False), tmp_path)
    trained = [p for n, p in module.model.named_parameters() if p.requires_grad]
    assert trained and all("esft_" in n for n, p in module.model.named_parameters() if p.requires_grad)
    assert trainer.global_step == 1
    opt = trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trained}


def test_model_from_local_directory(tmp_path):
    from esft_lightning.data.tokenizer import byte_tokenizer
    from esft_lightning.models import build_tiny_model

    model = build_tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    module = ESFTModule(model=str(tmp_path / "m"))
    loaded = module.build_model()
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert module.tokenizer.encode("hi", add_special_tokens=False) == [104, 105]
    assert not loaded.config.to_dict().get("auto_map")


def test_checkpoint_reloads_with_its_selection_outside_fit(tmp_path):
    main(["fit", "--config", str(quick_config(tmp_path, steps=3))])
    ckpt = log_dirs(tmp_path)[-1] / "checkpoints/last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    module = ESFTModule.load_from_checkpoint(ckpt)  # no callback: the checkpoint brings its selection
    assert module.expert_config.experts == ExpertConfig.from_dict(saved["esft"]["expert_config"]).experts
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(module.get_parameter(name).detach(), tensor), name
    main(["validate", "--config", str(quick_config(tmp_path, steps=3)), "--ckpt_path", str(ckpt)])
    rows = list(csv.DictReader((log_dirs(tmp_path)[-1] / "metrics.csv").open()))
    assert any(r.get("val/intent/loss") for r in rows)  # validated the checkpoint's trained experts
    # `validate --ckpt_path last` finds the run's checkpoint too (in the version folder that holds it)
    main(["validate", "--config", str(quick_config(tmp_path, steps=3)), "--ckpt_path", "last"])
    assert len(log_dirs(tmp_path)) == 2
    rows = list(csv.DictReader((log_dirs(tmp_path)[0] / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("val/intent/loss")) >= 2


def test_existing_expert_config_skips_profiling(tmp_path):
    given = tmp_path / "given.json"
    ExpertConfig({1: [4, 0, 9]}).save(given)
    main(["fit", "--config", str(quick_config(tmp_path, steps=2, expert_config=str(given)))])
    run = log_dirs(tmp_path)[-1]
    assert ExpertConfig.load(run / "expert_cfg.json").experts == {1: [4, 0, 9]}
    assert not (run / "expert_scores.json").exists()  # nothing was profiled


@pytest.mark.parametrize("score_function", ["gate", "random", "all", "none"])
def test_score_functions_and_baselines_through_the_callback(score_function, tmp_path):
    module = ESFTModule(family="qwen2_moe")
    flags = {"shared_experts": True} if score_function == "none" else {}
    callback = ExpertSelectionCallback(score_function, max_tokens=256, save_adapter=False, plot=False, **flags)
    fit_one_step(module, callback, tmp_path)
    experts = callback.config.experts
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    if score_function == "all":
        assert all(v == list(range(16)) for v in experts.values())
        assert {n for n in trainable if "experts." in n} == {
            f"model.layers.{k}.mlp.experts.{p}" for k in experts for p in ("gate_up_proj", "down_proj")
        }
    elif score_function == "none":
        assert all(v == [] for v in experts.values()) and trainable
        assert all("shared_expert" in n for n in trainable)
    else:
        assert callback.top_p == (0.1 if score_function == "gate" else 0.2)
        assert all(v for v in experts.values())
        assert trainable == {
            f"model.layers.{k}.mlp.experts.esft_{p}" for k in experts for p in ("gate_up_proj", "down_proj")
        }
    if score_function == "random":
        token = select_experts(callback.profile.token_scores, 0.2).experts
        assert {k: len(v) for k, v in experts.items()} == {k: len(v) for k, v in token.items()}


def test_esft_help_lists_every_command_and_an_unknown_one_gets_the_list(capsys):
    from esft_lightning.cli import main
    from esft_lightning.cli.commands import COMMANDS
    from esft_lightning.cli.dispatch import TOOL_MAINS as TOOLS

    main(["--help"])
    listed = capsys.readouterr().out
    for name in ("fit", "validate", "test", *TOOLS):
        assert re.search(rf"^  {name}\s+\S", listed, re.MULTILINE), name  # every command, with its purpose
    assert set(TOOLS) <= set(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main(["families"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'families'" in err and all(f"  {name} " in err for name in COMMANDS)


@pytest.mark.parametrize("command", ["plan", "profile", "select", "merge", "eval"])
def test_each_command_help_says_what_it_shares_with_esft_fit(command, capsys):
    from esft_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if command in ("merge", "eval"):
        assert "shares no arguments with `esft fit`" in text
    else:
        assert "`esft fit`'s arguments" in text and "--config" in text
