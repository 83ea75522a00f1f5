"""GPU: tokens/s and peak memory of ESFT-Token (fp32 trained experts) vs full fine-tuning (bf16) on one CUDA GPU,
and the memory plan (esft_lightning.planning.plan) of each next to torch.cuda.max_memory_allocated."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from esft_lightning.experts.split import apply_expert_config
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.routing.profile import profile_routing
from esft_lightning.selection.rules import ExpertConfig, select_experts


def build(args: argparse.Namespace, device: str = "cuda") -> torch.nn.Module:
    """The benchmark model in bf16 on ``device`` (``meta``: shapes only, for the plan)."""
    with torch.device("meta") if device == "meta" else contextlib.nullcontext():
        model = _build_tiny(args)
    return model.to(torch.bfloat16) if device == "meta" else model.to(device, torch.bfloat16)


def _build_tiny(args: argparse.Namespace) -> torch.nn.Module:
    return build_tiny_model(
        "deepseek_v3",
        vocab_size=32000,
        experts_implementation="grouped_mm",
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=args.experts,
        n_shared_experts=2,
        num_experts_per_tok=args.top_k,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=8192,
    )


def predicted_bytes(args: argparse.Namespace, config: ExpertConfig | None) -> int:
    """The plan's per-device total for this benchmark's step: ESFT with ``config`` (fp32 copies), or full
    fine-tuning in bf16 (every parameter trainable in the model's dtype, as ``run`` trains it) when None."""
    from esft_lightning.planning.plan import PlanRequest, plan_memory
    from esft_lightning.selection.rules import all_experts
    from esft_lightning.selection.spec import SelectionSpec

    model = build(args, "meta")
    if config is None:
        experts = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
        config = all_experts(experts, shared_experts=True, non_expert_modules=True)
        spec = SelectionSpec(trainable_dtype=None)
    else:
        spec = SelectionSpec(trainable_dtype="float32")
    request = PlanRequest(
        world_size=1, strategy="single", micro_batch=args.batch, seq_length=args.seq, spec=spec, expert_config=config
    )
    return plan_memory(model, request).per_rank.total_bytes


def run(args: argparse.Namespace, variant: str) -> dict[str, float]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(args)
    batches = [torch.randint(0, 32000, (args.batch, args.seq), device="cuda") for _ in range(4)]
    config = None
    if variant == "esft":
        profile = profile_routing(
            model, [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches], progress=False
        )
        # The default recipe: fp32 trainable copies of the selected experts of a bf16 model (trainable_dtype auto).
        config = select_experts(profile.token_scores, top_p=0.2)
        apply_expert_config(model, config, trainable_dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        ids = batches[step % len(batches)]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "tokens_per_sec": args.steps * args.batch * args.seq / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_share": sum(p.numel() for p in params) / sum(p.numel() for p in model.parameters()),
        "planned_gib": predicted_bytes(args, config) / 2**30,
    }
    del model, opt
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here (CPU ratios: benchmarks/step_time.py).")
        sys.exit(0)
    print(
        f"device: {torch.cuda.get_device_name()}, bf16, grouped_mm experts; DeepSeek-V2-Lite-like layers x{args.layers}"
    )
    results = {v: run(args, v) for v in ("fft", "esft")}
    for variant, r in results.items():
        print(
            f"{variant:5s} tokens/s {r['tokens_per_sec']:10.0f}  peak {r['peak_gib']:6.2f} GiB  "
            f"trainable {r['trainable_share']:.2%}  planned {r['planned_gib']:6.2f} GiB "
            f"(plan / max_memory_allocated x{r['planned_gib'] / r['peak_gib']:.2f})"
        )
    print(
        f"ESFT / FFT: tokens/s x{results['esft']['tokens_per_sec'] / results['fft']['tokens_per_sec']:.2f}, "
        f"peak memory x{results['esft']['peak_gib'] / results['fft']['peak_gib']:.2f}"
    )


if __name__ == "__main__":
    main()
