"""`esft plan` and the fit-time memory check: published configs, per-rank bytes against real fits, activations."""

import csv
import json
import math
import re

import pytest
import torch
import yaml

from esft_lightning import ESFTModule
from esft_lightning.cli import MemoryPlanError, main, parse_config, plan_inputs
from esft_lightning.planning import (
    HEADROOM,
    GiB,
    PlanRequest,
    activation_bytes,
    build_meta_model,
    parse_bytes,
    plan_memory,
    selection_bound,
)
from esft_lightning.selection import ExpertConfig
from esft_lightning.selection_spec import SelectionSpec

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
    from esft_lightning.selection_spec import apply

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


def _between_checkpointing_and_not(cfg) -> int:
    """A device size the quickstart run fits only with activation checkpointing."""
    plain = _plan("--config", str(cfg))
    with_ac = _plan("--config", str(cfg), "--model.activation_checkpointing", "true")
    need, ac_need = plain["per_rank"]["total_bytes"], with_ac["per_rank"]["total_bytes"]
    assert ac_need < need
    return int((need + ac_need) / 2 / HEADROOM)


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
