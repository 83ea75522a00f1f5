"""Training step time, trainable params, optimizer state and saved-for-backward bytes: ESFT vs baselines.

Per model (DeepSeek-V3-style and Qwen3-MoE-style by default; also GPT-OSS-style, with biased, transposed,
interleaved experts, and Qwen3-Next-style, a linear-attention hybrid), one forward + backward + AdamW step
(wd 0.1) of:

  esft      ESFT-Token p=0.2 (profiled on a few random batches), applied with apply_expert_config
  fft       full fine-tuning (every parameter trainable)
  gradmask  what other tools do: the fused expert tensors trainable, tensor hooks zero the gradients of
            the non-selected experts' slices (same selection as esft; everything else frozen as in esft)
  lora      LoRA (r=8) on the fused expert tensors through PEFT ``target_parameters`` (if supported)
  floor     apply_expert_config with a single expert of a single layer trainable

Repeats are interleaved (A, B, C, ... rotated each round) and medians reported.
Run from the repo root: ``python benchmarks/step_time.py``.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from common import (
    MODEL_CONFIGS,
    VOCAB_SIZE,
    expert_lora_targets,
    human_bytes,
    interleaved_times,
    load_line,
    machine_line,
    median,
    print_table,
    random_batches,
    setup,
    spread,
    verdict,
)
from torch import nn

from esft_lightning.experts.split import apply_expert_config
from esft_lightning.experts.state import expert_param_names
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.routing.profile import profile_routing
from esft_lightning.selection.rules import ExpertConfig, select_experts

_SIZES = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
STEP_MODELS: dict[str, tuple[str, dict]] = {
    **MODEL_CONFIGS,
    "gpt_oss": (
        "gpt_oss",
        dict(
            **_SIZES,
            intermediate_size=128,
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            num_local_experts=32,
            num_experts_per_tok=4,
        ),
    ),
    "qwen3_next": (
        "qwen3_next",
        dict(
            **_SIZES,
            intermediate_size=512,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
            num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            num_experts=32,
            num_experts_per_tok=4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
        ),
    ),
}
"""The benchmark models: common.py's, plus GPT-OSS and a hybrid (3 linear-attention layers : 1 attention)."""


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A random MoE causal LM of the benchmark size (``name`` is a key of STEP_MODELS)."""
    family, config = STEP_MODELS[name]
    model = build_tiny_model(family, vocab_size=VOCAB_SIZE, seed=seed, **config)
    model.train()
    return model


@dataclass
class Variant:
    name: str
    model: nn.Module
    step: Callable[[], None] | None = None
    optimizer: torch.optim.Optimizer | None = None
    note: str = ""
    hooks: list = field(default_factory=list)


def make_step(
    model: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    cycle = itertools.cycle(batches)

    def step() -> None:
        b = next(cycle)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def trainable(model: nn.Module) -> tuple[int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of AdamW's moment tensors (exp_avg, exp_avg_sq) actually held in optimizer.state."""
    total = 0
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def saved_for_backward_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward, parameters (and views of them)
    excluded, deduplicated by storage."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in param_storages and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
    total = sum(seen.values())
    del out
    return total


def frozen_expert_snapshot(model: nn.Module, selection: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """Copies of the non-selected experts' rows of every fused expert tensor."""
    snap = {}
    for layer in find_moe_layers(model):
        keep = [e for e in range(layer.num_experts) if e not in set(selection.get(layer.index, []))]
        for name in expert_param_names(layer.experts):
            snap[f"{layer.index}.{name}"] = getattr(layer.experts, name).detach()[keep].clone()
    return snap


def frozen_expert_drift(model: nn.Module, selection: dict[int, list[int]], snap: dict[str, torch.Tensor]) -> float:
    now = frozen_expert_snapshot(model, selection)
    return max(float((now[k] - snap[k]).abs().max()) for k in snap)


def add_gradient_masks(model: nn.Module, selection: dict[int, list[int]]) -> list:
    """Other tools' approach: fused expert tensors trainable, hooks zero the non-selected experts' grads."""
    model.requires_grad_(False)
    handles = []
    for layer in find_moe_layers(model):
        ids = selection.get(layer.index, [])
        if not ids:
            continue
        for name in expert_param_names(layer.experts):
            p = getattr(layer.experts, name)
            mask = torch.zeros(layer.num_experts, *[1] * (p.dim() - 1))
            mask[ids] = 1.0
            p.requires_grad_(True)
            handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    return handles


def add_lora(model: nn.Module, rank: int) -> tuple[nn.Module, str]:
    from peft import LoraConfig, get_peft_model

    targets = expert_lora_targets(model)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=targets)
    return get_peft_model(model, config), f"PEFT LoRA r={rank} on {', '.join(targets)} of every MoE layer"


def bench_model(name: str, args: argparse.Namespace) -> dict[str, float]:
    print(f"\n## {name}: {STEP_MODELS[name][1]}")
    print(
        f"batch {args.batch_size} x {args.seq_length} tokens, AdamW lr 1e-5 wd 0.1, "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up step(s)\n"
    )
    batches = random_batches(args.num_batches, args.batch_size, args.seq_length, seed=1)

    # Selection: ESFT-Token p=0.2 on a few random batches (profiling is not timed here).
    esft_model = build_model(name)
    profile_data = random_batches(args.profile_batches, args.batch_size, args.seq_length, seed=2)
    profile = profile_routing(esft_model, profile_data, progress=False)
    config = select_experts(profile.token_scores, top_p=args.top_p)
    selection = {k: list(v) for k, v in config.experts.items()}
    total_experts = sum(layer.num_experts for layer in find_moe_layers(esft_model))
    print(
        f"ESFT-Token p={args.top_p}: {config.num_selected} of {total_experts} routed experts selected "
        f"(per layer: {', '.join(f'{k}: {len(v)}' for k, v in sorted(selection.items()))}), "
        f"profiled {profile.num_tokens} tokens"
    )

    variants: dict[str, Variant] = {}
    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    esft_snap = frozen_expert_snapshot(esft_model, selection)
    apply_expert_config(esft_model, config)
    variants["esft"] = Variant("esft", esft_model, note="ESFT-Token: split trainable esft_* tensors")
    snapshots["esft"] = esft_snap

    fft = build_model(name)
    fft.requires_grad_(True)
    variants["fft"] = Variant("fft", fft, note="every parameter trainable")

    masked = build_model(name)
    snapshots["gradmask"] = frozen_expert_snapshot(masked, selection)
    handles = add_gradient_masks(masked, selection)
    variants["gradmask"] = Variant(
        "gradmask", masked, note="fused experts trainable + grad-zeroing hooks", hooks=handles
    )

    if not args.no_lora:
        try:
            lora, note = add_lora(build_model(name), args.lora_rank)
            variants["lora"] = Variant("lora", lora, note=note)
        except Exception as err:  # noqa: BLE001 - report and skip: PEFT may not support fused params
            print(f"LoRA skipped: PEFT could not wrap the fused expert parameters: {type(err).__name__}: {err}")

    floor = build_model(name)
    first = find_moe_layers(floor)[0].index
    apply_expert_config(floor, ExpertConfig({first: [0]}))
    variants["floor"] = Variant("floor", floor, note=f"one expert (layer {first}, expert 0) trainable")

    for v in variants.values():
        v.step, v.optimizer = make_step(v.model, batches)

    # A LoRA failure can also surface only on the first forward: check before timing.
    if "lora" in variants:
        try:
            variants["lora"].step()
        except Exception as err:  # noqa: BLE001
            print(f"LoRA skipped: first step failed: {type(err).__name__}: {err}")
            del variants["lora"]

    times = interleaved_times({k: v.step for k, v in variants.items()}, args.repeats, args.warmup)

    saved = {k: saved_for_backward_bytes(v.model, batches[0]) for k, v in variants.items()}
    fft_time = median(times["fft"])
    rows = []
    for k, v in variants.items():
        n_train, train_bytes = trainable(v.model)
        state = optimizer_state_bytes(v.optimizer)
        drift = frozen_expert_drift(v.model, selection, snapshots[k]) if k in snapshots else None
        rows.append(
            [
                k,
                f"{median(times[k]):.3f}",
                spread(times[k]),
                f"{median(times[k]) / fft_time:.3f}",
                f"{n_train:,}",
                human_bytes(state),
                f"{state / max(train_bytes, 1):.2f}",
                human_bytes(saved[k]),
                f"{saved[k] / saved['fft']:.3f}",
                "-" if drift is None else f"{drift:.2e}",
                v.note,
            ]
        )
    print_table(
        [
            "variant",
            "step s (median)",
            "IQR s",
            "/ fft",
            "trainable params",
            "AdamW state",
            "state / trainable",
            "saved for bwd",
            "saved / fft",
            "frozen experts max |dW|",
            "what",
        ],
        rows,
    )
    result = {
        "esft_over_fft": median(times["esft"]) / fft_time,
        "esft_over_floor": median(times["esft"]) / median(times["floor"]),
        "floor_over_fft": median(times["floor"]) / fft_time,
        "gradmask_over_fft": median(times["gradmask"]) / fft_time,
        "saved_esft_over_fft": saved["esft"] / saved["fft"],
    }
    if "lora" in variants:
        result["lora_over_fft"] = median(times["lora"]) / fft_time
    print()
    print(f"ESFT / FFT step time      : {result['esft_over_fft']:.3f}  {verdict(result['esft_over_fft'], 0.65, False)}")
    print(f"floor / FFT step time     : {result['floor_over_fft']:.3f}")
    print(f"ESFT / floor step time    : {result['esft_over_floor']:.3f}")
    print(f"gradmask / FFT step time  : {result['gradmask_over_fft']:.3f}")
    if "lora" in result:
        print(f"LoRA / FFT step time      : {result['lora_over_fft']:.3f}")
    print(
        f"saved-for-backward bytes, ESFT / FFT: {result['saved_esft_over_fft']:.3f}  "
        f"{verdict(result['saved_esft_over_fft'], 0.85, False)}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(STEP_MODELS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=12, help="timed steps per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct training batches, cycled")
    parser.add_argument("--profile-batches", type=int, default=4, help="random batches profiled for ESFT")
    parser.add_argument("--top-p", type=float, default=0.2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--no-flush-denormal",
        action="store_true",
        help="leave denormals on (diagnostic: CPU grouped_mm can slow down badly)",
    )
    args = parser.parse_args()
    setup(args.threads, flush_denormal=not args.no_flush_denormal)
    print(f"# step_time: {machine_line()}; flush denormal {'off' if args.no_flush_denormal else 'on'}")
    results = {name: bench_model(name, args) for name in args.models}
    print("\n## summary (ratios of medians, same run)")
    keys = [
        "esft_over_fft",
        "floor_over_fft",
        "esft_over_floor",
        "gradmask_over_fft",
        "lora_over_fft",
        "saved_esft_over_fft",
    ]
    rows = [[n, *(f"{r[k]:.3f}" if k in r else "-" for k in keys)] for n, r in results.items()]
    print_table(["model", *keys], rows)


if __name__ == "__main__":
    main()
    print(f"\n# end: {load_line()}")
