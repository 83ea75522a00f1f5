"""DeepSeek-V3 ESFT under expert parallelism on H200s: frozen experts in bf16 vs kept 8-bit, per GPU count.

    python benchmarks/planning_fp8.py

An exact selection of 8 experts in every MoE layer, spread over the owners (experts 0, 32, ..., 224: one per GPU on 8
GPUs), micro-batch 1 x 4096 with activation checkpointing, bf16 weights, fp32 trainable copies and AdamW state,
`expert_parallel_size` = the GPU count. Prints the planner's per-GPU bytes (`esft_lightning.planning.plan`, from
config.json alone) and the levers that would close a gap on the smallest count that misses.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esft_lightning.planning.plan import (  # noqa: E402
    DEVICES,
    HOST_OFFLOAD_ADAMW,
    GiB,
    PlanRequest,
    build_meta_model,
    plan_memory,
    usable,
)
from esft_lightning.selection.rules import ExpertConfig  # noqa: E402
from esft_lightning.selection.spec import SelectionSpec  # noqa: E402


def main() -> None:
    device = DEVICES["H200-141GB"]
    config = ExpertConfig({layer: [e * 32 for e in range(8)] for layer in range(3, 61)})
    print(f"H200-141GB: {usable(device) / GiB:.1f} GiB usable per GPU")
    print(
        "| GPUs | frozen experts | weights | trainable copies | gradients | AdamW | activations | buffers | total "
        "| fits |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    footer: list[str] = []
    for gpus in (8, 16, 32, 64):
        for frozen in ("model", "float8"):
            request = PlanRequest(
                world_size=gpus, strategy="fsdp2", micro_batch=1, seq_length=4096, activation_checkpointing=True,
                spec=SelectionSpec(frozen_experts_dtype=frozen), expert_config=config, expert_parallel_size=gpus,
                devices_per_node=8, device_memory=device,
            )  # fmt: skip
            plan = plan_memory(
                build_meta_model(model=str(REPO / "configs/models/DeepSeek-V3"), dtype="bfloat16"), request
            )
            r = plan.per_rank
            cells = (r.params_bytes, r.trainable_bytes, r.grads_bytes, r.optimizer_bytes, r.activations_bytes)
            cells += (r.comm_bytes, r.total_bytes)
            name = "bf16" if frozen == "model" else "fp8"
            print(
                f"| {gpus} | {name} | "
                + " | ".join(f"{c / GiB:.1f}" for c in cells)
                + f" | {'yes' if plan.fits else 'no'} |"
            )
            if gpus == 8 and frozen == "float8":
                short = r.total_bytes - usable(device)
                levers = {
                    "8-bit AdamW state (2 bytes per trained parameter instead of 8; not built)": 0.75
                    * r.optimizer_bytes,
                    "bf16 gradients (2 bytes instead of 4; not built)": 0.5 * r.grads_bytes,
                }
                lines = [f"8 GPUs, fp8 frozen experts: {short / GiB:.1f} GiB over; levers (GiB saved per GPU):"]
                lines += [
                    f"  {k}: {v / GiB:.1f} -> {'fits' if v >= short else 'still short'}" for k, v in levers.items()
                ]
                on_host = plan_memory(
                    build_meta_model(model=str(REPO / "configs/models/DeepSeek-V3"), dtype="bfloat16"),
                    replace(request, optimizer_on_host=True),
                )
                saved = r.total_bytes - on_host.per_rank.total_bytes
                lines.append(
                    f"  AdamW state in host memory ({HOST_OFFLOAD_ADAMW}, built): {saved / GiB:.1f} "
                    f"(its {r.optimizer_bytes / GiB:.1f} less the {on_host.per_rank.optimizer_bytes / GiB:.1f} a step "
                    f"brings over) -> {on_host.per_rank.total_bytes / GiB:.1f} GiB per GPU: "
                    f"{'fits' if on_host.fits else 'still short'}; host memory "
                    f"{on_host.per_rank.host_optimizer_bytes / GiB:.1f} GiB per GPU"
                )
                footer = lines

    print("\n".join(footer))


if __name__ == "__main__":
    main()
