"""Multi-threaded CPU training is bitwise reproducible (issue 17): the experts' gathers, fits in separate processes.

The cause was the backward of the experts' row gathers ``hidden[tokens]``: ``index_put_(accumulate=True)``, whose CPU
kernel adds a token's k expert-pair gradients with atomic adds on every thread once the gather has 32768 elements
(PyTorch's parallel grain), so the sum's order, and its last bits, changed from run to run. The experts forward now
gathers with ``index_select`` (backward: a serial ``index_add_``), in layers without a selection too.

The race needs a gradient through a gather (an MoE layer above a trained one) of at least 32768 elements.
quick_config's tiny DeepSeek-V3 has one MoE layer (2 layers, the first dense), so no gradient ever went through a
gather, and its batch of 2 x 64 gathers at most 512 pairs x hidden 64 = 32768 elements, split over two groups: that
is why the older reproducibility test (tests/test_reliability.py) passed. Here: 3 layers (2 MoE), batch 4 x 64.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from esft_lightning.experts.split import apply_expert_config, is_trained_copy
from esft_lightning.models import build_tiny_model
from esft_lightning.selection.rules import ExpertConfig

from .test_cli import log_dirs, quick_config

STEPS = 6
TWO_THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
FIT = "from esft_lightning.cli import main; main()"


def config(root: Path) -> Path:
    """quick_config with 2 MoE layers (a gradient through the upper one's gathers) and batch 4 x 64 (256 tokens,
    1024 token-expert pairs a layer: the gathers' backward goes multi-threaded)."""
    path = quick_config(root, steps=STEPS)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["model_config"]["num_hidden_layers"] = 3
    cfg["data"]["batch_size"] = 4
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(root: Path, *extra: str, env: dict[str, str] | None = None) -> Path:
    """``esft fit`` in a fresh process (its own data cache; 2 threads unless ``env`` says otherwise)."""
    env = {**os.environ, **TWO_THREADS, "ESFT_CACHE_DIR": str(root / "cache"), **(env or {})}
    cmd = [sys.executable, "-c", FIT, "fit", "--config", str(config(root)), *extra]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return log_dirs(root)[-1]


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The adapter, the last checkpoint's trained expert copies and their AdamW state."""
    tensors = {f"adapter:{k}": v for k, v in load_file(run / "adapter/adapter.safetensors").items()}
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    tensors |= {f"ckpt:{k}": v for k, v in ckpt["state_dict"].items() if is_trained_copy(k)}
    for param, state in ckpt["optimizer_states"][0]["state"].items():
        tensors |= {f"adam:{param}.{k}": v for k, v in state.items() if k != "step"}
    return tensors


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(k.startswith("ckpt:") for k in a) and any(k.startswith("adam:") for k in a)
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, max |diff|: {differ}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One default fit with two threads, the reference the fits below must reproduce bit for bit."""
    return fit(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--data.num_workers", "2"], ["--trainer.deterministic", "true"]],
    ids=["default", "num_workers=2", "deterministic"],
)
def test_fits_with_two_threads_give_the_reference_adapter_and_checkpoint_bitwise(tmp_path, extra, uninterrupted):
    """Another process, the same config (data loading workers and torch's deterministic mode must not change a
    bit either)."""
    again = fit(tmp_path, *extra)
    assert (again / "expert_cfg.json").read_text() == (uninterrupted / "expert_cfg.json").read_text()
    assert_bitwise_equal(trained_tensors(uninterrupted), trained_tensors(again))


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL")
def test_mkl_strict_cnr_gives_the_same_weights_with_one_or_two_threads(tmp_path):
    """Different thread counts: MKL's GEMMs (grouped_mm's per-expert products among them) round differently with
    1 and 2 threads (without MKL_CBWR the fits below differ by ~5e-8), unless MKL_CBWR=AUTO,STRICT is set before
    torch loads; with it and the deterministic gathers, 1 and 2 threads agree bitwise for this model. (Not a
    general guarantee: PyTorch's own full reductions split over threads, e.g. a norm over millions of elements.)"""
    strict = {"MKL_CBWR": "AUTO,STRICT"}
    one = fit(tmp_path / "one", env={**strict, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    two = fit(tmp_path / "two", env=strict)
    assert_bitwise_equal(trained_tensors(one), trained_tensors(two))


def test_experts_gradients_are_bitwise_equal_across_backward_passes_with_two_threads():
    """In one process: before the fix the race showed up on nearly every backward, so repeats catch it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build_tiny_model("qwen3_moe", seed=0)  # hidden 64, 16 experts, top-4
        # Layer 1 without a selection: its frozen experts take our deterministic path too, not transformers' own.
        apply_expert_config(model, ExpertConfig(experts={0: [1, 5, 9]}))
        ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
        embeddings = model.get_input_embeddings()
        embeddings.weight.requires_grad_(True)  # gradients reach the input: through every layer's gathers
        grads = []
        for _ in range(6):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert "model.embed_tokens.weight" in grads[0] and any(".esft_" in n for n in grads[0])
        for other in grads[1:]:
            differ = [n for n in grads[0] if not torch.equal(grads[0][n], other[n])]
            assert not differ, differ
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_quickstart_fits_twice_to_bitwise_equal_adapters_with_two_threads(tmp_path):
    """The shipped quickstart (pretrained model, ESFT-Token, task eval, routing drift), 20 steps, twice."""
    runs = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        env = {**os.environ, **TWO_THREADS, "ESFT_CACHE_DIR": str(root / "cache")}
        quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
        cmd = [sys.executable, "-c", FIT, "fit", "--config", str(quickstart), "--trainer.max_steps", "20"]
        cmd += ["--trainer.default_root_dir", str(root / "run")]
        done = subprocess.run(cmd, cwd=quickstart.parents[1], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        runs.append(sorted((root / "run" / "logs").glob("version_*"))[-1])
    a, b = (load_file(run / "adapter/adapter.safetensors") for run in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    predictions = [
        [s["predictions"] for s in json.loads((run / "task_eval.json").read_text())["evaluations"][-1]["sets"].values()]
        for run in runs
    ]
    assert predictions[0] == predictions[1]


@pytest.mark.slow
def test_sigkill_and_resume_with_two_threads_equals_the_uninterrupted_run_bitwise(tmp_path, uninterrupted):
    """Killed after step 5 (last checkpoint: step 3), resumed with --ckpt_path last: the same bits as a run never
    killed, for the model whose gathers go multi-threaded."""
    root = tmp_path / "killed"
    env = {**os.environ, **TWO_THREADS, "ESFT_CACHE_DIR": str(root / "cache"), "ESFT_CRASH": "fit:5"}
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "tests.crash_fit", "fit", "--config", str(config(root)), "--trainer.max_steps", "6"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (done.stdout + done.stderr)[-3000:]
    resumed = fit(root, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert resumed == log_dirs(root)[0]  # continued in the killed run's version folder
    assert_bitwise_equal(trained_tensors(uninterrupted), trained_tensors(resumed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_experts_gradients_are_bitwise_equal_on_cuda_with_deterministic_algorithms():
    """On CUDA index_add_ / index_select's backward use atomics: reproducible with deterministic algorithms on."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic GEMMs
    torch.use_deterministic_algorithms(True)
    try:
        model = build_tiny_model("qwen3_moe", seed=0).cuda()
        apply_expert_config(model, ExpertConfig(experts={0: [1, 5, 9]}))
        ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
        grads = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert any(".esft_" in n for n in grads[0])
        assert all(torch.equal(grads[0][n], other[n]) for other in grads[1:] for n in grads[0])
    finally:
        torch.use_deterministic_algorithms(False)
