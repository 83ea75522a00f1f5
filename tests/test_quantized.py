"""Quantized checkpoints (DeepSeek-V3 block FP8, GPT-OSS MXFP4) load as the dequantized model on every path."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_lightning.models import build_tiny_model
from esft_lightning.weights.loading import load_model
from esft_lightning.weights.quantized import dequantize_fp8_rows, quantize_fp8_blocks, quantize_mxfp4
from esft_lightning.weights.weight_files import UnusedWeightsError, WeightFiles

BLOCK = (24, 20)  # tiny shapes (64, 32, 128, ...) end in partial blocks in both dimensions


def direct_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference: every element times its block's scale, the scale grid expanded in one go."""
    rows, cols = weight.shape
    grid = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.to(torch.float32) * grid


def direct_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference: each e2m1 nibble decoded from its bits (sign, 2-bit exponent, 1-bit mantissa)."""
    nibbles = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).to(torch.int64)
    sign = torch.where(nibbles & 8 != 0, -1.0, 1.0)
    exponent, mantissa = (nibbles >> 1) & 3, (nibbles & 1).to(torch.float32)
    magnitude = torch.where(exponent == 0, mantissa * 0.5, (1 + mantissa * 0.5) * 2.0 ** (exponent - 1).float())
    value = sign * magnitude * 2.0 ** (scales.to(torch.float32) - 127).unsqueeze(-1)
    return value.flatten(-2)


def _rewrite(path: Path, change) -> dict[str, torch.Tensor]:
    """Apply ``change(key, tensor) -> {key: tensor}`` to every stored tensor, shards and index kept consistent;
    returns the dequantized values by stored key (the plain reference's tensors)."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    reference, weight_map = {}, {}
    for file in sorted(set(index["weight_map"].values())):
        out = {}
        for key, value in load_file(path / file).items():
            stored, plain = change(key, value)
            out.update(stored)
            reference.update(plain)
        save_file(out, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))
    return reference


def _set_quantization(path: Path, quantization: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))


def fp8_checkpoint(path: Path, block: tuple[int, int] = BLOCK) -> Path:
    """A tiny DeepSeek-V3 written as V3 ships: every decoder Linear weight (attention, dense MLP, shared and routed
    experts, one tensor per expert) in float8_e4m3fn with ``weight_scale_inv``; norms, router and embeddings plain.
    Beside it, ``<path>-plain``: the same weights dequantized, saved plain (what loading must give)."""
    build_tiny_model("deepseek_v3", seed=0).save_pretrained(path, max_shard_size="200KB")
    build_tiny_model("deepseek_v3", seed=0).save_pretrained(f"{path}-plain", max_shard_size="200KB")

    def change(key, value):
        linear = (
            ".layers." in key and key.endswith(".weight") and value.dim() == 2 and not key.endswith("mlp.gate.weight")
        )
        if not linear:
            return {key: value}, {key: value}
        weight, scale = quantize_fp8_blocks(value, block)
        return {key: weight, f"{key}_scale_inv": scale}, {key: direct_fp8(weight, scale, block)}

    reference = _rewrite(path, change)
    _rewrite(Path(f"{path}-plain"), lambda key, value: ({key: reference[key]}, {}))
    _set_quantization(path, {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)})
    return path


def mxfp4_checkpoint(path: Path) -> Path:
    """A tiny GPT-OSS with its routed experts in MXFP4 (``*_blocks`` / ``*_scales``, stored [E, out, in] as GPT-OSS
    does), everything else plain; ``<path>-plain`` holds the dequantized model."""
    build_tiny_model("gpt_oss", seed=0).save_pretrained(path, max_shard_size="200KB")
    build_tiny_model("gpt_oss", seed=0).save_pretrained(f"{path}-plain", max_shard_size="200KB")

    def change(key, value):
        if not (key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj")):
            return {key: value}, {key: value}
        blocks, scales = quantize_mxfp4(value.transpose(1, 2))  # the model keeps [E, in, out]; files [E, out, in]
        dequantized = direct_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        return {f"{key}_blocks": blocks, f"{key}_scales": scales}, {key: dequantized}

    reference = _rewrite(path, change)
    _rewrite(Path(f"{path}-plain"), lambda key, value: ({key: reference[key]}, {}))
    _set_quantization(path, {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "self_attn", "lm_head"]})
    return path


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("make", [fp8_checkpoint, mxfp4_checkpoint], ids=["deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_one_process_load_gives_the_dequantized_model(tmp_path, make):
    path = make(tmp_path / "model")
    assert len(list(path.glob("*.safetensors"))) > 1
    model = load_model(str(path), dtype="float32")
    assert_same_weights(model, load_model(f"{path}-plain", dtype="float32"))
    assert getattr(model.config, "quantization_config", None) is None  # a saved (merged) model holds plain weights
    assert all(p.dtype == torch.float32 for p in model.parameters())
    files = WeightFiles(path, load_model(str(path), dtype="float32", on_meta=True))
    for name, tensor in model.state_dict().items():  # any rows, as FSDP2 ranks and EP owners read them
        if tensor.dim() and tensor.shape[0] >= 4:
            torch.testing.assert_close(files.read(name, range(1, 3)), tensor[1:3], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(files.read(name, [3, 0]), tensor[[3, 0]], rtol=0, atol=0, msg=name)


def test_fp8_real_size_partial_blocks_equal_a_direct_reference():
    # DeepSeek-V3's kv_a_proj_with_mqa: [576, 7168] in 128 x 128 blocks, scales [5, 56] (the last row block is 64).
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(576, 7168, generator=generator) * 0.02).to(torch.float8_e4m3fn)
    scale = torch.rand(5, 56, generator=generator) + 0.5
    want = direct_fp8(weight, scale, (128, 128))
    got = dequantize_fp8_rows(weight, lambda rows: scale[rows], range(576), (128, 128))
    assert torch.equal(got, want)
    rows = [575, 0, 130, 511, 512]  # a rank's or an expert's rows, in any order, across the partial block
    assert torch.equal(dequantize_fp8_rows(weight[rows], lambda r: scale[r], rows, (128, 128)), want[rows])
    assert math.ceil(576 / 128) == 5 and math.ceil(7168 / 128) == 56


def test_ue8m0_scales_stored_as_exponents_read_as_powers_of_two():
    weight = torch.randn(4, 6).to(torch.float8_e4m3fn)
    exponents = torch.tensor([[120, 130]], dtype=torch.uint8)  # 2^-7, 2^3
    got = dequantize_fp8_rows(weight, lambda rows: exponents[rows], range(4), (4, 3))
    torch.testing.assert_close(got, direct_fp8(weight, torch.tensor([[2.0**-7, 2.0**3]]), (4, 3)), rtol=0, atol=0)


def test_extra_layers_are_skipped_with_one_log_line_and_any_other_stray_tensor_is_refused(tmp_path, caplog):
    path = fp8_checkpoint(tmp_path / "model")
    # A multi-token-prediction layer past the model's 3 decoder layers, as DeepSeek-V3's model.layers.61.
    _rewrite(
        path,
        lambda key, value: (
            {key: value, **({key.replace("layers.2.", "layers.3."): value.clone()} if "layers.2." in key else {})},
            {},
        ),
    )
    package_logger = logging.getLogger("esft_lightning")  # has its own handler and does not propagate
    package_logger.addHandler(caplog.handler)
    try:
        model = load_model(str(path), dtype="float32")
    finally:
        package_logger.removeHandler(caplog.handler)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "decoder layers [3]" in skipped[0], skipped
    assert_same_weights(model, load_model(f"{path}-plain", dtype="float32"))

    _rewrite(
        path,
        lambda key, value: (
            {key: value, **({"model.layers.1.mlp.surprise": value.clone()} if key == "lm_head.weight" else {})},
            {},
        ),
    )
    with pytest.raises(
        UnusedWeightsError, match=r"1 stored tensors are read by no parameter .*model\.layers\.1\.mlp\.surprise"
    ):
        load_model(str(path), dtype="float32")
    with pytest.raises(UnusedWeightsError, match="model.layers.1.mlp.surprise"):
        load_model(str(path), dtype="float32", on_meta=True)  # the FSDP2 ranks' and streamed profiling's reader


def test_a_scale_that_does_not_match_its_weight_names_both(tmp_path):
    path = fp8_checkpoint(tmp_path / "model")
    target = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    _rewrite(path, lambda key, value: ({key: value[:-1] if key == f"{target}_scale_inv" else value}, {}))
    with pytest.raises(ValueError, match=rf"{target}_scale_inv has shape \[\d+, \d+\], but {target} .* needs"):
        load_model(str(path), dtype="float32")


def test_fp8_weights_without_a_quantization_config_are_refused(tmp_path):
    path = fp8_checkpoint(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is stored in FP8 without a `.*_scale_inv` scale"):
        load_model(str(path), dtype="float32", on_meta=True)


def test_an_unknown_quantization_method_names_the_config(tmp_path):
    path = tmp_path / "model"
    build_tiny_model("qwen3_moe").save_pretrained(path)
    _set_quantization(path, {"quant_method": "awq"})
    with pytest.raises(ValueError, match=r"config\.json: quantization_config\.quant_method 'awq' is not read"):
        load_model(str(path), dtype="float32")


# -- several ranks: FSDP2 shards and expert-parallel owners read and dequantize only their rows ---------------------

SELECTIONS = {"deepseek_v3-fp8": {1: [0, 5, 6], 2: [3]}, "gpt_oss-mxfp4": {0: [0, 5], 1: [3, 6]}}


@pytest.mark.slow
@pytest.mark.parametrize("make", [fp8_checkpoint, mxfp4_checkpoint], ids=["deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_fsdp2_ranks_and_expert_parallel_owners_read_the_dequantized_rows(tmp_path, make, request):
    import torch.multiprocessing as mp

    from esft_lightning.experts.split import apply_expert_config
    from esft_lightning.selection.rules import ExpertConfig

    from .test_sharded_loading import _rank_fills_its_shards

    path = make(tmp_path / "model")
    selection = ExpertConfig(SELECTIONS[request.node.callspec.id])
    selection.save(path / "selection.json")
    reference = load_model(f"{path}-plain", dtype="float32")
    apply_expert_config(reference, selection, torch.float32)
    expected = {n: p.detach() for n, p in reference.named_parameters()}

    out = str(tmp_path / "fsdp")
    mp.start_processes(_rank_fills_its_shards, args=(2, str(path), out), nprocs=2, start_method="spawn")
    result = torch.load(f"{out}.pt", weights_only=True)["params"]
    assert sorted(result) == sorted(expected)
    for name, value in result.items():  # trainable copies included: read from their experts' dequantized rows
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    out = str(tmp_path / "ep")
    mp.start_processes(_rank_fills_its_shards, args=(2, str(path), out, True), nprocs=2, start_method="spawn")
    owned = set()
    for rank in range(2):
        saved = torch.load(f"{out}.{rank}.pt", weights_only=True)
        for name, value in saved["params"].items():
            if name.rpartition(".")[2].startswith("esft_"):
                continue  # the owners' trainable copies: the FSDP2 check above covers their rows
            if name in saved["firsts"]:  # this owner's experts only: rows first .. first + count
                first, count = saved["firsts"][name]
                torch.testing.assert_close(value, expected[name][first : first + count], rtol=0, atol=0, msg=name)
                owned.add((name, first))
            else:
                torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert len({first for _, first in owned}) == 2  # both owners held (different) experts


@pytest.mark.slow
@pytest.mark.parametrize(
    "make,strategy",
    [(fp8_checkpoint, "configs/ep.yaml"), (mxfp4_checkpoint, "configs/fsdp.yaml")],
    ids=["deepseek_v3-fp8-ep", "gpt_oss-mxfp4-fsdp2"],
)
def test_two_rank_fit_from_quantized_files_trains_the_dequantized_model(tmp_path, make, strategy):
    """`esft fit` on 2 ranks from the quantized directory (streamed profiling on rank 0, each rank reading its
    rows): the merged model is the dequantized model with only the selected experts changed, and `esft merge` of
    the quantized base with the run's adapter writes the same plain model."""
    import yaml

    from esft_lightning.adapters import merge_adapter
    from esft_lightning.models import find_moe_layers
    from esft_lightning.selection.rules import ExpertConfig

    from .conftest import REPO
    from .test_cli import quick_config
    from .test_fsdp import two_process_fit

    path = make(tmp_path / "model")
    cfg_path = quick_config(tmp_path / "fit", steps=2, save_merged=True)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"] = {"model": str(path), "optimizer": cfg["model"]["optimizer"]}
    cfg["trainer"]["callbacks"][0]["init_args"].update(max_tokens=512)
    cfg_path.write_text(yaml.safe_dump(cfg))
    extra = ["--trainer.strategy.init_args.expert_parallel_size", "2"] if "ep" in strategy else []
    two_process_fit(cfg_path, tmp_path / "fit", *extra, strategy_config=str(REPO / strategy))
    run = sorted((tmp_path / "fit" / "run" / "logs").glob("version_*"))[-1]
    selected = ExpertConfig.load(run / "expert_cfg.json").experts
    assert (run / "adapter" / "adapter.safetensors").exists() and selected

    merged = load_model(str(run / "merged"), dtype="float32")
    reference = load_model(f"{path}-plain", dtype="float32")
    fused = {
        f"{name}.{leaf}": layer.index
        for layer in find_moe_layers(reference)
        for name, module in reference.named_modules()
        if module is layer.experts
        for leaf, _ in module.named_parameters(recurse=False)
    }
    got = merged.state_dict()
    changed = 0
    for key, want in reference.state_dict().items():
        if key in fused:  # only the selected experts' rows moved; every frozen expert is the dequantized one
            moved = (got[key] != want).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert set(moved) <= set(selected.get(fused[key], [])), key
            changed += len(moved)
        else:
            torch.testing.assert_close(got[key], want, rtol=0, atol=0, msg=key)
    assert changed > 0  # training did move the selected experts (raw fp8 values would have failed above)

    out = merge_adapter(str(path), str(run / "adapter"), str(tmp_path / "merged-from-quantized"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    again = load_model(str(out), dtype="float32").state_dict()  # written in bf16 (the default --format)
    for key, value in got.items():
        torch.testing.assert_close(again[key], value, rtol=2**-8, atol=1e-6, msg=key)  # bf16 rounding only


@pytest.mark.parametrize("make", [fp8_checkpoint, mxfp4_checkpoint], ids=["deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_merge_writes_bf16_or_the_base_format_with_only_the_trained_experts_requantized(tmp_path, make, request):
    from esft_lightning.adapters import merge_adapter, save_adapter
    from esft_lightning.experts.split import apply_expert_config
    from esft_lightning.selection.rules import ExpertConfig

    path = make(tmp_path / "model")
    model = load_model(str(path), dtype="float32")
    apply_expert_config(model, ExpertConfig(SELECTIONS[request.node.callspec.id]), torch.float32)
    with torch.no_grad():  # "training": the selected experts move
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * param.abs().mean())
    save_adapter(model, tmp_path / "adapter")
    trained = model.state_dict()  # the merged values, under the model's own names

    bf16 = merge_adapter(str(path), str(tmp_path / "adapter"), str(tmp_path / "bf16"), format="bf16")
    config = json.loads((bf16 / "config.json").read_text())
    assert "quantization_config" not in config
    stored = {k: v for f in bf16.glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(v.dtype == torch.bfloat16 for k, v in stored.items() if "proj" in k), {
        k: v.dtype for k, v in stored.items() if v.dtype != torch.bfloat16
    }
    loaded = load_model(str(bf16), dtype="bfloat16")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[key].to(value.dtype), rtol=0, atol=0, msg=key)  # (fp32 router)

    original = merge_adapter(str(path), str(tmp_path / "adapter"), str(tmp_path / "original"), format="original")
    config = json.loads((original / "config.json").read_text())
    assert config["quantization_config"] == json.loads((path / "config.json").read_text())["quantization_config"]
    base = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    written = {k: v for f in original.glob("*.safetensors") for k, v in load_file(f).items()}
    assert written.keys() == base.keys()  # the same stored tensors, scales included
    changed = sorted(k for k in base if not torch.equal(base[k].view(torch.uint8), written[k].view(torch.uint8)))
    assert changed and all(".experts." in k for k in changed), changed  # only routed experts were re-quantized
    again = load_model(str(original), dtype="float32")  # loads like the base; the trained experts within rounding
    for key, value in again.state_dict().items():
        scale = trained[key].abs().max().item() or 1.0
        # Rounding of one value, relative to its tensor's largest: e4m3 keeps 3 mantissa bits (1/16); e2m1's top
        # step is 2 of a group scaled to a largest value of 3 to 6 (up to 1/3 of the group's largest).
        tolerance = 1 / 16 if "fp8" in request.node.callspec.id else 1 / 3
        torch.testing.assert_close(value, trained[key], rtol=0, atol=tolerance * scale, msg=key)
    reference = load_model(f"{path}-plain", dtype="float32").state_dict()
    untouched = [k for k, v in trained.items() if torch.equal(v, reference[k])]
    assert untouched and all(torch.equal(again.state_dict()[k], reference[k]) for k in untouched)


@pytest.mark.parametrize("make", [fp8_checkpoint, mxfp4_checkpoint], ids=["deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_plan_says_what_the_files_hold_and_what_training_holds(tmp_path, make, capsys):
    import shutil

    from esft_lightning.cli import main
    from esft_lightning.planning.storage import stored_weights

    from .test_cli import quick_config

    path = make(tmp_path / "model")
    meta = load_model(str(path), dtype="float32", on_meta=True)
    exact = stored_weights(path, meta)
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert exact.exact and 0.9 * on_disk < exact.file_bytes < on_disk  # the JSON headers are the rest
    assert exact.memory_bytes == sum(p.numel() * 4 for p in meta.parameters()) > 1.5 * exact.file_bytes
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(path / "config.json", config_only / "config.json")
    estimate = stored_weights(config_only, meta)  # the published configs' case: no weights at hand
    assert not estimate.exact and abs(estimate.file_bytes - exact.file_bytes) < 0.1 * exact.file_bytes

    main(["plan", "--config", str(quick_config(tmp_path / "cfg")), "--model.model", str(path)])
    printed = capsys.readouterr().out
    assert re.search(r"checkpoint: (block FP8 \(e4m3, 24x20 blocks\)|MXFP4 .*), [\d.]+ GiB in the files", printed)
    assert "training holds the weights in float32" in printed
