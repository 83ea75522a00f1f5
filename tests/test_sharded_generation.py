"""Generation under FSDP2 (sharded_generation): one unshard per evaluation, same predictions, training unaffected."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.distributed.generation import MemoryReport, sharded_generation, unshard_fits
from esft_lightning.evaluation.evaluate import evaluate_set
from esft_lightning.models import build_tiny_model

PROMPTS = [f"User: question {i}\n\nAssistant:" for i in range(6)]  # equal lengths: no padding in any batch
SAMPLES = [{"prompt": p, "answers": ["x"]} for p in PROMPTS]
TOKENS = (2, 10)


def test_unshard_fits_sums_the_ranks_that_share_memory():
    gib = 2**30
    one_host = [MemoryReport("a", 3 * gib, 10 * gib), MemoryReport("a", 3 * gib, 9 * gib)]
    assert unshard_fits(one_host)  # 6 GiB <= 0.8 x 9 GiB
    assert not unshard_fits(one_host + [MemoryReport("a", 3 * gib, 9 * gib)])  # 9 GiB > 7.2 GiB
    two_hosts = one_host + [MemoryReport("b", 7 * gib, 9 * gib)]
    assert unshard_fits(two_hosts)  # host b holds one rank: 7 GiB <= 7.2 GiB
    assert not unshard_fits(two_hosts + [MemoryReport("c", 1, None)])  # unknown memory: never unshard
    assert not unshard_fits(one_host, headroom=0.5)


def test_plain_model_generates_locally_and_policies_are_checked():
    model = build_tiny_model("qwen3_moe")
    with sharded_generation(model) as mode:
        assert mode == "local"
    with pytest.raises(ValueError, match="'auto', 'always' or 'never'"):
        with sharded_generation(model, "sometimes"):  # type: ignore[arg-type]
            pass


def _train_batch() -> dict[str, torch.Tensor]:
    ids = torch.arange(2 * 12).reshape(2, 12) % 250
    return {"input_ids": ids, "labels": ids.clone()}


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    loss = model(**_train_batch()).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def _reference() -> dict:
    """One process, no FSDP: the predictions and the model after one SGD step."""
    tokenizer = byte_tokenizer()
    model = build_tiny_model("qwen3_moe", seed=0)
    predictions = {}
    for tokens in TOKENS:
        _, records = evaluate_set(model, tokenizer, SAMPLES, tokens, batch_size=1)
        predictions[tokens] = [r["prediction"] for r in records]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = _sgd_step(model, optimizer)
    return {"predictions": predictions, "loss": loss, "state": {k: v.detach() for k, v in model.state_dict().items()}}


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        result = _sharded_checks(world)
        if rank == 0:
            torch.save(result["state"], Path(folder) / "state.pt")
            del result["state"]
            (Path(folder) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _sharded_checks(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from torch.distributed.tensor import DTensor

    from esft_lightning.distributed import generation as sg
    from esft_lightning.distributed.fsdp import shard_model

    gathers = [0]  # FSDP all-gathers (one per module unshard), counted where FSDP issues them
    original = _fsdp_param_group.foreach_all_gather

    def counting(*args, **kwargs):
        gathers[0] += 1
        return original(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counting
    tokenizer = byte_tokenizer()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    model = build_tiny_model("qwen3_moe", seed=0)
    shard_model(model, mesh, bf16_compute=False)
    modules = sg.fsdp_modules(model)
    layers = [m for m in modules if m is not model]
    settings = [sg._reshard_setting(m) for m in modules]
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    out: dict = {"modules": len(modules), "gathers": {}, "predictions": {}}

    def run(tokens: int, unshard: str) -> list[str]:
        gathers[0] = 0
        _, records = evaluate_set(model, tokenizer, SAMPLES, tokens, batch_size=1, unshard=unshard)
        out["gathers"][f"{unshard}/{tokens}"] = gathers[0]
        return [r["prediction"] for r in records]

    # Before any forward (the root not yet lazily initialised), as TaskEvalCallback at fit start.
    for tokens in TOKENS:
        out["predictions"][f"always/{tokens}"] = run(tokens, "always")
        out["predictions"][f"never/{tokens}"] = run(tokens, "never")
    # An error inside the evaluation still restores (reset: all resharded).
    try:
        with sg.sharded_generation(model, "always"):
            raise KeyError("boom")
    except KeyError:
        pass
    with sg.sharded_generation(model) as mode:  # a tiny model fits: auto unshards
        out["auto"] = mode
        out["unsharded_inside"] = not any(isinstance(p, DTensor) for p in model.parameters())
    original_available = sg.available_bytes
    sg.available_bytes = lambda device: 1024  # nothing fits: auto gathers per forward
    with sg.sharded_generation(model) as mode:
        out["auto_short_of_memory"] = mode
    sg.available_bytes = original_available

    # As a model only ever forwarded: layers sharded, the root's parameters kept (FSDP's default for the root),
    # the same reshard-after-forward settings.
    plain = build_tiny_model("qwen3_moe", seed=0)
    shard_model(plain, mesh, bf16_compute=False)
    with torch.no_grad():
        plain(input_ids=torch.tensor([[1, 2, 3]]))

    def fsdp_state(m: nn.Module) -> list:
        return [
            (
                [isinstance(p, DTensor) for p in module.parameters(recurse=False)],
                sg._reshard_setting(module)[0],
                [info is None for info in sg._reshard_setting(module)[1]],
            )
            for module in sg.fsdp_modules(m)
        ]

    out["state_as_after_a_forward"] = fsdp_state(model) == fsdp_state(plain)
    out["layers_sharded"] = all(isinstance(p, DTensor) for layer in layers for p in layer.parameters())
    out["same_layer_params"] = all(  # the sharded parameters, which the optimizer holds
        p is q for p, q in zip(model.parameters(), params) if isinstance(p, DTensor)
    )
    out["layer_settings_restored"] = all(
        all(a is b for a, b in zip(sg._reshard_setting(m)[1], s[1])) for m, s in zip(modules[1:], settings[1:])
    )
    with torch.no_grad():  # layers reshard after forward again
        model(input_ids=torch.tensor([[1, 2, 3]]))
    out["layers_resharded_after_forward"] = all(isinstance(p, DTensor) for layer in layers for p in layer.parameters())
    out["loss"] = _sgd_step(model, optimizer)  # every rank the same batch: the mean gradient is the batch's
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out["state"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # Mixed precision: the unsharded parameters are bf16 copies; the same predictions as gathering per forward.
    bf16 = build_tiny_model("qwen3_moe", seed=0)
    shard_model(bf16, mesh, bf16_compute=True)
    with sg.sharded_generation(bf16, "always"):
        out["bf16_unsharded_dtypes"] = sorted({str(p.dtype) for p in bf16.parameters()})
    bf16_layers = [m for m in sg.fsdp_modules(bf16) if m is not bf16]  # the root keeps its (bf16) parameters
    out["bf16_sharded_dtypes"] = sorted({str(p.dtype) for layer in bf16_layers for p in layer.parameters()})
    for unshard in ("always", "never"):
        _, records = evaluate_set(bf16, tokenizer, SAMPLES, TOKENS[-1], batch_size=2, unshard=unshard)
        out["predictions"][f"bf16/{unshard}"] = [r["prediction"] for r in records]
    return out


@pytest.mark.slow  # two processes
def test_fsdp_generation_unshards_once_and_training_goes_on(tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    reference = _reference()
    for tokens in TOKENS:  # the same predictions as one process, both ways
        assert result["predictions"][f"always/{tokens}"] == reference["predictions"][tokens]
        assert result["predictions"][f"never/{tokens}"] == reference["predictions"][tokens]
    modules = result["modules"]
    # Unsharded: one all-gather per FSDP module, whatever the number of new tokens (none for the root when an
    # earlier forward left its parameters gathered, as FSDP does for the root); per forward: many more.
    assert result["gathers"]["always/2"] == modules
    assert result["gathers"]["always/10"] in (modules - 1, modules)
    assert result["gathers"]["never/10"] > result["gathers"]["never/2"] >= 2 * modules
    assert result["auto"] == "unsharded" and result["unsharded_inside"]
    assert result["auto_short_of_memory"] == "gathered"
    assert result["state_as_after_a_forward"] and result["layers_sharded"]
    assert result["same_layer_params"] and result["layer_settings_restored"]
    assert result["layers_resharded_after_forward"]
    # Training after the evaluations: the same loss and update as one process that never evaluated.
    assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    state = torch.load(tmp_path / "state.pt")
    assert state.keys() == reference["state"].keys()
    for name, value in reference["state"].items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert result["bf16_unsharded_dtypes"] == ["torch.bfloat16"]
    assert result["bf16_sharded_dtypes"] == ["torch.float32"]
    assert result["predictions"]["bf16/always"] == result["predictions"]["bf16/never"]
