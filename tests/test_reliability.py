"""Faults: non-finite loss, failed writes (disk full), SIGKILL mid-fit / mid-checkpoint / mid-adapter, security."""

import errno
import inspect
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from esft_lightning import ESFTDataModule, ESFTModule, Source
from esft_lightning.adapters import load_adapter, save_adapter
from esft_lightning.callbacks import ExpertSelectionCallback, NonFiniteLossError, NonFiniteLossGuard, ResumeCheck
from esft_lightning.checkpoint_io import AtomicCheckpointIO
from esft_lightning.cli import main
from esft_lightning.files import WriteError, atomic_write_dir

from .conftest import REPO, chat, write_jsonl
from .test_cli import log_dirs, quick_config

DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


class NaNAtStep(ESFTModule):
    """ESFTModule whose loss is NaN at one training batch (as a bad batch or an overflow would make it); the
    batch is counted over the whole run (Lightning's batch progress, restored on resume)."""

    def __init__(self, nan_step: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        loss = super().training_step(batch, batch_idx)
        batch_number = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1
        return loss * float("nan") if batch_number == self.nan_step else loss


def trainables(module: ESFTModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def small_fit(module: ESFTModule, tmp_path: Path, steps: int, *callbacks, plugins=None, ckpt_path=None) -> L.Trainer:
    data = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(16)])
    dm = ESFTDataModule(task=[Source(str(data))], seq_length=32, batch_size=2, general_ratio=0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        plugins=plugins,
        callbacks=[
            ExpertSelectionCallback(max_tokens=256, save_adapter=False, plot=False),
            ModelCheckpoint(save_last=True, every_n_train_steps=2, save_top_k=-1),
            *callbacks,
        ],
    )
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def test_nonfinite_loss_stops_before_the_weights_change_and_keeps_the_last_checkpoint(tmp_path):
    module = NaNAtStep(nan_step=5, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    seen = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            seen["before"] = trainables(pl_module)

    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at global step 5 .*last checkpoint: .*"):
        small_fit(module, tmp_path, 10, NonFiniteLossGuard("stop"), Snapshot())
    after = trainables(module)
    assert all(torch.equal(after[n], seen["before"][n]) for n in after)  # the NaN step never reached the weights
    last = torch.load(log_dirs_of(tmp_path)[-1] / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_nonfinite_loss_skip_drops_the_step_and_logs_the_count(tmp_path):
    module = NaNAtStep(
        nan_step=3,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)),
    )
    seen = []  # (global step, lr, trainables) at the start of every batch

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"], trainables(pl_module)))

    guard = NonFiniteLossGuard("skip")
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        trainer = small_fit(module, tmp_path, 6, guard, Snapshot())
    assert guard.skipped == 1 and trainer.global_step == 6 and len(seen) == 7  # 6 steps took 7 batches
    assert [step for step, _, _ in seen] == [0, 1, 2, 3, 3, 4, 5]  # the skipped batch is not an optimizer step
    assert [lr for _, lr, _ in seen] == [1e-2 * (1 / (1 + step)) for step, _, _ in seen]  # nor a scheduler step
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    assert all(torch.equal(seen[3][2][n], seen[4][2][n]) for n in seen[3][2])  # batch 3 changed nothing
    assert not all(torch.equal(seen[4][2][n], seen[5][2][n]) for n in seen[4][2])  # later steps train again
    assert all(torch.isfinite(p).all() for p in trainables(module).values())
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {6}  # AdamW counted 6 updates
    metrics = (log_dirs_of(tmp_path)[-1] / "metrics.csv").read_text()
    assert "train/nonfinite_skipped" in metrics.splitlines()[0]
    last = torch.load(log_dirs_of(tmp_path)[-1] / "checkpoints/last.ckpt", weights_only=True)
    assert last["callbacks"]["NonFiniteLossGuard"] == {"skipped": 1}  # the count survives a resume


def test_resume_after_a_skipped_step_is_exact(tmp_path):
    def module() -> NaNAtStep:
        return NaNAtStep(
            nan_step=1,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)),
        )

    (tmp_path / "whole").mkdir()
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        whole = small_fit(whole_module := module(), tmp_path / "whole", 6, NonFiniteLossGuard("skip"))
    (tmp_path / "part").mkdir()
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        small_fit(module(), tmp_path / "part", 4, NonFiniteLossGuard("skip"))  # stops after the skip, at step 4
    last = log_dirs_of(tmp_path / "part")[-1] / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    guard = NonFiniteLossGuard("skip")
    resumed = small_fit(resumed_module := module(), tmp_path / "part", 6, guard, ckpt_path=str(last))
    assert guard.skipped == 1 and resumed.global_step == whole.global_step == 6
    assert resumed.optimizers[0].param_groups[0]["lr"] == whole.optimizers[0].param_groups[0]["lr"]
    expected = trainables(whole_module)
    assert all(torch.equal(t, expected[n]) for n, t in trainables(resumed_module).items())


def log_dirs_of(root: Path) -> list[Path]:
    return sorted((root / "logs").glob("version_*"))


def test_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save, calls = torch.save, [0]

    def fails_on_third(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
        calls[0] += 1
        if calls[0] == 3:  # the step-4 checkpoint (step 2 wrote two files: epoch=...ckpt and last.ckpt)
            f.write(b"partial")
            raise DISK_FULL
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fails_on_third)
    module = ESFTModule(family="deepseek_v3", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    with pytest.raises(WriteError, match=r"could not write .*step=4\.ckpt: No space left on device; the previous"):
        small_fit(module, tmp_path, 6, plugins=[AtomicCheckpointIO()])
    folder = log_dirs_of(tmp_path)[-1] / "checkpoints"
    monkeypatch.undo()
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2  # intact, loadable
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no temp file left


@pytest.mark.parametrize(
    "error", [DISK_FULL, PermissionError(errno.EACCES, "Permission denied")], ids=["disk-full", "permission"]
)
def test_failed_adapter_write_names_the_path_and_keeps_the_previous_adapter(tmp_path, monkeypatch, error):
    import esft_lightning.adapters as adapters
    from esft_lightning.experts.split import apply_expert_config
    from esft_lightning.models import build_tiny_model
    from esft_lightning.selection.rules import ExpertConfig

    model = build_tiny_model("qwen3_moe")
    apply_expert_config(model, ExpertConfig({0: [1, 2]}))
    save_adapter(model, tmp_path / "adapter")
    before = load_file(str(tmp_path / "adapter/adapter.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def disk_full(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        Path(filename).write_bytes(b"torn")
        raise error

    monkeypatch.setattr(adapters, "save_file", disk_full)
    with pytest.raises(WriteError, match=rf"could not write {tmp_path / 'adapter'}: {error.strerror}; the previous"):
        save_adapter(model, tmp_path / "adapter")
    after = load_file(str(tmp_path / "adapter/adapter.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folder left
    fresh = build_tiny_model("qwen3_moe")
    load_adapter(fresh, tmp_path / "adapter")  # still a loadable adapter


def test_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    import esft_lightning.files as files

    (tmp_path / "out").mkdir()
    (tmp_path / "out/a.txt").write_text("old")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a file system without renameat2
    real_replace = os.replace

    def crash_after_first(src, dst):  # noqa: ANN001, ANN202
        real_replace(src, dst)
        if str(dst).endswith(".out.old"):
            raise KeyboardInterrupt  # killed between moving the old folder aside and moving the new one in

    monkeypatch.setattr(os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("new"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.old/a.txt").read_text() == "old"
    files.recover_dir(tmp_path / "out")  # what the next write does first
    assert (tmp_path / "out/a.txt").read_text() == "old"
    atomic_write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("new"))
    assert (tmp_path / "out/a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- SIGKILL, in subprocesses ----------------------------------------------------------------------------
EPOCH = ["--data.num_train_sequences", "10"]  # 5 batches an epoch: the runs cross epoch ends


def crash_fit(cfg: Path, point: str, *extra: str) -> None:
    env = {**os.environ, "ESFT_CRASH": point, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tests.crash_fit", "fit", "--config", str(cfg), *EPOCH, *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, (done.stdout + done.stderr)[-3000:]


def adapter_of(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(log_dirs(root)[-1] / "adapter/adapter.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise: a resumed run is the uninterrupted run, not close to it (tests/test_determinism.py)."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", str(quick_config(root, steps=9)), *EPOCH])
    return adapter_of(root)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["fit:5", "checkpoint:4"])
def test_sigkill_mid_fit_or_mid_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, point):
    cfg = quick_config(tmp_path, steps=9)  # checkpoints (step file + last.ckpt) every 3 steps
    crash_fit(cfg, point)  # fit:5 dies after step 5; checkpoint:4 dies halfway through writing step 6's last.ckpt
    folder = log_dirs(tmp_path)[-1] / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)  # the last good checkpoint loads
    assert last["global_step"] == 3
    main(["fit", "--config", str(cfg), "--ckpt_path", "last", *EPOCH])
    assert len(log_dirs(tmp_path)) == 1
    assert_same(adapter_of(tmp_path), uninterrupted)


@pytest.mark.slow
def test_sigkill_mid_adapter_write_keeps_the_previous_adapter(tmp_path, uninterrupted):
    cfg = quick_config(tmp_path, steps=6)
    main(["fit", "--config", str(cfg), *EPOCH])
    previous = adapter_of(tmp_path)
    crash_fit(cfg, "adapter", "--trainer.max_steps", "9", "--ckpt_path", "last")  # dies writing step 9's adapter
    run = log_dirs(tmp_path)[-1]
    assert_same(adapter_of(tmp_path), previous)  # the previous adapter is untouched and loads
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "9", "--ckpt_path", "last", *EPOCH])
    assert_same(adapter_of(tmp_path), uninterrupted)
    assert not [p for p in run.iterdir() if p.name.startswith(".adapter")]  # the next write cleaned up


# -- reproducibility ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_same_config_and_seed_give_the_same_selection_and_bitwise_weights_with_workers(tmp_path):
    for name in ("a", "b"):
        main(["fit", "--config", str(quick_config(tmp_path / name, steps=4)), "--data.num_workers", "2", *EPOCH])
    a, b = log_dirs(tmp_path / "a")[-1], log_dirs(tmp_path / "b")[-1]
    assert (a / "expert_cfg.json").read_text() == (b / "expert_cfg.json").read_text()
    wa, wb = adapter_of(tmp_path / "a"), adapter_of(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise


@pytest.mark.slow
def test_mid_epoch_resume_with_workers_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    cfg = quick_config(tmp_path, steps=4)
    workers = ["--data.num_workers", "2"]
    main(["fit", "--config", str(cfg), *workers, *EPOCH])
    ckpt = log_dirs(tmp_path)[-1] / "checkpoints/last.ckpt"
    (ckpt.parent / "epoch=0-step=3.ckpt").replace(ckpt)  # as if killed during step 4: mid-epoch (5 batches each)
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "9", "--ckpt_path", "last", *workers, *EPOCH])
    assert_same(adapter_of(tmp_path), uninterrupted)  # the workers' prefetched batches were not skipped


# -- security ----------------------------------------------------------------------------------------------
def test_remote_code_is_off_unless_the_config_sets_it():
    assert inspect.signature(ESFTModule).parameters["trust_remote_code"].default is False
    for config in sorted((REPO / "configs").glob("*.yaml")):
        assert yaml.safe_load(config.read_text()).get("model", {}).get("trust_remote_code", False) is False, config


def test_our_code_reads_checkpoints_with_weights_only():
    sources = [*(REPO / "esft_lightning").rglob("*.py"), *(REPO / "callbacks").rglob("*.py")]
    calls = [(f, line) for f in sources for line in f.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


def test_adapters_are_read_as_data_never_unpickled(tmp_path, monkeypatch):
    from esft_lightning.models import build_tiny_model

    (tmp_path / "a").mkdir()
    (tmp_path / "a/expert_cfg.json").write_text('{"experts": {"0": [1]}}')
    torch.save({"x": torch.ones(1)}, tmp_path / "a/adapter_model.bin")  # a pickle: must be ignored
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("an adapter was unpickled"))
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        load_adapter(build_tiny_model("qwen3_moe"), tmp_path / "a")


class Draws(L.Callback):
    """Draws from every global RNG at each batch start, as dropout or a sampling callback would."""

    def __init__(self) -> None:
        self.draws: dict[int, tuple[float, float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self.draws[trainer.global_step] = (torch.rand(1).item(), float(np.random.rand()), random.random())


def test_resume_restores_the_rng_states_and_says_what_it_restored(tmp_path, caplog):
    (tmp_path / "whole").mkdir()
    (tmp_path / "part").mkdir()
    whole = Draws()
    L.seed_everything(0)
    small_fit(ESFTModule(family="deepseek_v3"), tmp_path / "whole", 6, ResumeCheck(), whole)
    L.seed_everything(0)
    small_fit(ESFTModule(family="deepseek_v3"), tmp_path / "part", 4, ResumeCheck(), Draws())
    last = log_dirs_of(tmp_path / "part")[-1] / "checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # RNG states load as plain data
    torch.manual_seed(123), np.random.seed(5), random.seed(7)  # whatever the new process would have
    resumed = Draws()
    with caplog.at_level(logging.INFO):
        small_fit(ESFTModule(family="deepseek_v3"), tmp_path / "part", 6, ResumeCheck(), resumed, ckpt_path=str(last))
    assert resumed.draws == {4: whole.draws[4], 5: whole.draws[5]}
    assert "restored RNG states (numpy, python, torch), data position, optimizer state; resumed exactly" in caplog.text


def test_resume_check_names_what_was_not_restored(tmp_path):
    small_fit(ESFTModule(family="deepseek_v3"), tmp_path, 2)  # written without ResumeCheck: no RNG states
    last = log_dirs_of(tmp_path)[-1] / "checkpoints/last.ckpt"
    with pytest.warns(UserWarning, match="ESFT resume check: not restored: RNG states: the checkpoint holds none"):
        small_fit(ESFTModule(family="deepseek_v3"), tmp_path, 3, ResumeCheck(), ckpt_path=str(last))
