"""Frozen routed experts kept in block FP8 vs in bf16: bytes, peak memory, step time and logits, side by side.

    python benchmarks/fp8_experts.py                 # DeepSeek-V2-Lite and DeepSeek-V3 layer shapes, CPU
    python benchmarks/fp8_experts.py --tokens 128    # quicker

Each model is one dense and ``--moe-layers`` (3) MoE decoder layers with the real hidden / expert widths
(V2-Lite: hidden 2048, 64 experts of 1408, top-6; V3: hidden 7168, experts of 2048, top-8, 16 of its 256 experts so
that a CPU holds it), bf16 weights, ESFT selecting 3 experts per layer, fp32 trainable copies, AdamW. ``bf16`` keeps
the frozen experts in bf16, ``fp8`` in block FP8 (``ExpertSelectionCallback(frozen_experts_dtype=float8)``). Both
start from the same FP8 values (the bf16 model is the FP8 one dequantized, as a model loaded from DeepSeek-V3's FP8
files is), so their logits must agree up to bf16 rounding. Each (shape, storage) runs in its own process: its
memory above the process's baseline is its own. Targets (issue 24): frozen-expert bytes and peak memory <= 0.55x
bf16; step time <= 1.3x on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "DeepSeek-V2-Lite": dict(
        family="deepseek_v2", hidden_size=2048, moe_intermediate_size=1408, intermediate_size=4096,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
    ),
    "DeepSeek-V3 (16 experts)": dict(
        family="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, intermediate_size=4096,
        n_routed_experts=16, num_experts_per_tok=8, n_shared_experts=1, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_group=1, topk_group=1,
    ),
}  # fmt: skip


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_run(shape: str, storage: str, tokens: int, steps: int, moe_layers: int) -> dict:
    """Build, (quantize), select, train ``steps`` steps; bytes, peak memory above the start, step times, logits."""
    import torch

    from esft_lightning.experts.split import apply_expert_config
    from esft_lightning.experts.state import expert_param_names
    from esft_lightning.models import build_tiny_model, find_moe_layers
    from esft_lightning.selection.rules import ExpertConfig
    from esft_lightning.weights.fp8_blocks import FP8, dequantize_experts, quantize_experts

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    baseline = current_rss()
    config = dict(SHAPES[shape])
    family = config.pop("family")
    model = build_tiny_model(
        family, num_hidden_layers=1 + moe_layers, first_k_dense_replace=1, vocab_size=4096, **config
    ).to(torch.bfloat16)
    moe = find_moe_layers(model)
    with torch.no_grad():  # both storages start from the same FP8 values (a checkpoint as DeepSeek-V3 ships)
        for layer in moe:
            for name in expert_param_names(layer.experts)[:2]:
                weight = getattr(layer.experts, name)
                weight.copy_(dequantize_experts(*quantize_experts(weight), torch.bfloat16))
    selection = ExpertConfig({layer.index: [0, 1, 2] for layer in moe})
    apply_expert_config(model, selection, torch.float32, FP8 if storage == "fp8" else None)
    frozen = sum(
        p.numel() * p.element_size()
        for layer in moe
        for n, p in layer.experts.named_parameters()
        if not n.startswith("esft_")
    )
    ids = torch.randint(0, 4096, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    from esft_lightning.weights.weight_files import return_freed_memory

    return_freed_memory()  # the bf16 build the fp8 run quantized from is freed: give its pages back first
    held = current_rss() - baseline  # the model as training holds it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM): the fp8 run built its model in bf16 first
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, AdamW state)
        began = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return {
        "frozen_bytes": frozen,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "held": held,
        "training_peak": peak_rss() - baseline,
        "step_s": sorted(times[1:])[len(times[1:]) // 2],
        "logits": logits.flatten()[:: max(1, logits.numel() // 200_000)].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--moe-layers", type=int, default=3, help="MoE decoder layers after the dense one")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "STORAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], args.one[1], args.tokens, args.steps, args.moe_layers)))
        return
    import torch

    print(
        f"torch {torch.__version__}, 1 dense + {args.moe_layers} MoE layers, {args.tokens} tokens per step, "
        f"median of {args.steps} steps after 1 warm-up"
    )
    print("| shape | frozen experts bf16 -> fp8 (ratio) | model held (ratio) | peak while training (ratio) | "
          "step s (ratio) | max abs logit diff |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        runs = {}
        for storage in ("bf16", "fp8"):
            cmd = [sys.executable, __file__, "--one", shape, storage, "--tokens", str(args.tokens)]
            cmd += ["--steps", str(args.steps), "--moe-layers", str(args.moe_layers)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[storage] = json.loads(done.stdout.strip().splitlines()[-1])
        a, b = runs["bf16"], runs["fp8"]
        diff = max(abs(x - y) for x, y in zip(a["logits"], b["logits"], strict=True))
        print(
            f"| {shape} | {_pair(a, b, 'frozen_bytes')} | {_pair(a, b, 'held')} | {_pair(a, b, 'training_peak')} | "
            f"{a['step_s']:.2f} -> {b['step_s']:.2f} s ({b['step_s'] / a['step_s']:.2f}x) | {diff:.3g} |"
        )


def _pair(a: dict, b: dict, key: str) -> str:
    gib = 2**30
    return f"{a[key] / gib:.2f} -> {b[key] / gib:.2f} GiB ({b[key] / a[key]:.2f}x)"


if __name__ == "__main__":
    main()
