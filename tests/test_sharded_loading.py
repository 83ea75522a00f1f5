"""Reading weights per shard from safetensors files: WeightFiles, streamed profiling, ranks filling their shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from esft_lightning.experts.split import apply_expert_config
from esft_lightning.experts.state import expert_shard
from esft_lightning.models import build_tiny_model
from esft_lightning.pipeline import decide
from esft_lightning.selection.rules import ExpertConfig
from esft_lightning.selection.spec import SelectionSpec
from esft_lightning.weights.loading import load_model
from esft_lightning.weights.sharded_loading import on_meta
from esft_lightning.weights.weight_files import SafetensorsFile, WeightFiles, has_safetensors

SHARD_FAMILIES = ["deepseek_v3", "qwen3_moe", "gpt_oss", "mixtral"]  # per-expert, fused, renamed checkpoints


def saved_model(path: Path, family: str = "deepseek_v3", shard_size: str = "200KB") -> Path:
    """A tiny model saved in several safetensors shards (with an index), as large checkpoints are."""
    build_tiny_model(family, seed=0).save_pretrained(path, max_shard_size=shard_size)
    return path


@pytest.mark.parametrize("family", SHARD_FAMILIES)
def test_weight_files_read_every_parameter_and_any_rows_as_from_pretrained(tmp_path, family):
    path = saved_model(tmp_path / "model", family)
    assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").exists()
    full = load_model(str(path), dtype="float32")
    files = WeightFiles(path, load_model(str(path), dtype="float32", on_meta=True))
    assert files.missing == [] and files.unused == []
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(files.read(name), tensor, rtol=0, atol=0, msg=name)
        if tensor.dim() and tensor.shape[0] >= 4:  # a rank's contiguous rows, and a selection's scattered rows
            torch.testing.assert_close(files.read(name, range(1, 3)), tensor[1:3], rtol=0, atol=0)
            torch.testing.assert_close(files.read(name, [3, 0]), tensor[[3, 0]], rtol=0, atol=0)
            assert files.read(name, range(2, 2)).shape == (0, *tensor.shape[1:])


def test_safetensors_file_reads_rows_of_any_dtype_without_mapping_the_file(tmp_path):
    tensors = {
        "bf16": torch.randn(5, 3, 2).to(torch.bfloat16),
        "f32": torch.randn(4, 7),
        "i64": torch.arange(6),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    reference, stored = load_file(tmp_path / "x.safetensors"), SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(stored.keys()) == sorted(tensors)
    for key, value in reference.items():
        assert torch.equal(stored.read(key), value) and stored.read(key).dtype == value.dtype
    assert torch.equal(stored.read("bf16", [4, 0, 1]), reference["bf16"][[4, 0, 1]])
    assert torch.equal(stored.read("i64", range(2, 5)), reference["i64"][2:5])


def test_weight_files_errors_name_the_directory_and_the_parameter(tmp_path):
    (tmp_path / "empty").mkdir()
    model = build_tiny_model("qwen3_moe")
    assert not has_safetensors(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty"):
        WeightFiles(tmp_path / "empty", model)
    path = saved_model(tmp_path / "model", "qwen3_moe")
    with pytest.raises(KeyError, match="no safetensors file in .*model holds 'model.layers.9.nothing'"):
        WeightFiles(path, model).read("model.layers.9.nothing")


def test_profiling_a_meta_model_streams_the_layers_from_the_files_and_selects_the_same_experts(tmp_path):
    path = saved_model(tmp_path / "model")
    full = load_model(str(path), dtype="float32")
    meta = load_model(str(path), dtype="float32", on_meta=True)
    assert on_meta(meta) and not any(b.is_meta for b in meta.buffers())  # rotary tables and routing bias are real
    bias = [n for n, _ in full.named_buffers() if n.endswith("e_score_correction_bias")]
    assert bias and all(torch.equal(meta.get_buffer(n), full.get_buffer(n)) for n in bias)  # read from the files
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 200, (2, 16), generator=generator), "attention_mask": torch.ones(2, 16)}
        for _ in range(3)
    ]
    spec = SelectionSpec(score_function="token", top_p=0.5, max_tokens=None)
    in_memory, streamed = decide(full, batches, spec), decide(meta, batches, spec)
    assert streamed.config.experts == in_memory.config.experts
    for layer, scores in in_memory.profile.token_scores.items():
        torch.testing.assert_close(torch.as_tensor(streamed.profile.token_scores[layer]), torch.as_tensor(scores))
    assert on_meta(meta)  # nothing stayed loaded after profiling


# -- several ranks, each reading its own shards -------------------------------------------------------------------


def _rank_fills_its_shards(rank: int, world: int, path: str, out: str, expert_parallel: bool = False) -> None:
    """One rank: the model on meta, the selection applied, (experts localized,) sharded and filled from the files;
    saves the gathered parameters (rank 0; under expert parallelism every rank, with its experts' first row)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from esft_lightning.distributed.expert_parallel import expert_parallel_mesh, localize_experts
    from esft_lightning.distributed.fsdp import shard_model
    from esft_lightning.dtensors import full_on_host

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        model = load_model(path, dtype="float32", on_meta=True)
        apply_expert_config(model, ExpertConfig.load(Path(path) / "selection.json"), torch.float32)
        expert_mesh = expert_parallel_mesh("cpu", world, world) if expert_parallel else None
        if expert_mesh is not None:
            localize_experts(model, expert_mesh)
        files = WeightFiles(path, model)
        mesh = init_device_mesh("cpu", (world,))
        read = shard_model(model, mesh, bf16_compute=False, files=files, expert_mesh=expert_mesh)
        gathered = {n: full_on_host(p) for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        firsts = {
            name: (shard.first, shard.count)
            for name, _ in model.named_parameters()
            if (shard := expert_shard(model.get_submodule(name.rpartition(".")[0])))
        }
        if rank == 0 or expert_parallel:
            saved = {"params": gathered, "buffers": buffers, "firsts": firsts}
            torch.save(saved, f"{out}.{rank}.pt" if expert_parallel else f"{out}.pt")
        with open(f"{out}.{rank}.json", "w") as f:
            json.dump({"bytes_read": read}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_reads_only_its_shards_and_together_they_are_the_model(tmp_path, world):
    path = saved_model(tmp_path / "model")
    ExpertConfig(experts={1: [0, 5, 6]}).save(path / "selection.json")
    reference = load_model(str(path), dtype="float32")
    apply_expert_config(reference, ExpertConfig.load(path / "selection.json"), torch.float32)
    out = str(tmp_path / "result")
    mp.start_processes(_rank_fills_its_shards, args=(world, str(path), out), nprocs=world, start_method="spawn")
    result = torch.load(f"{out}.pt", weights_only=True)
    expected = dict(reference.named_parameters())
    assert sorted(result["params"]) == sorted(expected)
    for name, value in result["params"].items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=0, msg=name)
    assert any("esft_" in n for n in result["params"])  # the trainable copies were filled from their experts' rows
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(result["buffers"][name], buffer, rtol=0, atol=0, msg=name)
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    for rank in range(world):
        read = json.loads(Path(f"{out}.{rank}.json").read_text())["bytes_read"]
        assert read <= 1.25 * total / world, (rank, read, total)  # its own rows (chunks round up), no more


@pytest.mark.parametrize("frozen_fp8", [False, True])
def test_filling_in_row_chunks_reads_the_same_tensors(tmp_path, monkeypatch, frozen_fp8):
    """Large parameters are read a few rows at a time (bounded transient memory): one row per read gives the same
    model, trainable copies and 8-bit frozen experts (values and scales) included, as one read per parameter."""
    import esft_lightning.weights.sharded_loading as sharded_loading
    from esft_lightning.experts.file_layout import SplitFileLayout
    from esft_lightning.weights.fp8_blocks import FP8

    path = saved_model(tmp_path / "model")
    config = ExpertConfig({layer: [1, 3] for layer in range(1, 3)})

    def filled(chunk_bytes: int) -> tuple[dict[str, torch.Tensor], int]:
        monkeypatch.setattr(sharded_loading, "READ_CHUNK_BYTES", chunk_bytes)
        model = load_model(str(path), dtype="float32", on_meta=True)
        apply_expert_config(model, config, frozen_dtype=FP8 if frozen_fp8 else None)
        files = WeightFiles(path, model)
        reads = []
        monkeypatch.setattr(
            files, "read", lambda name, rows=None, read=files.read: reads.append(name) or read(name, rows)
        )
        sharded_loading.fill_from_files(model, files, torch.device("cpu"), SplitFileLayout())
        return {n: p.detach().clone() for n, p in model.named_parameters()}, len(reads)

    whole, whole_reads = filled(2**40)
    chunked, chunked_reads = filled(1)
    assert chunked_reads > whole_reads  # the chunked path ran: several reads for one parameter
    assert whole.keys() == chunked.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor.view(torch.uint8) if tensor.dtype == FP8 else tensor,
                           chunked[name].view(torch.uint8) if tensor.dtype == FP8 else chunked[name]), name  # fmt: skip
    reference = load_model(str(path), dtype="float32")
    apply_expert_config(reference, config)
    for name, tensor in reference.named_parameters():
        if not frozen_fp8 or chunked[name].dtype != FP8:
            torch.testing.assert_close(chunked[name], tensor.detach(), rtol=0, atol=0, msg=name)
