"""The callbacks in a researcher's own LightningModule: found by structure, any attribute, plain DataLoaders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from esft_lightning import ESFTDataModule, Source
from esft_lightning.callbacks import ExpertSelectionCallback, RoutingDriftCallback, TaskEvalCallback
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.experts.split import is_trained_copy
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.resources import pretrained_path, synthetic_data_path
from esft_lightning.selection.rules import ExpertConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_module.py"


class Plain(L.LightningModule):
    """A module as a researcher writes it: the MoE model under its own name, its own step and optimizer."""

    def __init__(self, build_in: str = "init", teacher: bool = False) -> None:
        super().__init__()
        self.build_in = build_in
        self.net = build_tiny_model("qwen3_moe", vocab_size=259, seed=0) if build_in == "init" else None
        if teacher:
            self.teacher = build_tiny_model("qwen3_moe", vocab_size=259, seed=1)
        self.tokenizer = byte_tokenizer()

    def configure_model(self) -> None:
        if self.net is None:
            self.net = build_tiny_model("qwen3_moe", vocab_size=259, seed=0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.net(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
        ).loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def dict_batches(n: int = 16, length: int = 24) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 256, (length,), generator=generator)} for _ in range(n)]
    for row in rows:
        row["attention_mask"] = torch.ones(length, dtype=torch.long)
    return DataLoader(rows, batch_size=4)


def trainer(tmp_path: Path, callbacks: list, steps: int = 3) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not is_trained_copy(n)}


def check_only_selected_experts_trained(module: Plain, fitted: L.Trainer, before: dict, callback) -> None:
    model = module.net
    config = callback.config
    assert config is not None and config.num_selected > 0 and model.esft_expert_config is config
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = {layer.index for layer in find_moe_layers(model)}
    assert trainable == {
        f"model.layers.{i}.mlp.experts.esft_{p}"
        for i in layers
        if config.experts.get(i)
        for p in ("gate_up_proj", "down_proj")
    }
    optimizer = fitted.optimizers[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state_bytes == 2 * sum(p.numel() * p.element_size() for p in params)  # AdamW: two moments per trainable
    for name, value in frozen_state(model).items():  # frozen experts (and everything else) bitwise unchanged
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(p, before_copy) for p, before_copy in zip(params, callback._copies_before)), (
        "nothing trained"
    )


class RecordCopies(L.Callback):
    """Remembers the trainable copies' values at fit start (after the selection) to check they moved."""

    def __init__(self, selection: ExpertSelectionCallback) -> None:
        self.selection = selection

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.selection._copies_before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("build_in", ["init", "configure_model"])
def test_own_module_trains_only_the_selected_experts(build_in, tmp_path):
    module = Plain(build_in)
    before = frozen_state(module.net if module.net is not None else build_tiny_model("qwen3_moe", vocab_size=259))
    callback = ExpertSelectionCallback(max_tokens=512)
    fitted = trainer(tmp_path, [callback, RecordCopies(callback)])
    fitted.fit(module, train_dataloaders=dict_batches())
    check_only_selected_experts_trained(module, fitted, before, callback)
    run = Path(fitted.log_dir)
    assert ExpertConfig.load(run / "expert_cfg.json").experts == callback.config.experts
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert callback.profile.num_tokens == 16 * 24  # profiled the train dataloader's batches (all 16 rows)


def test_two_moe_models_need_model_attr(tmp_path):
    with pytest.raises(ValueError, match=r"2 MoE models \('net', 'teacher'\).*model_attr"):
        trainer(tmp_path, [ExpertSelectionCallback(max_tokens=128)]).fit(Plain(teacher=True), dict_batches())
    module = Plain(teacher=True)
    teacher_before = frozen_state(module.teacher)
    callback = ExpertSelectionCallback(max_tokens=128, model_attr="net")
    trainer(tmp_path, [callback], steps=1).fit(module, train_dataloaders=dict_batches())
    assert module.net.esft_expert_config is callback.config
    assert getattr(module.teacher, "esft_expert_config", None) is None  # the other model is left alone
    assert all(torch.equal(p, teacher_before[n]) for n, p in module.teacher.named_parameters())
    with pytest.raises(ValueError, match="model_attr='student'.*no submodule"):
        trainer(tmp_path, [ExpertSelectionCallback(model_attr="student")]).fit(Plain(), dict_batches())


def test_batches_without_input_ids_are_refused_before_training(tmp_path):
    tuples = DataLoader(torch.randint(0, 256, (8, 16)), batch_size=4)  # tensors, not dicts
    module = Plain()
    before = frozen_state(module.net)
    with pytest.raises(ValueError, match=r"batch 0 is Tensor: profiling needs dicts with 'input_ids'"):
        trainer(tmp_path, [ExpertSelectionCallback(max_tokens=64)]).fit(module, train_dataloaders=tuples)
    assert all(torch.equal(p, before[n]) for n, p in module.net.named_parameters())


def test_profile_data_is_read_like_the_datamodule(tmp_path):
    path = synthetic_data_path("cipher_train")
    callback = ExpertSelectionCallback(max_tokens=None, profile_data=[str(path)], profile_seq_length=64)
    trainer(tmp_path, [callback], steps=1).fit(Plain(), train_dataloaders=dict_batches(n=4))
    data = ESFTDataModule(task=[Source(str(path))], general_ratio=0, seq_length=64, val_fraction=0)
    data.tokenizer = byte_tokenizer()
    tokens = sum(int(batch["attention_mask"].sum()) for batch in data.task_dataloader())
    assert callback.profile.num_tokens == tokens > 20_000  # the whole file as the datamodule reads it, not the loader


def test_eval_and_drift_callbacks_on_own_module(tmp_path):
    cipher = str(synthetic_data_path("cipher_eval"))
    evaluate = TaskEvalCallback([{"path": cipher, "name": "cipher"}], max_new_tokens=8, max_samples=4)
    drift = RoutingDriftCallback(max_tokens=256)
    fitted = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=1,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[ExpertSelectionCallback(max_tokens=256), evaluate, drift],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="task drift only"):
        fitted.fit(Plain(), train_dataloaders=dict_batches(), val_dataloaders=dict_batches(n=4))
    assert [entry["step"] for entry in evaluate.history] == [0, 1, 2]  # tokenizer found on the module
    assert set(evaluate.history[-1]["sets"]["cipher"]["scores"]) >= {"exact_match", "chrf", "bleu"}
    assert drift.history and all(key.startswith("drift/task/") for key in drift.history[-1] if key != "step")


# -- the example script, one process and several (DDP, FSDP2 with prepare_for_sharding) --------------------
def run_example(tmp_path: Path, *args: str) -> tuple[Path, list[dict]]:
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLE), "--out", str(out), "--steps", "4", *args]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    reports = [json.loads(m) for m in re.findall(r"^OWN_MODULE_REPORT (.*)$", log, flags=re.MULTILINE)]
    return Path(reports[0]["log_dir"]), reports


def check_example_run(run: Path, reports: list[dict], ranks: int) -> None:
    from transformers import AutoModelForCausalLM

    assert sorted(r["rank"] for r in reports) == list(range(ranks))
    config = ExpertConfig.load(run / "expert_cfg.json")
    copies = {
        f"lm.model.layers.{i}.mlp.experts.esft_{p}"
        for i in config.experts
        if config.experts[i]
        for p in ("gate_up_proj", "down_proj")
    }
    for report in reports:  # the user's configure_optimizers got exactly the selected experts' copies
        assert set(report["optimizer_params"]) == copies
        assert report["optimizer_state_bytes"] == 2 * report["optimizer_param_bytes"] > 0
    base = AutoModelForCausalLM.from_pretrained(pretrained_path()).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").state_dict()
    trained_rows = 0
    for name, value in base.items():
        layer = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        selected = config.experts.get(int(layer.group(1)), []) if layer else []
        frozen = [e for e in range(value.shape[0]) if e not in selected] if layer else None
        if frozen is None:
            assert torch.equal(merged[name], value), name  # everything outside the routed experts: untouched
            continue
        assert torch.equal(merged[name][frozen], value[frozen]), name  # frozen experts bitwise unchanged
        trained_rows += sum(not torch.equal(merged[name][e], value[e]) for e in selected)
    assert trained_rows > 0


@pytest.mark.slow
def test_example_script_one_process(tmp_path):
    run, reports = run_example(tmp_path)
    check_example_run(run, reports, 1)


@pytest.mark.slow
def test_example_script_model_built_in_configure_model_under_ddp(tmp_path):
    run, reports = run_example(tmp_path, "--devices", "2", "--strategy", "ddp", "--build_in", "configure_model")
    check_example_run(run, reports, 2)


@pytest.mark.slow
def test_example_script_fsdp2_with_prepare_for_sharding(tmp_path):
    run, reports = run_example(tmp_path, "--devices", "2", "--strategy", "fsdp")
    check_example_run(run, reports, 2)
    # each rank's optimizer holds its shard of the copies: about half of them each
    assert (
        abs(reports[0]["optimizer_param_bytes"] - reports[1]["optimizer_param_bytes"])
        <= reports[0]["optimizer_param_bytes"] // 4
    )


def test_own_module_checkpoints_carry_the_selection_and_a_resume_checks_it(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps: int, selection: ExpertSelectionCallback, ckpt_path: str | None = None) -> L.Trainer:
        fitted = L.Trainer(
            accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[selection, ModelCheckpoint(save_last=True)],
        )  # fmt: skip
        fitted.fit(Plain(), train_dataloaders=dict_batches(), ckpt_path=ckpt_path)
        return fitted

    first = ExpertSelectionCallback(max_tokens=512)
    last = run(2, first).checkpoint_callback.last_model_path
    saved = torch.load(last, weights_only=True)["esft"]  # written by the callback: Plain has no such hook
    assert ExpertConfig.from_dict(saved["expert_config"]).experts == first.config.experts
    assert saved["model_type"] == "qwen3_moe" and saved["trainable_dtype"] == "torch.float32"
    assert run(4, ExpertSelectionCallback(max_tokens=512), last).global_step == 4  # same selection: resumes
    other = tmp_path / "other.json"
    ExpertConfig({0: [0, 1], 1: [2]}).save(other)
    with pytest.raises(ValueError, match="differs from the selection of the checkpoint"):
        run(4, ExpertSelectionCallback(expert_config=str(other)), last)


def test_model_attr_with_the_model_built_in_configure_model(tmp_path):
    module = Plain("configure_model", teacher=True)
    callback = ExpertSelectionCallback(max_tokens=128, model_attr="net")
    trainer(tmp_path, [callback], steps=1).fit(module, train_dataloaders=dict_batches())
    assert module.net.esft_expert_config is callback.config
    assert getattr(module.teacher, "esft_expert_config", None) is None


def test_profile_data_can_use_the_tokenizers_chat_template(tmp_path):
    path = str(synthetic_data_path("cipher_train"))
    callback = ExpertSelectionCallback(max_tokens=256, profile_data=[path], profile_template="model")
    with pytest.raises(ValueError, match="template is 'model' but tokenizer .* has no chat template"):
        trainer(tmp_path, [callback], steps=1).fit(Plain(), train_dataloaders=dict_batches(n=4))  # byte tokenizer
