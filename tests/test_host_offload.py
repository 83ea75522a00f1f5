"""HostOffloadAdamW: AdamW's arithmetic with its state in host memory, in chunks; the quickstart trains the same."""

import copy
import csv

import pytest
import torch
import yaml
from safetensors.torch import load_file

import esft_lightning.optimizers.host_offload as host_offload
from esft_lightning.cli import main
from esft_lightning.optimizers import HostOffloadAdamW

from .test_cli import quick_config

SHAPES = [(7, 13), (300,), (5, 4, 3), (2, 64)]


def twin_optimizers(chunk_bytes: int) -> tuple[list, list, torch.optim.Optimizer, HostOffloadAdamW]:
    """torch's AdamW and HostOffloadAdamW over equal parameters, two groups with their own lr / weight decay."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    a.append(torch.nn.Parameter(torch.randn(13, 7).t()))  # not contiguous: stepped whole, its strides kept
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]  # (clone keeps the strides)

    def groups(params: list) -> list[dict]:
        return [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]

    args = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    reference = torch.optim.AdamW(groups(a), **args)
    return a, b, reference, HostOffloadAdamW(groups(b), **args, chunk_bytes=chunk_bytes)


def step_both(a: list, b: list, reference: torch.optim.Optimizer, offloaded: torch.optim.Optimizer, steps: int):
    for step in range(steps):
        for x, y in zip(a, b):
            grad = torch.randn_like(x)
            x.grad, y.grad = grad.clone(), grad.clone()
        if step == 1:  # a parameter without a gradient is skipped, its counter kept
            a[1].grad = b[1].grad = None
        reference.step()
        offloaded.step()


def assert_same(a, b, reference, offloaded) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), float((x - y).abs().max().detach())
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reference.state[x][name], offloaded.state[y][name]), name


@pytest.mark.parametrize("chunk_bytes", [52, 2**20], ids=["slices", "whole"])
def test_steps_are_bitwise_adamw_s(chunk_bytes):
    """Tiny chunks cut parameters into slices of 13 values: each slice steps with its own copy of the counter."""
    a, b, reference, offloaded = twin_optimizers(chunk_bytes)
    step_both(a, b, reference, offloaded, steps=4)
    assert_same(a, b, reference, offloaded)
    assert int(offloaded.state[b[1]]["step"]) == 3 and int(offloaded.state[b[0]]["step"]) == 4


def test_each_device_step_holds_at_most_chunk_bytes_of_each_estimate(monkeypatch):
    calls: list[list[int]] = []
    real = host_offload.adamw

    def recording(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs):
        calls.append([t.numel() for t in exp_avgs])
        return real(params, grads, exp_avgs, exp_avg_sqs, *args, **kwargs)

    monkeypatch.setattr(host_offload, "adamw", recording)
    a, b, reference, offloaded = twin_optimizers(chunk_bytes=200)  # 50 float32 values
    step_both(a, b, reference, offloaded, steps=1)
    assert_same(a, b, reference, offloaded)
    assert not b[-1].is_contiguous()
    assert all(sum(call) * 4 <= 200 or call == [b[-1].numel()] for call in calls)  # (the transposed one: whole)
    assert sum(map(sum, calls)) == sum(p.numel() for p in b)  # every value stepped once
    assert len(calls) >= sum(p.numel() for p in b) // 50


def test_state_dicts_cross_load_between_adamw_and_host_offload():
    """The same format: torch's AdamW state continues in HostOffloadAdamW (and back) as if never moved."""
    a, b, reference, offloaded = twin_optimizers(chunk_bytes=64)
    step_both(a, b, reference, offloaded, steps=2)
    with torch.no_grad():
        for x, y in zip(a, b):
            y.copy_(x)
    offloaded.load_state_dict(copy.deepcopy(reference.state_dict()))  # as from a file: nothing shared
    assert all(t.device.type == "cpu" for s in offloaded.state.values() for t in s.values())
    assert offloaded.chunk_bytes == 64  # not a state_dict entry: the constructor's
    step_both(a, b, reference, offloaded, steps=2)
    assert_same(a, b, reference, offloaded)
    back = torch.optim.AdamW([{"params": a[:2]}, {"params": a[2:]}])
    back.load_state_dict(offloaded.state_dict())
    assert back.param_groups[1]["lr"] == 3e-3
    assert torch.equal(back.state[a[0]]["exp_avg"], reference.state[a[0]]["exp_avg"])


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        HostOffloadAdamW([torch.nn.Parameter(torch.zeros(2))], chunk_bytes=0)


def fit_quickstart(tmp_path, optimizer: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg_path = quick_config(tmp_path, steps=6)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["optimizer"]["class_path"] = optimizer
    if optimizer.endswith("HostOffloadAdamW"):
        cfg["model"]["optimizer"]["init_args"]["chunk_bytes"] = 4096  # several chunks, slices of the experts
    cfg_path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(cfg_path), "--trainer.accelerator", "cpu"])
    run = sorted((tmp_path / "run" / "logs").glob("version_*"))[-1]
    with open(run / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return losses, load_file(str(run / "adapter" / "adapter.safetensors"))


def test_quickstart_trains_exactly_as_with_adamw(tmp_path, monkeypatch):
    """The lever's accuracy cost on the quickstart (6 steps, lr 1e-3): none. Losses and the adapter are bitwise
    the run with torch.optim.AdamW."""
    losses, adapter = fit_quickstart(tmp_path / "adamw", "torch.optim.AdamW")
    chunks = []
    real = host_offload.adamw
    monkeypatch.setattr(host_offload, "adamw", lambda *args, **kw: chunks.append(1) or real(*args, **kw))
    host_losses, host_adapter = fit_quickstart(tmp_path / "host", "esft_lightning.optimizers.HostOffloadAdamW")
    assert len(chunks) > 6  # the run stepped through HostOffloadAdamW, several chunks a step
    assert len(losses) == 6 and host_losses == losses
    assert adapter.keys() == host_adapter.keys() and adapter
    for key, value in adapter.items():
        assert torch.equal(host_adapter[key], value), key


@pytest.mark.slow
def test_expert_parallel_checkpoint_and_resume_exactly_with_the_state_on_the_host(tmp_path):
    """2 ranks, EP 2 (the owners' rows of the state gathered into the file and handed back on resume): killed after
    step 3 and resumed, bitwise the uninterrupted run. (FSDP2: tests/test_fsdp.py, small-fp32-host-adamw.)"""
    from .test_fsdp import HOST_ADAMW, resume_equals_uninterrupted

    ckpt = resume_equals_uninterrupted(tmp_path, *HOST_ADAMW, strategy_config="configs/ep.yaml")
    state = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["state"]
    assert state and all(s["exp_avg"].shape == s["exp_avg_sq"].shape for s in state.values())
    assert any(bool(s["exp_avg_sq"].gt(0).any()) for s in state.values())  # updated in place on the host
