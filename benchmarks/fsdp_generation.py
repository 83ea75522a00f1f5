"""Task-eval generation on 2 FSDP2 ranks (gloo, CPU) vs the same evaluation in one process.

    python benchmarks/fsdp_generation.py           # ~0.8 GiB 16-layer model, 2 sets x 32 samples, 96 new tokens
    python benchmarks/fsdp_generation.py --tiny    # a seconds-long smoke run of the whole script

Target (issue 16): 2 ranks within 2x of one process. Each variant runs in fresh processes that load the same
saved model (random weights, a scaled-up tiny qwen3_moe) and time what TaskEvalCallback.evaluate does: one
``sharded_generation`` around ``evaluate_set`` of every set. "before" is the per-forward all-gather path
(``fsdp_unshard: never``), timed on fewer new tokens and one set, and extrapolated per new token (it all-gathers
the whole model at every token, so its cost grows with the tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def save_model(path: Path, hidden: int, layers: int, experts: int) -> int:
    """A random qwen3_moe of the tiny family scaled up, saved with save_pretrained; returns its bytes."""
    from esft_lightning.data.tokenizer import byte_tokenizer
    from esft_lightning.models import build_tiny_model

    model = build_tiny_model(
        "qwen3_moe",
        vocab_size=len(byte_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers,
        num_experts=experts,
        num_experts_per_tok=4,
    )
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def eval_sets(sets: int, samples: int) -> list[list[dict]]:
    """Prompts of varied lengths (so batches are padded and some ranks' samples are longer), ESFT format."""
    topics = ["the weather", "a list of primes", "the capital of France", "sorting a list in Python"]
    return [
        [
            {
                "prompt": f"User: set {s}, question {i}: tell me about {topics[i % 4]}{'!' * (i % 7)}\n\nAssistant:",
                "answers": [f"answer {i}"],
            }
            for i in range(samples)
        ]
        for s in range(sets)
    ]


def worker(rank: int, world: int, folder: str, spec: dict) -> None:
    """One rank (or the one process): load, shard when world > 1, time the evaluation, write the result."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from esft_lightning.data.tokenizer import byte_tokenizer
    from esft_lightning.distributed.generation import sharded_generation
    from esft_lightning.evaluation.evaluate import evaluate_set

    torch.set_num_threads(max(1, spec["threads"] // world))  # the ranks share the cores
    torch.set_flush_denormal(True)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store-{spec['tag']}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model"])
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from esft_lightning.distributed.fsdp import shard_model

            shard_model(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)), False)
            dist.barrier()  # time from the same start on every rank
        tokenizer = byte_tokenizer()
        # Warm-up, not timed: first-call costs (kernels, FSDP's lazy init) that every variant pays once.
        evaluate_set(model, tokenizer, spec["sets"][0][:world], 1, 1, unshard=spec["policy"])
        started = time.perf_counter()
        predictions = []
        with sharded_generation(model, spec["policy"]) as mode:
            prepared = time.perf_counter() - started
            for samples in spec["sets"]:
                _, records = evaluate_set(model, tokenizer, samples, spec["new_tokens"], spec["batch_size"], mode)
                predictions.append([r["prediction"] for r in records])
        seconds = time.perf_counter() - started
        if rank == 0:
            result = {"seconds": seconds, "prepare": prepared, "mode": mode, "predictions": predictions}
            (Path(folder) / f"{spec['tag']}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world: int, folder: Path, **spec) -> dict:
    """``worker`` in ``world`` fresh processes (1: one process, no torch.distributed)."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, str(folder), spec), nprocs=world, join=True)
    return json.loads((folder / f"{spec['tag']}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--sets", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="samples per set")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--before-tokens", type=int, default=8, help="new tokens for the 'before' run (0: skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by all ranks")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a tiny model, few samples and tokens")
    if "--tiny" in sys.argv[1:]:  # smaller defaults; options given explicitly still win
        parser.set_defaults(hidden=64, layers=2, experts=8, samples=4, new_tokens=4, before_tokens=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="esft-fsdp-gen-") as tmp:
        folder = Path(tmp)
        model_bytes = save_model(folder / "model", args.hidden, args.layers, args.experts)
        sets = eval_sets(args.sets, args.samples)
        common = dict(model=str(folder / "model"), threads=args.threads, batch_size=args.batch_size)
        print(
            f"model: {model_bytes / 2**30:.2f} GiB fp32 ({args.layers} layers, {args.experts} experts, hidden "
            f"{args.hidden}); {args.sets} sets x {args.samples} samples, {args.new_tokens} new tokens, batch "
            f"{args.batch_size}; {args.threads} threads shared by the ranks; gloo on CPU",
            flush=True,
        )
        one = run(1, folder, tag="one", policy="auto", sets=sets, new_tokens=args.new_tokens, **common)
        print(f"one process:              {one['seconds']:8.1f} s", flush=True)
        two = run(2, folder, tag="two", policy="auto", sets=sets, new_tokens=args.new_tokens, **common)
        same = sum(a == b for x, y in zip(one["predictions"], two["predictions"]) for a, b in zip(x, y))
        print(
            f"2 ranks, FSDP2 ({two['mode']}): {two['seconds']:8.1f} s   ratio {two['seconds'] / one['seconds']:.2f}x "
            f"(target <= 2x); unshard {two['prepare']:.1f} s; predictions equal to one process: "
            f"{same}/{args.sets * args.samples}",
            flush=True,
        )
        if args.before_tokens:
            before = run(
                2, folder, tag="before", policy="never", sets=sets[:1], new_tokens=args.before_tokens, **common
            )
            # Per-forward gathering costs about the same per new token: scale to the full evaluation.
            estimate = before["seconds"] * args.new_tokens / args.before_tokens * args.sets
            print(
                f"2 ranks, before (gathered per forward): {before['seconds']:.1f} s for {args.before_tokens} new "
                f"tokens on 1 set -> ~{estimate:.0f} s extrapolated to the full evaluation "
                f"({estimate / one['seconds']:.1f}x one process)",
                flush=True,
            )


if __name__ == "__main__":
    main()
