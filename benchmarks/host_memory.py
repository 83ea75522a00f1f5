"""Host memory per rank when a 2-process FSDP2 fit loads a model directory (peak above the process baseline).

    python benchmarks/host_memory.py                 # saves a ~0.8 GiB model, runs a 2-rank gloo fit on CPU
    python benchmarks/host_memory.py --hidden 512    # smaller model, quicker

Target (docs/design.md): one rank <= 0.75x the model's bytes, the other <= 2.0x. Each rank is this script
re-launched by Lightning in "rank" mode: it records its resident memory after the imports (the baseline),
runs `esft fit`, and prints its peak resident memory above that baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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
    from esft_lightning.distributed import current_host_bytes, peak_host_bytes

    def anon() -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    baseline, baseline_anon = current_host_bytes(), anon()
    rank = os.environ.get("LOCAL_RANK", "0")
    peak_anon = [baseline_anon]

    def sample() -> None:  # private (anonymous) memory has no kernel high-water mark: sample it
        while True:
            peak_anon[0] = max(peak_anon[0], anon())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()

    def report(when: str) -> None:
        peak = peak_host_bytes()
        print(f"HOSTMEM {when} rank {rank} rss {peak - baseline} anon {peak_anon[0] - baseline_anon}", flush=True)

    # Loading = everything before the first training step (load, profile, select, shard, broadcast).
    from esft_lightning.module import ESFTModule

    fit_start = ESFTModule.on_fit_start

    def on_fit_start(self: ESFTModule) -> None:
        report("loading")
        fit_start(self)

    ESFTModule.on_fit_start = on_fit_start
    atexit.register(report, "fit")
    main(argv)


def save_model(path: Path, hidden: int, experts: int, layers: int) -> int:
    import torch

    from esft_lightning.models import build_tiny_model
    from esft_lightning.tokenizer import byte_tokenizer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="MoE layers (one dense layer comes first)")
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_bytes = save_model(tmp / "model", args.hidden, args.experts, args.layers)
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
            "--trainer.devices=2",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "ESFT_CACHE_DIR": str(tmp / "cache")}
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        out = done.stdout + done.stderr
        if done.returncode != 0:
            sys.exit(out[-12000:])
    found = re.findall(r"HOSTMEM (\w+) rank (\d+) rss (\d+) anon (\d+)", out)
    print(f"model: {model_bytes / 2**30:.2f} GiB of parameters ({args.layers} MoE layers); 2 ranks, FSDP2, gloo, CPU")
    print("peak host memory above the process baseline, as a multiple of the model's bytes:")
    print("| phase | rank | resident (RSS) | private (anonymous) |")
    print("| --- | --- | --- | --- |")
    peaks: dict[str, list[tuple[float, float]]] = {}
    for phase, rank, total, private in found:
        ratios = (int(total) / model_bytes, int(private) / model_bytes)
        peaks.setdefault(phase, []).append(ratios)
        print(f"| {phase} | {rank} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")
    print("(RSS counts the checkpoint's page-cache pages that transformers' safetensors loader keeps mapped;")
    print(" 'fit' adds training, whose per-layer FSDP all-gathers are large in a model of few layers)")
    for column, name in ((0, "RSS"), (1, "private")):
        ratios = sorted(r[column] for r in peaks.get("loading", []))
        ok = len(ratios) == 2 and ratios[0] <= 0.75 and ratios[1] <= 2.0
        print(f"loading target on {name} (one rank <= 0.75x, the other <= 2.0x): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == RANK_MODE:
        rank_main(sys.argv[2:])
    else:
        main()
