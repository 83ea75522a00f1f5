"""The path GPU users take, checked on CPU: 16-bit models, batches over ranks, FSDP settings, profiling placement."""

import json

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy

from esft_lightning import ESFTDataModule, ESFTModule, Source
from esft_lightning.callbacks import ExpertSelectionCallback
from esft_lightning.cli import main
from esft_lightning.data.packing import gradient_accumulation
from esft_lightning.distributed.fsdp import shard_model
from esft_lightning.distributed.strategy import FSDP2Strategy, allow_unused_experts_under_ddp
from esft_lightning.models import build_tiny_model
from esft_lightning.routing.placement import placed_for_profiling
from esft_lightning.routing.profile import profile_routing
from esft_lightning.selection.rules import ExpertConfig

from .conftest import chat, write_jsonl
from .test_cli import fit_one_step, quick_config, quiet_trainer


def trainable_copies(module: ESFTModule) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in module.model.named_parameters() if "esft_" in n}


def test_trainable_dtype_auto_trains_fp32_copies_of_a_bf16_model_and_every_load_path_keeps_them(tmp_path):
    module = ESFTModule(family="qwen3_moe", dtype="bfloat16")
    trainer = fit_one_step(module, ExpertSelectionCallback(), tmp_path)  # default: trainable_dtype auto
    copies = trainable_copies(module)
    assert copies and set(copies.values()) == {torch.float32}
    assert module.model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16  # frozen stay bf16
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["esft"]["trainable_dtype"] == "torch.float32"

    reloaded = ESFTModule.load_from_checkpoint(ckpt)  # no callback: the checkpoint's selection and dtype
    assert trainable_copies(reloaded) == copies
    for name, p in module.model.named_parameters():
        if "esft_" in name:
            torch.testing.assert_close(dict(reloaded.model.named_parameters())[name], p, rtol=0, atol=0)

    resumed = ESFTModule(family="qwen3_moe", dtype="bfloat16")  # Trainer.fit(ckpt_path=...) without a callback
    data = write_jsonl(tmp_path / "task2.jsonl", [chat(f"q {i}", f"a {i}") for i in range(16)])
    dm = ESFTDataModule(task=[Source(str(data))], seq_length=32, batch_size=2, general_ratio=0)
    quiet_trainer(tmp_path, max_steps=2).fit(resumed, dm, ckpt_path=ckpt)
    assert set(trainable_copies(resumed).values()) == {torch.float32}


def test_trainable_dtype_auto_keeps_fp32_models_as_they_are_and_an_explicit_dtype_wins(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    fp32 = ESFTModule(family="qwen3_moe")
    fit_one_step(fp32, ExpertSelectionCallback(), tmp_path / "a")
    assert set(trainable_copies(fp32).values()) == {torch.float32}
    explicit = ESFTModule(family="qwen3_moe", dtype="bfloat16")
    fit_one_step(explicit, ExpertSelectionCallback(trainable_dtype="bfloat16"), tmp_path / "b")
    assert set(trainable_copies(explicit).values()) == {torch.bfloat16}
    with pytest.raises(ValueError, match="trainable_dtype must be auto or a torch dtype"):
        ExpertSelectionCallback(trainable_dtype="float33")


def test_global_batch_size_derives_accumulation_per_world_size():
    assert gradient_accumulation(32, 4, 1) == 8
    assert gradient_accumulation(32, 4, 8) == 1
    assert gradient_accumulation(32, 2, 4) == 4
    with pytest.raises(ValueError, match=r"global_batch_size=32 is not a multiple of data.batch_size=4 x 3"):
        gradient_accumulation(32, 4, 3)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 contradicts"):
        gradient_accumulation(32, 4, 1, configured=2)


def test_global_batch_size_sets_the_trainers_accumulation(tmp_path):
    data = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(32)])
    dm = ESFTDataModule(
        task=[Source(str(data))],
        seq_length=32,
        batch_size=2,
        general_ratio=0,
        global_batch_size=8,
        val_every_n_steps=1,
    )
    trainer = quiet_trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=1,
        check_val_every_n_epoch=None,
        callbacks=[ExpertSelectionCallback(max_tokens=512)],
    )
    trainer.fit(ESFTModule(family="qwen3_moe"), dm)
    assert trainer.accumulate_grad_batches == 4
    assert trainer.fit_loop.epoch_loop.batch_progress.total.ready == 8  # two optimizer steps of 4 micro-batches
    assert trainer.val_check_interval == 4 and trainer.val_check_batch == 4  # validation after each step
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.ready == 2


def test_ddp_gets_find_unused_parameters_and_tensor_parallel_is_refused():
    ddp = DDPStrategy()
    allow_unused_experts_under_ddp(ddp)
    assert ddp._ddp_kwargs["find_unused_parameters"] is True
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is not supported"):
        FSDP2Strategy(tensor_parallel_size=2)
    assert FSDP2Strategy()._data_parallel_size == "auto"


def test_fsdp_bf16_reduces_gradients_in_fp32(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = build_tiny_model("qwen3_moe")
        shard_model(model, init_device_mesh("cpu", (1,)), bf16_compute=True)
        policy = model.model.layers[0]._get_fsdp_state()._mp_policy
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    finally:
        torch.distributed.destroy_process_group()


def test_profiling_with_streamed_weights_equals_profiling_in_place():
    model = build_tiny_model("deepseek_v3")
    batches = [{"input_ids": torch.randint(0, 250, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}]
    plain = profile_routing(model, batches, progress=False)
    with placed_for_profiling(model, torch.device("cpu"), how="offload") as device:
        assert next(model.parameters()).device.type == "meta"  # weights live in the offload hooks' map
        streamed = profile_routing(model, batches, progress=False, device=device)
    assert next(model.parameters()).device.type == "cpu"  # weights are back afterwards
    for layer, scores in plain.token_scores.items():
        torch.testing.assert_close(streamed.token_scores[layer], scores)
        torch.testing.assert_close(streamed.gate_scores[layer], plain.gate_scores[layer])


def test_esft_test_logs_per_source_loss_on_validation_and_explicit_test_files(tmp_path):
    module = ESFTModule(family="qwen3_moe")
    trainer = fit_one_step(module, ExpertSelectionCallback(max_tokens=512), tmp_path)
    metrics = trainer.test(module, trainer.datamodule, verbose=False)[0]
    assert metrics["test/task/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["test/task/loss"])).item())
    extra = write_jsonl(tmp_path / "held_out.jsonl", [chat(f"other {i}", f"reply {i}") for i in range(8)])
    dm = ESFTDataModule(
        task=[Source(str(tmp_path / "task.jsonl"))],
        general_ratio=0,
        seq_length=32,
        batch_size=2,
        test=[Source(str(extra), name="held_out")],
    )
    metrics = trainer.test(module, dm, verbose=False)[0]
    assert set(metrics) == {"test/held_out/loss", "test/held_out/ppl"} and metrics["test/held_out/loss"] > 0


def test_select_command_uses_the_configs_callback_settings(tmp_path):
    cfg_path = quick_config(tmp_path, score_function="gate", top_p=0.3)
    main(["select", "--out", str(tmp_path / "cfg.json"), "--config", str(cfg_path)])
    config = ExpertConfig.load(tmp_path / "cfg.json")
    assert config.meta["score_function"] == "gate"
    cfg = yaml.safe_load(cfg_path.read_text())
    assert cfg["trainer"]["callbacks"][0]["init_args"]["top_p"] == 0.3
    main(["select", "--out", str(tmp_path / "token.json"), "--score_function", "token", "--config", str(cfg_path)])
    assert json.loads((tmp_path / "token.json").read_text())["score_function"] == "token"
