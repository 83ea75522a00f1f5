"""Host memory per rank when an FSDP2 fit loads a model directory (peak above the process baseline).

    python benchmarks/host_memory.py                    # 0.87 GiB, 16 MoE layers of 64 experts; 2 then 4 ranks
    python benchmarks/host_memory.py --ranks 2 --experts 16 --hidden 784   # 0.96 GiB, 16 layers of 16 experts
    python benchmarks/host_memory.py --ranks 2 --fp8    # the same model stored in block FP8, as DeepSeek-V3 ships
    python benchmarks/host_memory.py --ranks 2 --trace  # also each rank's memory around every start-up phase

Targets (issues 16 and 24): with 2 ranks every rank <= 0.65x the model's bytes from start-up to the first training
step, on both models and from FP8 files too; with 4 ranks every rank <= 0.5x (every rank reads only its own shards
from the safetensors files, a few rows at a time; rank 0 profiles with the layers streamed from them). Each rank is
this script re-launched by Lightning in "rank" mode: it records its resident memory after the imports (the
baseline), runs `esft fit`, and prints its peak resident (RSS) and private (anonymous) memory above that baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RANK_MODE = "--rank-mode"


def rank_main(argv: list[str]) -> None:
    """One rank: baseline after imports, then `esft fit`, then the peak above the baseline."""
    import atexit
    import threading
    import time

    import lightning  # noqa: F401  (imports are part of the baseline, not of the model)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from esft_lightning.cli import main
    from esft_lightning.distributed.host_memory import current_host_bytes, peak_host_bytes

    def status() -> dict[str, int]:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile", "RssShmem")))
        return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}

    baseline, base = current_host_bytes(), status()
    rank = os.environ.get("LOCAL_RANK", "0")
    peaks = dict(base)

    def sample() -> None:  # private (anonymous) memory has no kernel high-water mark: sample it
        while True:
            for key, value in status().items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()

    def report(when: str) -> None:
        peak, above = peak_host_bytes(), {k: peaks[k] - base[k] for k in base}
        print(
            f"HOSTMEM {when} rank {rank} rss {peak - baseline} anon {above['RssAnon']} "
            f"(file-backed {above['RssFile']}, shared {above['RssShmem']})",
            flush=True,
        )

    # Loading = everything before the first training step (load, profile, select, shard, broadcast).
    from esft_lightning.module import ESFTModule

    fit_start = ESFTModule.on_fit_start

    def on_fit_start(self: ESFTModule) -> None:
        report("loading")
        if os.environ.get("ESFT_HOSTMEM_TRACE"):
            rss, anon = current_host_bytes() - baseline, status()["RssAnon"] - base["RssAnon"]
            print(f"HOSTTRACE rank {rank} at on_fit_start: rss {rss / 2**20:.0f} MiB anon {anon / 2**20:.0f} MiB")
        fit_start(self)

    ESFTModule.on_fit_start = on_fit_start
    if os.environ.get("ESFT_HOSTMEM_TRACE"):
        _trace_phases(lambda: (current_host_bytes() - baseline, status()["RssAnon"] - base["RssAnon"]))
    atexit.register(report, "fit")
    main(argv)


def _trace_phases(now: Callable[[], tuple[int, int]]) -> None:
    """``--trace``: print this rank's resident and private memory above the baseline around each start-up phase,
    and the peak within it (the phases: build on meta, profiling and selection, sharding, reading the files)."""
    import functools

    import esft_lightning.callbacks.expert_selection as selection_callback
    import esft_lightning.distributed.fsdp as fsdp
    import esft_lightning.module as module
    from esft_lightning.distributed.host_memory import peak_host_bytes

    rank = os.environ.get("LOCAL_RANK", "0")

    def traced(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            rss, anon = now()
            print(
                f"HOSTTRACE rank {rank} before {name}: rss {rss / 2**20:.0f} MiB anon {anon / 2**20:.0f} MiB",
                flush=True,
            )
            out = original(*args, **kwargs)
            rss, anon = now()
            print(
                f"HOSTTRACE rank {rank} after {name}: rss {rss / 2**20:.0f} MiB anon {anon / 2**20:.0f} MiB "
                f"(process peak so far {peak_host_bytes() / 2**20:.0f} MiB)",
                flush=True,
            )
            return out

        setattr(owner, name, wrapper)

    traced(module.ESFTModule, "build_model")
    traced(module, "prepare_for_sharding")
    traced(selection_callback, "decide")
    traced(module, "shard_model")
    traced(fsdp, "fill_from_files")


def save_model(path: Path, hidden: int, experts: int, layers: int) -> int:
    import torch

    from esft_lightning.data.tokenizer import byte_tokenizer
    from esft_lightning.models import build_tiny_model

    model = build_tiny_model(
        "deepseek_v3",
        vocab_size=len(byte_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers + 1,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
    )
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.float32)


def write_config(tmp: Path, model_dir: Path) -> Path:
    """The quickstart config for 2 steps of the saved model, every output under ``tmp``."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    root = str(tmp / "run")
    cfg["trainer"].update(
        max_steps=2,
        limit_val_batches=0,
        enable_progress_bar=False,
        default_root_dir=root,
        callbacks=[cfg["trainer"]["callbacks"][0]],
    )
    cfg["trainer"]["enable_checkpointing"] = False
    if isinstance(cfg["trainer"].get("logger"), dict):
        cfg["trainer"]["logger"].setdefault("init_args", {})["save_dir"] = root
    cfg["model"] = {"model": str(model_dir)}
    cfg["data"].update(seq_length=64, batch_size=2)
    for source in cfg["data"]["task"] + cfg["data"]["general"]:
        source["path"] = str(REPO / source["path"])
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TARGETS = {2: 0.65, 4: 0.5}  # every rank's loading peak, as a multiple of the model's bytes


def run_fit(tmp: Path, ranks: int, trace: bool = False) -> str:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        RANK_MODE,
        "fit",
        "--config",
        str(write_config(tmp, tmp / "model")),
        "--config",
        str(REPO / "configs/fsdp.yaml"),
        "--trainer.accelerator=cpu",
        f"--trainer.devices={ranks}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ESFT_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    if trace:
        env["ESFT_HOSTMEM_TRACE"] = "1"
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        sys.exit(out[-12000:])
    if trace:
        print("\n".join(line for line in out.splitlines() if line.startswith("HOSTTRACE")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=16, help="MoE layers (one dense layer comes first)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--fp8", action="store_true", help="the directory in block FP8, as DeepSeek-V3 ships")
    parser.add_argument("--trace", action="store_true", help="also print each rank's memory around each phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_bytes = save_model(tmp / "model", args.hidden, args.experts, args.layers)
        if args.fp8:  # ranks read FP8 rows and dequantize them; the ratios stay against the loaded model's bytes
            from esft_lightning.weights.quantized_export import write_fp8_checkpoint

            write_fp8_checkpoint(tmp / "model", tmp / "fp8")
            shutil.rmtree(tmp / "model")
            (tmp / "fp8").rename(tmp / "model")
        outputs = {ranks: run_fit(tmp, ranks, args.trace) for ranks in args.ranks}
    files = "block-FP8 files" if args.fp8 else "files in the model's dtype"
    print(
        f"model: {model_bytes / 2**30:.2f} GiB of parameters ({args.layers} MoE layers, {args.experts} experts, "
        f"hidden {args.hidden}); {files}; FSDP2, gloo, CPU"
    )
    print("peak host memory above the process baseline, as a multiple of the model's bytes:")
    print("| ranks | phase | rank | resident (RSS) | private (anonymous) | file-backed | shared |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    verdicts = []
    for ranks, out in outputs.items():
        peaks: dict[str, list[tuple[float, float]]] = {}
        pattern = r"HOSTMEM (\w+) rank (\d+) rss (\d+) anon (\d+) \(file-backed (\d+), shared (\d+)\)"
        for phase, rank, *sizes in re.findall(pattern, out):
            ratios = [int(size) / model_bytes for size in sizes]
            peaks.setdefault(phase, []).append(tuple(ratios))
            print(f"| {ranks} | {phase} | {rank} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
        target = TARGETS.get(ranks)
        for column, name in ((0, "RSS"), (1, "private")):
            worst = max((r[column] for r in peaks.get("loading", [])), default=float("nan"))
            met = target is not None and len(peaks.get("loading", [])) == ranks and worst <= target
            goal = f"every rank <= {target}x" if target else "no target"
            verdicts.append(
                f"{ranks} ranks, loading, {name}: worst rank {worst:.2f}x ({goal}): "
                f"{'met' if met else 'NOT met' if target else '-'}"
            )
    print("('fit' adds training: the per-layer FSDP all-gathers, gradients and AdamW state)")
    print("\n".join(verdicts))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == RANK_MODE:
        rank_main(sys.argv[2:])
    else:
        main()
