"""benchmarks/comm_volume.py: bytes sent per step under FSDP2 and expert parallelism, computed and measured."""

import importlib.util
import subprocess
import sys

import pytest

from esft_lightning.models import build_tiny_model, decoder_layers, find_moe_layers
from esft_lightning.pipeline import apply
from esft_lightning.selection.rules import ExpertConfig
from esft_lightning.selection.spec import SelectionSpec

from .conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("comm_volume", REPO / "benchmarks/comm_volume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model():
    model = build_tiny_model(
        "qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_experts=8, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        vocab_size=320,
    )  # fmt: skip
    apply(model, ExpertConfig({0: [0, 5], 1: [1, 4], 2: [2, 3, 6, 7]}), SelectionSpec())
    return model


def test_computed_fsdp2_moves_every_weight_ep_moves_tokens():
    cv, model = _script(), _model()
    params = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    experts = sum(p.numel() for layer in find_moe_layers(model) for p in layer.experts.parameters())
    world = 2  # every tensor here has an even number of rows: no padding
    fsdp = cv.computed(model, world, 1, tokens=128, compute_bytes=2, reduce_bytes=4)
    # every layer gathered twice (forward, backward), the root once; each rank sends its half to the other
    assert fsdp["all_gather"] == 2 * (2 * in_layers + (params - in_layers)) * (world - 1) / world
    assert fsdp["reduce_scatter"] == 4 * trainable * (world - 1) / world
    assert fsdp["all_to_all"] == 0
    ep = cv.computed(model, world, world, tokens=128, compute_bytes=2, reduce_bytes=4)
    assert ep["reduce_scatter"] == 0  # the selected experts' gradients are complete on their owners
    assert ep["all_gather"] == 2 * (2 * (in_layers - experts) + (params - in_layers)) * (world - 1) / world
    # per MoE layer 2 all-to-alls forward + 2 backward (the first layer's dispatch: none, nothing trains before it)
    pairs = 128 * 2
    assert ep["all_to_all"] == (4 + 4 + 3) * pairs * 64 * 2 / 2 + 3 * 8 * 8 / 2
    four = cv.computed(model, 4, 2, tokens=128, compute_bytes=2, reduce_bytes=4)  # EP 2 x 2 expert replicas
    assert 0 < four["reduce_scatter"] and four["all_to_all"] == ep["all_to_all"]


@pytest.mark.slow
def test_docs_comm_table_is_generated():
    """docs/planning.md's communication section is what benchmarks/comm_volume.py computes now."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/comm_volume.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "| DeepSeek-V3 | 64 | EP |" in done.stdout


@pytest.mark.slow
def test_measured_equals_computed_on_two_ranks(tmp_path):
    """A 2-rank FSDP2 fit and a 2-rank EP fit (gloo): the wrapped collectives count exactly the computed parameter
    all-gathers and gradient reduce-scatters; the token all-to-alls within 10 % of balanced routing."""
    cv = _script()
    measured = cv.measure([2], steps=3, seq=32, batch=2)
    expected = cv._expected_for_measured(measured, 64)
    for got, want in zip(measured, expected, strict=True):
        assert got["all_gather"] == pytest.approx(want["all_gather"], rel=1e-6), got
        assert got["reduce_scatter"] == pytest.approx(want["reduce_scatter"], rel=1e-6), got
        assert got["all_to_all"] == pytest.approx(want["all_to_all"], rel=0.1), got
        assert got["other"] < 1024  # the loss reductions: scalars
    fsdp, ep = measured
    assert fsdp["strategy"] == "fsdp2" and ep["strategy"] == "ep"
    assert ep["all_gather"] < fsdp["all_gather"] / 10 and ep["reduce_scatter"] == 0 < ep["all_to_all"]
