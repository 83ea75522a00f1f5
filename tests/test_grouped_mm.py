"""When the esft experts forward may use grouped_mm (the checks transformers makes), and the loop it falls back to."""

import pytest
import torch

from esft_lightning.experts.forward import grouped_mm_supported
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.models import build_tiny_model

from .test_experts import batch, selection


@pytest.mark.parametrize(
    "facts, usable",
    [
        (dict(device_type="cpu", torch_version="2.13.0+cpu"), True),
        (dict(device_type="cpu", torch_version="2.8.0"), False),  # no CPU kernel before 2.9
        (dict(device_type="cpu", torch_version="2.10.0", aligned=False), False),  # <= 2.10 needs 16-byte alignment
        (dict(device_type="cpu", torch_version="2.11.0", aligned=False), True),
        (dict(device_type="cuda", torch_version="2.10.0", cuda_capability=(8, 0)), True),  # A100
        (dict(device_type="cuda", torch_version="2.10.0", cuda_capability=(7, 5)), False),  # T4
        (dict(device_type="cuda", torch_version="2.8.0", cuda_capability=(8, 0), has_functional=False), False),
        (dict(device_type="cuda", torch_version="2.8.0", cuda_capability=(9, 0), has_functional=False), True),
        (dict(device_type="cuda", torch_version="2.9.0", cuda_capability=(8, 6), has_functional=False), True),
        (dict(device_type="cpu", torch_version="2.13.0", has_functional=False, has_private=False), False),
        (dict(device_type="cpu", torch_version="2.13.0", compiling=True), False),  # compiled: bf16 only
        (dict(device_type="cpu", torch_version="2.13.0", compiling=True, dtype=torch.bfloat16), True),
        (dict(device_type="cpu", torch_version="2.13.0", dtype=torch.float64), False),  # no float64 kernel
        (dict(device_type="cuda", torch_version="2.10.0", cuda_capability=(9, 0), dtype=torch.float64), False),
    ],
)
def test_grouped_mm_decision_mirrors_transformers(facts, usable):
    assert grouped_mm_supported(**facts) is usable


@pytest.mark.parametrize("patch", ["old_torch", "old_gpu"])
def test_split_falls_back_to_the_loop_where_grouped_mm_cannot_run(patch, monkeypatch):
    import esft_lightning.experts.forward as experts_forward

    model = build_tiny_model("gpt_oss")
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
    apply_expert_config(model, selection(model, picks=(1, 4)))

    def refuse(*_args, **_kwargs):
        raise AssertionError("grouped_mm used where it cannot run")

    monkeypatch.setattr(experts_forward, "_split_grouped", refuse)
    if patch == "old_torch":
        monkeypatch.setattr(torch, "__version__", "2.8.0")
    else:  # what an sm75 GPU reports, checked on CPU tensors posing as CUDA ones
        real = experts_forward.grouped_mm_supported
        monkeypatch.setattr(
            experts_forward,
            "grouped_mm_supported",
            lambda device_type, *a, **k: (
                real("cuda", "2.10.0", (7, 5)) if device_type == "cpu" else real(device_type, *a, **k)
            ),
        )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
