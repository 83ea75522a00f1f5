"""Routing profiling throughput (profile_routing) vs a plain torch.no_grad() full-model forward, tokens/s.

Both read the same batches through the same model; repeats are interleaved (profile, plain, profile, ...)
and medians reported. profile_routing runs the decoder only (no LM head) with router hooks; the plain
baseline is ``model(input_ids, attention_mask, use_cache=False)`` in eval mode under ``torch.no_grad()``.
Run from the repo root: ``python benchmarks/profiling.py``.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    MODEL_CONFIGS,
    build_model,
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

from esft_lightning.routing.profile import profile_routing


def bench_model(name: str, args: argparse.Namespace) -> float:
    model = build_model(name)
    batches = random_batches(args.num_batches, args.batch_size, args.seq_length, seed=3)
    if args.padding:
        # Pad the second half of every other sequence: profiling must mask padding, the forward sees it too.
        for b in batches:
            b["attention_mask"][::2, args.seq_length // 2 :] = 0
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def profile() -> None:
        profile_routing(model, batches, progress=False)

    def plain() -> None:
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        model.train()

    times = interleaved_times({"profile_routing": profile, "plain no_grad forward": plain}, args.repeats, args.warmup)
    rows = [[k, f"{median(t):.3f}", spread(t), f"{tokens / median(t):,.0f}"] for k, t in times.items()]
    print(
        f"\n## {name}: {args.num_batches} batches of {args.batch_size} x {args.seq_length} "
        f"({tokens:,} non-padding tokens per pass), {args.repeats} interleaved repeats\n"
    )
    print_table(["pass", "seconds (median)", "IQR s", "tokens/s"], rows)
    ratio = median(times["plain no_grad forward"]) / median(times["profile_routing"])
    print(f"\nprofiling throughput / plain forward throughput: {ratio:.3f}  {verdict(ratio, 0.90, True)}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--num-batches", type=int, default=4, help="batches per pass")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--padding", action="store_true", help="pad half of the sequences to half length")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    setup(args.threads)
    print(f"# profiling: {machine_line()}")
    ratios = {name: bench_model(name, args) for name in args.models}
    print("\n## summary")
    rows = [[k, f"{v:.3f}"] for k, v in ratios.items()]
    print_table(["model", "profiling / plain forward (tokens/s)"], rows)


if __name__ == "__main__":
    main()
    print(f"\n# end: {load_line()}")
