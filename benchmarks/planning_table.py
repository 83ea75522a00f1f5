"""Writes docs/planning.md's per-GPU memory table (and the README's excerpt) from `esft plan` on configs/models/.

    python benchmarks/planning_table.py          # rewrite the generated sections
    python benchmarks/planning_table.py --check  # exit 1 when a committed section differs (tests/test_planning.py)

Nothing is loaded or run: every model is built on the meta device from its published config.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/planning_table.py` from anywhere, nothing installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from esft_lightning.planning.plan import DEVICES, GiB, PlanRequest, build_meta_model, plan_memory, usable  # noqa: E402

MODELS = ("DeepSeek-V2-Lite", "Qwen3-30B-A3B", "GPT-OSS-20B", "GPT-OSS-120B", "Qwen3-235B-A22B", "DeepSeek-V3")
WORLDS = (1, 8, 16)
GPUS = ("H100-80GB", "H200-141GB")
SEQ, MICRO = 4096, 1
ASSUMPTIONS = (
    f"FSDP2 over every GPU (16 = 2 nodes x 8), micro-batch {MICRO} x {SEQ} tokens, activation checkpointing on, "
    "bf16 weights and bf16 compute (`fsdp_bf16`), AdamW; ESFT: ESFT-Token top_p 0.2 without an expert config, "
    "i.e. the bound ceil(0.2 x E) experts per MoE layer, trained as fp32 copies (`trainable_dtype: auto`); full "
    "fine-tuning: every parameter trained in fp32. A GPU fits when the plan's total is within "
    f"{usable(100) / 100:.0%} of its memory."
)
START, END = "<!-- planning-table:start -->", "<!-- planning-table:end -->"
README_START, README_END = "<!-- planning-excerpt:start -->", "<!-- planning-excerpt:end -->"
EP_START, EP_END = "<!-- planning-ep:start -->", "<!-- planning-ep:end -->"
EP_CASES = (("DeepSeek-V2-Lite", (8, 16)), ("DeepSeek-V3", (16, 64)))
EP_ASSUMPTIONS = (
    "As above, with `expert_parallel_size` = every GPU (E/N whole routed experts per GPU, the rest FSDP2 over all "
    "GPUs). ESFT under EP depends on where the selected experts fall: *bound* is the worst owner (the top_p 0.2 "
    "bound's ceil(0.2 x E) experts per layer, as many of them on one GPU as it owns: min(ceil(0.2 x E), E/N)); "
    "*spread* is the same number of experts spread evenly over the owners (an exact expert config)."
)


def rows() -> list[dict]:
    """One row per model and GPU count: per-GPU GiB of ESFT and full fine-tuning, and the floor terms."""
    out = []
    for name in MODELS:
        base = build_meta_model(model=str(REPO / "configs/models" / name), dtype="bfloat16")
        for world in WORLDS:
            request = PlanRequest(
                world_size=world, strategy="fsdp2", micro_batch=MICRO, seq_length=SEQ, activation_checkpointing=True,
                compute_dtype=torch.bfloat16,
            )  # fmt: skip
            plan = plan_memory(copy.deepcopy(base), request)
            esft, fft = plan.scenarios["esft_fsdp2"], plan.scenarios["fft_fsdp2"]
            out.append(
                {
                    "model": name,
                    "params": plan.total_params,
                    "world": world,
                    "esft": esft.total_bytes,
                    "fft": fft.total_bytes,
                    "esft_comm": esft.comm_bytes,
                    "trainable": plan.selection["trainable_params"],
                    "profiling": plan.profiling_bytes,
                }  # fmt: skip
            )
    return out


def ep_rows() -> list[dict]:
    """Per-GPU GiB under expert parallelism (N = all GPUs): ESFT bound / spread selection, FSDP2 alongside."""
    from esft_lightning.models import find_moe_layers
    from esft_lightning.selection.rules import ExpertConfig

    out = []
    for name, worlds in EP_CASES:
        base = build_meta_model(model=str(REPO / "configs/models" / name), dtype="bfloat16")
        spread = {}
        for layer in find_moe_layers(base):
            k = math.ceil(0.2 * layer.num_experts)
            spread[layer.index] = [round(i * layer.num_experts / k) for i in range(k)]
        for world in worlds:
            request = PlanRequest(
                world_size=world, strategy="fsdp2", micro_batch=MICRO, seq_length=SEQ, activation_checkpointing=True,
                compute_dtype=torch.bfloat16, expert_parallel_size=world,
            )  # fmt: skip
            bound = plan_memory(copy.deepcopy(base), request)
            even = plan_memory(copy.deepcopy(base), dataclasses.replace(request, expert_config=ExpertConfig(spread)))
            out.append(
                {
                    "model": name,
                    "world": world,
                    "fsdp2": bound.scenarios["esft_fsdp2"].total_bytes,
                    "bound": bound.per_rank.total_bytes,
                    "spread": even.per_rank.total_bytes,
                    "fft": bound.scenarios["fft_ep"].total_bytes,
                    "fsdp2_comm": bound.scenarios["esft_fsdp2"].comm_bytes,
                    "ep_comm": even.per_rank.comm_bytes,
                }
            )
    return out


def ep_table(data: list[dict]) -> str:
    fits = " | ".join(f"fits {g}: FSDP2 / EP bound / EP spread" for g in GPUS)
    lines = [
        "| model | GPUs | ESFT FSDP2 GiB/GPU | ESFT EP bound | ESFT EP spread | full FT EP | buffers FSDP2 / EP | "
        + fits
        + " |",
        "| --- " * (7 + len(GPUS)) + "|",
    ]
    for r in data:
        fits = " | ".join(" / ".join(_verdict(r[k], g) for k in ("fsdp2", "bound", "spread")) for g in GPUS)
        lines.append(
            f"| {r['model']} | {r['world']} | {r['fsdp2'] / GiB:.1f} | {r['bound'] / GiB:.1f} | "
            f"{r['spread'] / GiB:.1f} | {r['fft'] / GiB:.1f} | {r['fsdp2_comm'] / GiB:.1f} / {r['ep_comm'] / GiB:.1f} "
            f"| {fits} |"
        )
    return "\n".join(lines)


def _verdict(need: int, gpu: str) -> str:
    return "yes" if need <= usable(DEVICES[gpu]) else "no"


def table(data: list[dict]) -> str:
    header = "| model | params | GPUs | ESFT GiB/GPU | full FT GiB/GPU | " + " | ".join(
        f"fits {g}: ESFT / FFT" for g in GPUS
    )
    lines = [header + " |", "| --- " * (5 + len(GPUS)) + "|"]
    for r in data:
        fits = " | ".join(f"{_verdict(r['esft'], g)} / {_verdict(r['fft'], g)}" for g in GPUS)
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.1f} B | {r['world']} | {r['esft'] / GiB:.1f} | "
            f"{r['fft'] / GiB:.1f} | {fits} |"
        )
    return "\n".join(lines)


def section(data: list[dict]) -> str:
    return f"{START}\n{ASSUMPTIONS}\n\n{table(data)}\n{END}"


def ep_section(data: list[dict]) -> str:
    return f"{EP_START}\n{EP_ASSUMPTIONS}\n\n{ep_table(data)}\n{EP_END}"


def excerpt(data: list[dict]) -> str:
    lite = [r for r in data if r["model"] == "DeepSeek-V2-Lite"]
    return f"{README_START}\n{table(lite)}\n{README_END}"


def _replace(text: str, start: str, end: str, new: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"markers {start} ... {end} not found")
    return pattern.sub(lambda _: new, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args()
    data = rows()
    ep = ep_rows()
    targets = {
        REPO / "docs/planning.md": [(START, END, section(data)), (EP_START, EP_END, ep_section(ep))],
        REPO / "README.md": [(README_START, README_END, excerpt(data))],
    }
    stale = []
    for path, sections in targets.items():
        text = path.read_text()
        updated = text
        for start, end, new in sections:
            updated = _replace(updated, start, end, new)
        if updated != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(updated)
    if args.check and stale:
        print(f"generated sections differ in {', '.join(stale)}: run python benchmarks/planning_table.py")
        sys.exit(1)
    print(table(data))
    print(ep_table(ep))


if __name__ == "__main__":
    main()
