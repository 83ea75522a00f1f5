"""Frozen routed experts kept in block FP8: the same model as the dequantized one, half the bytes, every path."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from esft_lightning.experts.split import apply_expert_config, remove_expert_split
from esft_lightning.experts.state import expert_param_names
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.selection.rules import ExpertConfig
from esft_lightning.selection.spec import SelectionSpec
from esft_lightning.weights.fp8_blocks import FP8, SCALE_SUFFIX, dequantize_experts, quantize_experts

FAMILIES = ["deepseek_v3", "qwen3_moe", "gpt_oss", "mixtral"]  # shared experts, plain, transposed + biases, renamed


def _selection(model: torch.nn.Module) -> ExpertConfig:
    layers = find_moe_layers(model)
    return ExpertConfig({layers[0].index: [0, 3], layers[-1].index: [1]})


def dequantized_reference(model: torch.nn.Module, config: ExpertConfig) -> torch.nn.Module:
    """The model with every frozen expert replaced by its FP8 value (the selected ones keep theirs)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in find_moe_layers(reference):
            for name in expert_param_names(layer.experts)[:2]:
                weight = getattr(layer.experts, name)
                selected = config.experts.get(layer.index, [])
                keep = weight[selected].clone()
                weight.copy_(dequantize_experts(*quantize_experts(weight), weight.dtype))
                weight[selected] = keep
    return reference


def test_quantize_and_dequantize_experts_blocks_never_span_two_experts():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3, 200, 130, generator=generator)
    w[1] *= 1000  # one expert far larger: its scale must not leak into its neighbours
    q, scale = quantize_experts(w)
    assert q.dtype == FP8 and scale.shape == (3, 2, 2)
    back = dequantize_experts(q, scale, torch.float32)
    for e in range(3):
        assert (back[e] - w[e]).abs().max() <= w[e].abs().max() / 16  # e4m3: 3 mantissa bits
    torch.testing.assert_close(dequantize_experts(*quantize_experts(back), torch.float32), back, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_whole_block_experts_dequantize_into_reused_buffers_bitwise(dtype, monkeypatch):
    """Experts of whole 128 x 128 blocks (every DeepSeek shape) dequantize on the CPU into buffers reused across
    chunks and calls: forward and input gradient bitwise the dequantized weights' grouped matmul, twice over."""
    import esft_lightning.experts.fp8 as fp8

    monkeypatch.setattr(fp8, "_CHUNK_ELEMENTS", 2 * 256 * 128)  # two experts a chunk: three chunks, one partial
    monkeypatch.setattr(fp8, "_HOST_BUFFERS", {})
    generator = torch.Generator().manual_seed(0)
    w8, scale = quantize_experts(torch.randn(5, 256, 128, generator=generator))  # [E, out, in]
    weights = dequantize_experts(w8, scale, dtype)
    counts = [3, 0, 4, 2, 5]  # an expert without tokens is skipped
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    for _ in range(2):  # the second call reuses the first one's buffers
        x = torch.randn(sum(counts), 128, generator=generator, dtype=dtype, requires_grad=True)
        y = fp8.frozen_fp8_linear(x, w8, scale, offsets, transposed=False, grouped=False)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
        ends = offsets.tolist()  # each expert's rows times its dequantized weight: the eager loop's matmuls
        spans = [(e, (ends[e - 1] if e else 0), ends[e]) for e in range(5)]
        expected = torch.cat([x[r0:r1] @ weights[e].T for e, r0, r1 in spans])
        expected_grad = torch.cat([grad_y[r0:r1] @ weights[e] for e, r0, r1 in spans])
        assert torch.equal(y, expected) and torch.equal(x.grad, expected_grad)
    assert set(fp8._HOST_BUFFERS) == ({torch.float32} | {dtype})  # the path ran, and kept its buffers


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_fp8_experts_compute_the_dequantized_model_and_stay_frozen(family, impl):
    model = build_tiny_model(family, experts_implementation=impl).eval()
    config = _selection(model)
    reference = dequantized_reference(model, config)
    stored_bytes = sum(p.numel() * 2 for layer in find_moe_layers(model) for p in layer.experts.parameters())
    apply_expert_config(reference, config)
    apply_expert_config(model, config, frozen_dtype=FP8)

    layers = find_moe_layers(model)
    frozen = {n: p for n, p in model.named_parameters() if p.dtype == FP8}
    assert len(frozen) == 2 * len(layers)  # each layer's two fused weight tensors, every layer
    fp8_bytes = sum(
        p.numel() * p.element_size() for layer in layers for n, p in layer.experts.named_parameters()
        if not n.startswith("esft_")
    )  # fmt: skip
    assert fp8_bytes <= 0.55 * stored_bytes, (fp8_bytes, stored_bytes)  # against bf16 storage of the same experts

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    before = {n: p.clone() for n, p in frozen.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    trained = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, trained[name].grad, rtol=0, atol=0, msg=name)
        else:
            assert param.grad is None, name
    optimizer.step()
    assert all(torch.equal(p.view(torch.uint8), before[n].view(torch.uint8)) for n, p in frozen.items())

    state = model.state_dict()  # the model's own keys, shapes and dtype: frozen experts dequantized
    plain = build_tiny_model(family).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    assert not any(k.endswith(SCALE_SUFFIX) for k in state)


def test_removing_the_split_gives_back_the_model_dtype_with_trained_rows():
    model = build_tiny_model("qwen3_moe")
    config = _selection(model)
    apply_expert_config(model, config, frozen_dtype=FP8)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.fill_(0.5)
    want = model.state_dict()
    remove_expert_split(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(n.endswith(SCALE_SUFFIX) for n, _ in model.named_parameters())
    got = model.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    layer = find_moe_layers(model)[0]
    assert torch.all(layer.experts.gate_up_proj[config.experts[layer.index]] == 0.5)


def test_a_full_state_dict_loads_into_the_8bit_model():
    model = build_tiny_model("deepseek_v3")
    state = copy.deepcopy(model.state_dict())
    config = _selection(model)
    apply_expert_config(model, config, frozen_dtype=FP8)
    fresh = build_tiny_model("deepseek_v3", seed=5)
    apply_expert_config(fresh, config, frozen_dtype=FP8)
    fresh.load_state_dict(state)  # the model's own keys: quantized on the way in, trainable copies filled
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        same = a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b
        assert torch.equal(*same), name


def test_the_callback_keeps_frozen_experts_8bit_and_the_checkpoint_says_so(tmp_path):
    from esft_lightning import ESFTModule
    from esft_lightning.callbacks import ExpertSelectionCallback

    from .test_cli import fit_one_step

    module = ESFTModule(family="deepseek_v3", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    callback = ExpertSelectionCallback(max_tokens=256, save_adapter=True, plot=False, frozen_experts_dtype="float8")
    trainer = fit_one_step(module, callback, tmp_path)
    assert trainer.global_step == 1
    assert any(p.dtype == FP8 for p in module.model.parameters())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["esft"]
    assert saved["frozen_experts_dtype"] == "float8"


def test_spec_rejects_an_unknown_frozen_dtype():
    from esft_lightning.selection.spec import SelectionSpec

    with pytest.raises(ValueError, match="frozen_experts_dtype must be model or float8, got 'int4'"):
        SelectionSpec(frozen_experts_dtype="int4")
    with pytest.raises(ValueError, match="frozen_dtype must be None .* or torch.float8_e4m3fn"):
        apply_expert_config(build_tiny_model("qwen3_moe"), ExpertConfig({}), frozen_dtype=torch.int8)


def _rank_fills_8bit_shards(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from esft_lightning.distributed.fsdp import shard_model
    from esft_lightning.dtensors import full_on_host
    from esft_lightning.weights.loading import load_model
    from esft_lightning.weights.weight_files import WeightFiles

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        model = load_model(path, dtype="float32", on_meta=True)
        apply_expert_config(model, ExpertConfig.load(Path(path) / "selection.json"), frozen_dtype=FP8)
        shard_model(model, init_device_mesh("cpu", (world,)), False, files=WeightFiles(path, model))
        tensors = {n: full_on_host(p) for n, p in model.named_parameters()}  # float8 gathered as bytes
        tensors = {n: t.view(torch.uint8) if t.dtype == FP8 else t for n, t in tensors.items()}
        assert any(isinstance(p, DTensor) and p.dtype == FP8 for p in model.parameters())
        if rank == 0:
            torch.save(tensors, f"{out}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (a peer gone mid-teardown can abort)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_ranks_quantize_their_own_rows_from_the_files(tmp_path):
    import torch.multiprocessing as mp

    from esft_lightning.weights.loading import load_model

    path = tmp_path / "model"
    build_tiny_model("deepseek_v3", seed=0).save_pretrained(path, max_shard_size="200KB")
    config = ExpertConfig({1: [0, 5, 6]})
    config.save(path / "selection.json")
    one = load_model(str(path), dtype="float32")
    apply_expert_config(one, config, frozen_dtype=FP8)
    out = str(tmp_path / "result")
    mp.start_processes(_rank_fills_8bit_shards, args=(2, str(path), out), nprocs=2, start_method="spawn")
    sharded = torch.load(f"{out}.pt", weights_only=True)
    expected = {n: p.detach().view(torch.uint8) if p.dtype == FP8 else p.detach() for n, p in one.named_parameters()}
    assert sorted(sharded) == sorted(expected) and any(n.endswith(SCALE_SUFFIX) for n in sharded)
    for name, value in sharded.items():  # bitwise: each rank quantized exactly the rows one process does
        assert torch.equal(value, expected[name]), name
    assert json.loads((path / "selection.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["configs/fsdp.yaml", "configs/ep.yaml"], ids=["fsdp2", "ep"])
def test_two_rank_fit_with_8bit_frozen_experts_trains_and_merges_the_model(tmp_path, strategy):
    """`esft fit` on 2 ranks from a saved model with frozen_experts_dtype float8: the merged model holds every
    frozen expert as its FP8 value in the model's dtype and the selected experts trained."""
    import yaml

    from esft_lightning.weights.loading import load_model

    from .conftest import REPO
    from .test_cli import quick_config
    from .test_fsdp import two_process_fit

    path = tmp_path / "model"
    build_tiny_model("deepseek_v3", seed=0).save_pretrained(path, max_shard_size="200KB")
    cfg_path = quick_config(tmp_path / "fit", steps=2, save_merged=True)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"] = {"model": str(path), "optimizer": cfg["model"]["optimizer"]}
    cfg["trainer"]["callbacks"][0]["init_args"].update(max_tokens=512, frozen_experts_dtype="float8")
    cfg_path.write_text(yaml.safe_dump(cfg))
    extra = ["--trainer.strategy.init_args.expert_parallel_size", "2"] if "ep" in strategy else []
    two_process_fit(cfg_path, tmp_path / "fit", *extra, strategy_config=str(REPO / strategy))
    run = sorted((tmp_path / "fit" / "run" / "logs").glob("version_*"))[-1]
    selected = ExpertConfig.load(run / "expert_cfg.json")
    assert (
        torch.load(sorted(run.glob("checkpoints/*.ckpt"))[-1], weights_only=False)["esft"]["frozen_experts_dtype"]
        == "float8"
    )
    merged = load_model(str(run / "merged"), dtype="float32")
    original = load_model(str(path), dtype="float32")
    reference = dequantized_reference(original, selected).state_dict()
    moved = 0
    for key, value in merged.state_dict().items():
        if ".experts." in key and key.rpartition(".")[2] in ("gate_up_proj", "down_proj"):
            layer = int(key.split(".layers.")[1].split(".")[0])
            rows = (value != reference[key]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert set(rows) <= set(selected.experts.get(layer, [])), key  # frozen rows: their FP8 values
            moved += len(rows)
        else:
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
    assert moved > 0


def test_the_planner_counts_8bit_frozen_experts():
    from esft_lightning.planning.plan import PlanRequest, plan_memory

    def plan(frozen: str):
        with torch.device("meta"):
            model = build_tiny_model("deepseek_v3").to(torch.bfloat16)
        spec = SelectionSpec(frozen_experts_dtype=frozen)
        return plan_memory(model, PlanRequest(strategy="single", spec=spec, expert_config=_selection(model)))

    model_dtype, fp8 = plan("model").per_rank, plan("float8").per_rank
    experts = build_tiny_model("deepseek_v3").to(torch.bfloat16)
    frozen_bf16 = sum(
        getattr(layer.experts, n).numel() * 2
        for layer in find_moe_layers(experts)
        for n in expert_param_names(layer.experts)[:2]
    )
    saved = model_dtype.params_bytes - fp8.params_bytes
    assert 0.45 * frozen_bf16 < saved < 0.5 * frozen_bf16  # 2 bytes -> 1 byte a value, plus a float32 per block
    assert fp8.trainable_bytes == model_dtype.trainable_bytes and fp8.optimizer_bytes == model_dtype.optimizer_bytes
