"""Expert parallelism: experts split over ranks, token-expert pairs sent to their owners, same math as one process."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from esft_lightning.distributed.strategy import FSDP2Strategy
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.selection.rules import ExpertConfig

EP_FAMILIES = ["deepseek_v3", "qwen3_moe", "gpt_oss"]  # sigmoid / softmax routers, biased transposed experts


def _selection(model: torch.nn.Module) -> ExpertConfig:
    """First MoE layer: experts on every owner; second: only expert 1 (the other owners get zero-row copies)."""
    layers = find_moe_layers(model)
    total = layers[0].num_experts
    return ExpertConfig(experts={layers[0].index: [0, total - 1, total // 2 + 1], layers[1].index: [1]})


def _ep_rank(rank: int, world: int, ep: int, family: str, out: str) -> None:
    import torch.distributed as dist

    from esft_lightning.distributed.expert_parallel import dispatch_combine, expert_parallel_mesh, localize_experts
    from esft_lightning.experts.forward import _local_experts_forward
    from esft_lightning.experts.state import TRAINED_PREFIX, expert_shard

    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_tiny_model(family, seed=0)  # the same weights on every rank
        apply_expert_config(model, _selection(model), torch.float32)
        reference = copy.deepcopy(model)
        mesh = expert_parallel_mesh("cpu", world, ep)
        localize_experts(model, mesh)
        generator = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens
        input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
        report: dict = {"logits": [], "grads": [], "no_token": []}

        logits = model(input_ids=input_ids).logits
        expected = reference(input_ids=input_ids).logits
        report["logits"].append((logits - expected).abs().max().item())
        logits.float().pow(2).mean().backward()
        expected.float().pow(2).mean().backward()
        for layer, ref_layer in zip(find_moe_layers(model), find_moe_layers(reference), strict=True):
            shard = expert_shard(layer.experts)
            for name, param in layer.experts.named_parameters():
                if not name.startswith(TRAINED_PREFIX):
                    continue
                reference_grad = getattr(ref_layer.experts, name).grad.clone()
                dist.all_reduce(reference_grad, group=shard.group)  # an owner sums its group's tokens
                rows = [shard.selected.index(shard.first + int(i)) for i in layer.experts.esft_expert_ids]
                assert param.shape[0] == len(rows)
                if rows:
                    report["grads"].append((param.grad - reference_grad[rows]).abs().max().item())

        # A layer where every token goes to rank 0's experts: the other owners receive nothing, yet every rank
        # enters the same collectives, forward and backward.
        layer, ref_layer = find_moe_layers(model)[0], find_moe_layers(reference)[0]
        shard = expert_shard(layer.experts)
        hidden = torch.randn(5, model.config.hidden_size, generator=generator, requires_grad=True)
        index = torch.randint(0, shard.count, (5, model.config.num_experts_per_tok), generator=generator)
        weights = torch.rand(5, model.config.num_experts_per_tok, generator=generator)
        got = dispatch_combine(layer.experts, hidden, index, weights, _local_experts_forward)
        got.sum().backward()
        hidden_ref = hidden.detach().clone().requires_grad_(True)
        want = _local_experts_forward(ref_layer.experts, hidden_ref, index, weights)
        want.sum().backward()
        report["no_token"].append((got - want).abs().max().item())
        report["no_token"].append((hidden.grad - hidden_ref.grad).abs().max().item())
        with open(f"{out}.{rank}.json", "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "world,ep,family",
    [(2, 2, f) for f in EP_FAMILIES] + [(4, 4, "deepseek_v3"), (4, 2, "qwen3_moe")],
)
def test_expert_parallel_forward_and_backward_equal_one_process(tmp_path, world, ep, family):
    out = str(tmp_path / "ep")
    mp.start_processes(_ep_rank, args=(world, ep, family, out), nprocs=world, start_method="spawn")
    for rank in range(world):
        report = json.loads(Path(f"{out}.{rank}.json").read_text())
        assert max(report["logits"]) < 1e-5, (rank, report)
        assert max(report["no_token"]) < 1e-5, (rank, report)
        if rank % ep == 0:
            assert report["grads"], "the owner of experts 0.. holds trainable rows"
        assert all(d < 1e-5 for d in report["grads"]), (rank, report)


def test_expert_parallel_size_must_divide_the_ranks_and_the_experts(tmp_path):
    with pytest.raises(ValueError, match="expert_parallel_size must be >= 1"):
        FSDP2Strategy(expert_parallel_size=0)
    strategy = FSDP2Strategy(expert_parallel_size=3)
    assert strategy.expert_parallel_size == 3
    from esft_lightning.distributed.expert_parallel import expert_parallel_mesh, localize_experts

    with pytest.raises(ValueError, match="expert_parallel_size=3 does not divide the 4 ranks"):
        expert_parallel_mesh("cpu", 4, 3)

    class Mesh(dict):  # the (edp, ep) mesh's interface, one process, three "ranks" of experts
        pass

    class Dim:
        def get_group(self):
            return None

        def size(self):
            return 3

        def get_local_rank(self):
            return 0

    model = build_tiny_model("deepseek_v3")  # 16 experts
    with pytest.raises(ValueError, match="layer 1 has 16 routed experts, which 3 expert-parallel ranks cannot split"):
        localize_experts(model, Mesh(ep=Dim()))


@pytest.mark.slow
def test_expert_parallel_fit_trains_the_same_adapter_as_fsdp2(tmp_path):
    """`esft fit` with configs/ep.yaml (N = 2 ranks) from a saved model: same selection, adapter, checkpoint and
    merged model as FSDP2 on as many ranks, each rank holding 1/N of every layer's routed experts. (4 ranks: the
    forward/backward tests above, and kill-and-resume below with EP 2 x edp 2.)"""
    ranks = 2
    import re

    import yaml
    from safetensors.torch import load_file

    from esft_lightning import ESFTModule

    from .conftest import REPO
    from .test_cli import quick_config
    from .test_fsdp import two_process_fit

    adapters = {}
    for name, strategy in (("fsdp", "configs/fsdp.yaml"), ("ep", "configs/ep.yaml")):
        cfg_path = quick_config(tmp_path / name, steps=3, save_merged=True)
        cfg = yaml.safe_load(cfg_path.read_text())
        if not (tmp_path / "model").exists():
            saved = ESFTModule(family=cfg["model"]["family"], model_config=cfg["model"]["model_config"], seed=0)
            saved.build_model().save_pretrained(tmp_path / "model", max_shard_size="300KB")
        cfg["model"] = {"model": str(tmp_path / "model"), "optimizer": cfg["model"]["optimizer"]}
        cfg["trainer"]["callbacks"][0]["init_args"].update(max_tokens=1024)
        cfg["trainer"]["gradient_clip_val"] = 1e-3  # clipping active: the norm must span every rank's experts
        cfg_path.write_text(yaml.safe_dump(cfg))
        extra = ["--trainer.strategy.init_args.expert_parallel_size", str(ranks)] if name == "ep" else []
        out = two_process_fit(cfg_path, tmp_path, *extra, strategy_config=str(REPO / strategy), devices=ranks)
        if name == "ep":
            shares = re.findall(r"ESFT EP rank \d: routed-expert bytes (\d+) local of (\d+)", out)
            assert len(shares) == ranks and all(int(a) * ranks == int(b) for a, b in shares), shares
        run = sorted((tmp_path / name / "run" / "logs").glob("version_*"))[-1]
        adapters[name] = (
            ExpertConfig.load(run / "expert_cfg.json").experts,
            load_file(str(run / "adapter/adapter.safetensors")),
        )
    assert adapters["ep"][0] == adapters["fsdp"][0]
    for key, value in adapters["fsdp"][1].items():
        torch.testing.assert_close(adapters["ep"][1][key], value, atol=1e-5, rtol=1e-4)
    # The checkpoints have the same format: every owner's experts gathered into the layer's rows.
    saved = {
        name: torch.load(next((tmp_path / name / "run" / "logs").glob("version_*/checkpoints/last.ckpt")))
        for name in adapters
    }
    ep_state, fsdp_state = saved["ep"]["state_dict"], saved["fsdp"]["state_dict"]
    assert {k: v.shape for k, v in ep_state.items()} == {k: v.shape for k, v in fsdp_state.items()}
    for key, value in fsdp_state.items():
        torch.testing.assert_close(ep_state[key], value, atol=1e-5, rtol=1e-4)
    # save_merged: the whole model, every owner's experts with their trained rows merged in.
    from transformers import AutoModelForCausalLM

    merged = {
        name: AutoModelForCausalLM.from_pretrained(next((tmp_path / name / "run" / "logs").glob("version_*/merged")))
        for name in adapters
    }
    fsdp_weights = merged["fsdp"].state_dict()
    for key, value in merged["ep"].state_dict().items():
        torch.testing.assert_close(value, fsdp_weights[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_expert_parallel_on_four_ranks_equals_fsdp2_and_resumes_exactly(tmp_path):
    """configs/ep.yaml (EP 2) on 4 ranks: experts split over 2 ranks, each split FSDP2-sharded over the other 2
    (its gradients reduce-scattered over them). Killed and resumed: bitwise the uninterrupted run, which trains the
    same selection and adapter as FSDP2 on 4 ranks."""
    from safetensors.torch import load_file

    from .conftest import REPO
    from .test_cli import quick_config
    from .test_fsdp import resume_equals_uninterrupted, two_process_fit

    ckpt = resume_equals_uninterrupted(tmp_path / "ep", strategy_config=str(REPO / "configs/ep.yaml"), devices=4)
    two_process_fit(quick_config(tmp_path / "fsdp", steps=6), tmp_path, devices=4)
    runs = {"ep": ckpt.parents[1], "fsdp": sorted((tmp_path / "fsdp/run/logs").glob("version_*"))[-1]}
    assert (
        ExpertConfig.load(runs["ep"] / "expert_cfg.json").experts
        == ExpertConfig.load(runs["fsdp"] / "expert_cfg.json").experts
    )
    ep, fsdp = (load_file(str(run / "adapter/adapter.safetensors")) for run in (runs["ep"], runs["fsdp"]))
    assert ep.keys() == fsdp.keys()
    for key, value in fsdp.items():
        torch.testing.assert_close(ep[key], value, atol=1e-5, rtol=1e-4, msg=key)
