"""`esft plan` and the fit-time memory check: published configs, per-rank bytes against real fits, activations."""

import csv
import json
import math
import re
from dataclasses import replace

import pytest
import torch
import yaml

from esft_lightning import ESFTModule
from esft_lightning.cli import MemoryPlanError, main, parse_config, plan_inputs
from esft_lightning.constants import TRAINING_HEADROOM
from esft_lightning.models import find_moe_layers
from esft_lightning.planning.plan import (
    GiB,
    PlanRequest,
    activation_bytes,
    build_meta_model,
    parse_bytes,
    plan_memory,
    selection_bound,
)
from esft_lightning.selection.rules import ExpertConfig
from esft_lightning.selection.spec import SelectionSpec

from .conftest import REPO
from .test_cli import quick_config
from .test_fsdp import two_process_fit

PUBLISHED = {  # total parameters as published (MTP module of DeepSeek-V3 excluded: transformers does not build it)
    "DeepSeek-V2-Lite": 15.7e9,
    "DeepSeek-V3": 671e9,
    "Qwen3-30B-A3B": 30.5e9,
    "Qwen3-235B-A22B": 235e9,
    "GPT-OSS-20B": 20.9e9,
    "GPT-OSS-120B": 116.8e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_build_on_meta_at_their_published_size(name):
    model = build_meta_model(model=str(REPO / "configs/models" / name), dtype="bfloat16")
    assert all(p.device.type == "meta" for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(PUBLISHED[name], rel=0.01)


def test_bound_and_fsdp_chunks():
    model = build_meta_model(family="deepseek_v3", model_config={"num_hidden_layers": 3}, dtype="bfloat16")
    config, kind = selection_bound(model, SelectionSpec(top_p=0.2))
    assert kind == "bound" and all(len(ids) == math.ceil(0.2 * 16) for ids in config.experts.values())
    assert selection_bound(model, SelectionSpec(score_function="gate"))[1] == "estimate"
    plan = plan_memory(model, PlanRequest(world_size=3, micro_batch=2, seq_length=64))
    assert plan.selection["trainable_dtype"] == "torch.float32"  # fp32 copies of the bf16 experts
    # torch.chunk on dim 0: rank 0 holds the largest chunk of every tensor, the ranks add up to the whole model
    params = [r["params_bytes"] for r in plan.by_rank]
    assert params[0] == max(params) == plan.per_rank.params_bytes
    assert sum(params) == plan.scenarios["esft_ddp"].params_bytes
    assert sum(r["trainable_bytes"] for r in plan.by_rank) == plan.scenarios["esft_ddp"].trainable_bytes
    fft = plan.scenarios["fft_ddp"]  # every parameter in fp32: 4 bytes each, twice that in AdamW state
    assert (
        fft.params_bytes == fft.trainable_bytes == 4 * plan.total_params and fft.optimizer_bytes == 2 * fft.params_bytes
    )
    # an exact config: its experts only
    exact = ExpertConfig({i: [0] for i in config.experts})
    model = build_meta_model(family="deepseek_v3", model_config={"num_hidden_layers": 3}, dtype="bfloat16")
    one = plan_memory(model, PlanRequest(expert_config=exact))
    assert one.selection["kind"] == "exact" and one.selection["selected_experts"] == len(config.experts)
    assert one.per_rank.trainable_bytes * 4 == pytest.approx(plan.scenarios["esft_ddp"].trainable_bytes, rel=0.01)
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("H200") > parse_bytes("H100") > 79 * GiB


def test_expert_parallel_plan_splits_routed_experts_by_owner():
    model = build_meta_model(family="deepseek_v3", model_config={"num_hidden_layers": 3}, dtype="bfloat16")
    selected = {1: [0, 1, 2, 9], 2: [15]}  # 16 experts a layer; EP 2: experts 0-7 on rank 0, 8-15 on rank 1
    request = PlanRequest(world_size=4, micro_batch=1, seq_length=64, expert_parallel_size=2)
    plan = plan_memory(model, replace(request, expert_config=ExpertConfig(selected)))
    assert "esft_ep" in plan.scenarios and plan.per_rank == plan.scenarios["esft_ep"]
    layers = {layer.index: layer for layer in find_moe_layers(model)}
    fused = sum(p.numel() * p.element_size() for i in layers for n, p in layers[i].experts.named_parameters()
                if not n.startswith("esft_"))  # fmt: skip
    row = {
        i: sum(p[0].numel() * 4 for n, p in layers[i].experts.named_parameters() if n.startswith("esft_"))
        for i in layers
    }  # fmt: skip  (one selected expert's fp32 copy)
    whole = plan.scenarios["esft_ddp"].params_bytes  # every parameter once
    rest = whole - fused - sum(row[i] * len(ids) for i, ids in selected.items())
    by_rank = plan.by_rank
    assert sum(r["params_bytes"] for r in by_rank) == whole  # each byte on exactly one rank
    # ranks 0 and 2 hold experts 0-7 (and the copies of 0, 1, 2), ranks 1 and 3 experts 8-15 (copies of 9, 15):
    # each pair splits its experts' rows by FSDP2 over the two ranks holding the same experts
    assert by_rank[0]["trainable_bytes"] + by_rank[2]["trainable_bytes"] == 3 * row[1]
    assert by_rank[1]["trainable_bytes"] + by_rank[3]["trainable_bytes"] == row[1] + row[2]
    expert_bytes = [r["params_bytes"] - r["trainable_bytes"] for r in by_rank]
    assert sum(expert_bytes) == fused + rest and max(expert_bytes) <= fused / 4 + rest / 4 + 2**16
    assert plan.per_rank.params_bytes == max(r["params_bytes"] for r in by_rank)
    # without EP every rank holds 1/4 of every expert tensor (and the FSDP2 all-gather brings in all of them)
    assert plan.per_rank.comm_bytes < plan.scenarios["esft_fsdp2"].comm_bytes
    with pytest.raises(ValueError, match="does not divide the routed experts"):
        plan_memory(build_meta_model(family="deepseek_v3", model_config={"num_hidden_layers": 3}),
                    replace(request, world_size=3, expert_parallel_size=3))  # fmt: skip


def _peak_bytes(model, ids) -> int:
    """Peak CPU bytes allocated during forward + backward (the profiler's allocation events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_activation_estimate_covers_measured_peak(checkpointing):
    from esft_lightning.models import build_tiny_model, enable_activation_checkpointing
    from esft_lightning.pipeline import apply

    model = build_tiny_model(
        "deepseek_v3", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        vocab_size=1000,
    )  # fmt: skip
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    spec = SelectionSpec()
    apply(model, selection_bound(model, spec)[0], spec)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, 1000, (2, 256))
    measured = _peak_bytes(model, ids) - grads
    estimate = activation_bytes(model, ids.numel(), 4, checkpointing)
    assert measured <= estimate <= 2 * measured, (measured, estimate)


def _plan(*args: str, expert_config=None) -> dict:
    load_args, request = plan_inputs(parse_config(list(args)))
    if expert_config is not None:
        request.expert_config = ExpertConfig.load(expert_config)
    return plan_memory(build_meta_model(**load_args), request).to_dict()


def test_plan_json_command(tmp_path, capsys):
    cfg = quick_config(tmp_path)
    main(["plan", "--config", str(cfg), "--json"])
    out = json.loads(capsys.readouterr().out)
    rank = out["per_rank"]
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "comm_bytes")
    assert rank["total_bytes"] == sum(rank[k] for k in parts)
    assert 0 < rank["trainable_bytes"] == rank["grads_bytes"] < rank["params_bytes"]
    assert out["selection"]["kind"] == "bound" and out["strategy"] == "single" and out["world_size"] == 1
    assert out["scenarios"]["fft_single"]["trainable_bytes"] > 5 * rank["trainable_bytes"]
    qwen = str(REPO / "configs/models/Qwen3-30B-A3B")
    fsdp = ("--config", str(REPO / "configs/fsdp.yaml"), "--trainer.devices", "8", "--trainer.accelerator", "gpu")
    big = _plan("--config", str(cfg), *fsdp, "--model.model", qwen)
    assert big["strategy"] == "fsdp2" and big["world_size"] == 8 and big["selection"]["fft_dtype"] == "torch.float32"
    whole = 2 * big["total_params"] + 4 * big["selection"]["trainable_params"]  # bf16 weights + fp32 copies
    assert sum(r["params_bytes"] for r in big["by_rank"]) == whole  # sharded 8 ways; rank 0 the largest chunks
    assert whole / 8 < big["per_rank"]["params_bytes"] < 1.1 * whole / 8  # (26 selected experts: 4 rows on rank 0)


@pytest.mark.slow
def test_plan_equals_measured_bytes_one_and_two_ranks(tmp_path):
    """Parameters, gradients and AdamW state per rank: the plan against a real 1-process fit and a 2-rank FSDP2 fit
    (gloo) of a bf16 model with fp32 trainable copies, within 2 %."""
    cfg = quick_config(tmp_path / "one", steps=2)
    main(["fit", "--config", str(cfg)])
    run = sorted((tmp_path / "one/run/logs").glob("version_*"))[-1]
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("memory/param_bytes")]
    measured = {k: float(rows[0][f"memory/{k}"]) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes")}
    plan = _plan("--config", str(cfg), expert_config=run / "expert_cfg.json")
    assert plan["selection"]["kind"] == "exact"
    planned = plan["by_rank"][0]
    assert planned["params_bytes"] == pytest.approx(measured["param_bytes"], rel=0.02)
    assert planned["grads_bytes"] == pytest.approx(measured["grad_bytes"], rel=0.02)
    assert planned["optimizer_bytes"] == pytest.approx(measured["optimizer_state_bytes"], rel=0.02)

    two = quick_config(tmp_path / "two", steps=2, expert_config=str(run / "expert_cfg.json"))
    out = two_process_fit(two, tmp_path, "--model.dtype", "bfloat16")
    found = re.findall(r"ESFT memory rank (\d): param_bytes (\d+), grad_bytes (\d+), optimizer_state_bytes (\d+)", out)
    assert len(found) == 2
    args = ("--config", str(two), "--config", str(REPO / "configs/fsdp.yaml"), "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--model.dtype", "bfloat16")  # fmt: skip
    plan = _plan(*args, expert_config=run / "expert_cfg.json")
    assert plan["strategy"] == "fsdp2" and plan["selection"]["trainable_dtype"] == "torch.float32"
    for rank, params, grads, state in found:
        planned = plan["by_rank"][int(rank)]
        assert planned["params_bytes"] == pytest.approx(int(params), rel=0.02)
        assert planned["grads_bytes"] == pytest.approx(int(grads), rel=0.02)
        assert planned["optimizer_bytes"] == pytest.approx(int(state), rel=0.02)
    assert plan["per_rank"]["params_bytes"] == max(int(p) for _, p, _, _ in found)


@pytest.mark.slow
def test_plan_equals_measured_bytes_expert_parallel(tmp_path):
    """Under expert parallelism (2 ranks, EP 2, gloo; bf16 model, fp32 trainable copies): each rank's parameter,
    gradient and AdamW-state bytes equal the plan's for that rank within 2 %, the ranks owning different numbers of
    selected experts (rank 0: expert 2; rank 1: experts 9 and 12 of 16)."""
    selection = tmp_path / "expert_cfg.json"
    ExpertConfig({1: [9, 2, 12]}).save(selection)
    cfg = quick_config(tmp_path, steps=2, expert_config=str(selection))
    out = two_process_fit(cfg, tmp_path, "--model.dtype", "bfloat16", strategy_config="configs/ep.yaml")
    found = re.findall(r"ESFT memory rank (\d): param_bytes (\d+), grad_bytes (\d+), optimizer_state_bytes (\d+)", out)
    assert len(found) == 2
    args = ("--config", str(cfg), "--config", str(REPO / "configs/ep.yaml"), "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--model.dtype", "bfloat16")  # fmt: skip
    plan = _plan(*args, expert_config=selection)
    assert plan["strategy"] == "fsdp2" and "esft_ep" in plan["scenarios"]
    for rank, params, grads, state in found:
        planned = plan["by_rank"][int(rank)]
        assert planned["params_bytes"] == pytest.approx(int(params), rel=0.02)
        assert planned["grads_bytes"] == pytest.approx(int(grads), rel=0.02)
        assert planned["optimizer_bytes"] == pytest.approx(int(state), rel=0.02)
    grads = {int(rank): int(g) for rank, _, g, _ in found}
    assert grads[1] == pytest.approx(2 * grads[0], rel=0.02)  # two selected experts' copies on rank 1, one on 0
    assert plan["per_rank"]["params_bytes"] == max(int(p) for _, p, _, _ in found)


def _between_checkpointing_and_not(cfg) -> int:
    """A device size the quickstart run fits only with activation checkpointing."""
    plain = _plan("--config", str(cfg))
    with_ac = _plan("--config", str(cfg), "--model.activation_checkpointing", "true")
    need, ac_need = plain["per_rank"]["total_bytes"], with_ac["per_rank"]["total_bytes"]
    assert ac_need < need
    return int((need + ac_need) / 2 / TRAINING_HEADROOM)


class _Loaded(Exception):
    pass


def _no_loading(monkeypatch):
    def loaded(self):
        raise _Loaded("configure_model reached: the model is being loaded")

    monkeypatch.setattr(ESFTModule, "configure_model", loaded)


def test_fit_refuses_before_loading_with_the_cheapest_fix(tmp_path, monkeypatch):
    cfg = quick_config(tmp_path)
    device = _between_checkpointing_and_not(cfg)
    _no_loading(monkeypatch)
    with pytest.raises(MemoryPlanError, match=r"short by [\d.]+ GiB\. Cheapest fix: turn on activation checkpoint"):
        main(["fit", "--config", str(cfg), "--plan.device_memory", str(device)])
    with pytest.raises(MemoryPlanError, match="no number of GPUs fits"):
        main(["fit", "--config", str(cfg), "--plan.device_memory", "1MiB"])
    with pytest.raises(_Loaded):  # fits with checkpointing: the check lets it through to loading
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--plan.device_memory",
                str(device),
                "--model.activation_checkpointing",
                "true",
            ]
        )


def test_fit_strict_false_only_warns(tmp_path, monkeypatch):
    cfg = quick_config(tmp_path)
    _no_loading(monkeypatch)
    with pytest.warns(UserWarning, match="short by"), pytest.raises(_Loaded):
        main(["fit", "--config", str(cfg), "--plan.device_memory", "1MiB", "--plan.strict", "false"])
    with pytest.raises(_Loaded):  # no device memory given on CPU: nothing to check
        main(["fit", "--config", str(cfg)])


def test_print_config_round_trips_plan_options(tmp_path, capsys):
    cfg = quick_config(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--plan.strict", "false", "--plan.device_memory", "80GiB", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["plan"] == {"check": True, "strict": False, "device_memory": "80GiB"}
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(again), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == printed
    common = {k: v for k, v in printed.items() if k in ("seed_everything", "trainer", "model", "data", "plan")}
    again.write_text(yaml.safe_dump(common))  # (without fit's own options: parse_config reads any subcommand's)
    assert parse_config(["--config", str(again)]).plan.strict is False


@pytest.mark.slow
def test_docs_table_is_generated():
    """docs/planning.md's table and the README's excerpt are what benchmarks/planning_table.py prints now."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/planning_table.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "| DeepSeek-V3 | 671.0 B | 16 |" in done.stdout
    assert "| DeepSeek-V3 | 64 |" in done.stdout  # the expert-parallel table


def test_deepseek_v3_fits_one_h200_node_with_adamw_state_on_the_host(tmp_path, capsys):
    """configs/deepseek_v3_8xh200.yaml with 8 experts in every MoE layer, one per GPU: fits 8 H200s; the same run
    with torch.optim.AdamW does not, and its cheapest fix is the host-memory optimizer, which saves its state's bytes
    less the two chunks a step brings to the GPU."""
    spread = tmp_path / "spread.json"
    ExpertConfig({layer: [e * 32 for e in range(8)] for layer in range(3, 61)}).save(spread)
    args = ("--config", str(REPO / "configs/deepseek_v3_8xh200.yaml"), "--expert_config", str(spread))
    args += ("--model.model", str(REPO / "configs/models/DeepSeek-V3"), "--plan.device_memory", "H200-141GB")
    main(["plan", *args, "--json"])
    host = json.loads(capsys.readouterr().out)
    main(["plan", *args, "--model.optimizer", "torch.optim.AdamW", "--json"])
    adamw = json.loads(capsys.readouterr().out)
    assert host["fits"] and host["world_size"] == 8 and host["selection"]["selected_experts"] == 8 * 58
    assert not adamw["fits"] and "esft_lightning.optimizers.HostOffloadAdamW" in adamw["fixes"][0]
    on_host, on_device = host["per_rank"], adamw["per_rank"]
    assert on_host["host_optimizer_bytes"] == on_device["optimizer_bytes"] == 2 * on_device["trainable_bytes"]
    assert on_host["optimizer_bytes"] == 2 * 256 * 2**20 and on_device["host_optimizer_bytes"] == 0
    assert on_device["total_bytes"] - on_host["total_bytes"] == on_device["optimizer_bytes"] - 2**29
    main(["plan", *args, "--model.optimizer.chunk_bytes", str(2**30), "--json"])  # the config's chunk counts
    assert json.loads(capsys.readouterr().out)["per_rank"]["optimizer_bytes"] == 2 * 2**30
    # the files are block FP8; training holds the routed experts so too (the frozen_experts_dtype of the config)
    assert host["checkpoint"]["format"].startswith("block FP8") and "float8" in host["checkpoint"]["memory_dtype"]
    assert host["checkpoint"]["memory_bytes"] < 1.05 * host["checkpoint"]["file_bytes"]
