"""Training throughput of the Lightning loop (ESFTModule + ESFTDataModule) vs an equivalent plain loop.

Both train the same model object (ESFT-Token p=0.2 applied beforehand) on the same batches, drawn in the
same order from the same ESFTDataModule loader (generated chat JSONL in a temp dir), with the same AdamW
(lr 1e-5, betas 0.9/0.95, wd 0.1, the module's default). Each round is one ``Trainer.fit`` (logger,
checkpointing, progress bar and model summary off; no validation) and one plain loop, alternating; the
first ``--warmup`` steps of every round are excluded. Data loading is inside the timed steps of both.
Run from the repo root: ``python benchmarks/lightning_loop.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import MODEL_CONFIGS, load_line, machine_line, median, print_table, setup, spread, verdict

from esft_lightning import ESFTDataModule, ESFTModule, Source
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.routing.profile import profile_routing
from esft_lightning.selection.rules import select_experts

WORDS = (
    "the model routes every token to a few experts and only the selected experts learn the task "
    "while attention norms routers embeddings and the head stay frozen 0 1 2 3 4 5 6 7 8 9"
).split()


def write_chat_jsonl(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(records):
            user = " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")


class StepClock(L.Callback):
    """Wall-clock time at the end of every training batch, and its non-padding token count."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.ends.append(time.perf_counter())
        self.tokens.append(int(batch["attention_mask"].sum()))


def throughput(ends: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens per second over the steps after ``warmup`` (each step's time: end-to-end from the previous
    step's end, so data loading and loop overhead count)."""
    return sum(tokens[warmup:]) / (ends[-1] - ends[warmup - 1])


def lightning_round(module: ESFTModule, dm: ESFTDataModule, steps: int, warmup: int) -> float:
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=warmup + steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=dm)
    assert len(clock.ends) == warmup + steps, len(clock.ends)
    return throughput(clock.ends, clock.tokens, warmup)


def plain_round(model: torch.nn.Module, dm: ESFTDataModule, steps: int, warmup: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    ends, tokens = [], []
    for i, batch in enumerate(dm.train_dataloader()):
        if i == warmup + steps:
            break
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        tokens.append(int(batch["attention_mask"].sum()))
    assert len(ends) == warmup + steps, len(ends)
    return throughput(ends, tokens, warmup)


def bench_model(name: str, args: argparse.Namespace, data: Path, cache: Path) -> float:
    family, config = MODEL_CONFIGS[name]
    dm = ESFTDataModule(
        task=[Source(str(data))],
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        general_ratio=0,
        cache_dir=str(cache),
    )
    dm.setup("fit")
    module = ESFTModule(family=family, model_config=dict(config))
    model = module.build_model()
    profile = profile_routing(model, dm.task_dataloader(), max_tokens=args.profile_tokens, progress=False)
    expert_config = select_experts(profile.token_scores, top_p=0.2)
    summary = apply_expert_config(model, expert_config)
    print(
        f"\n## {name}: ESFT-Token p=0.2, {summary['selected_experts']} experts, "
        f"{summary['trainable_params']:,} of {summary['total_params']:,} params trainable; "
        f"batch {args.batch_size} x {args.seq_length}; {len(dm.train_dataset)} train sequences; "
        f"{args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps per loop\n"
    )
    results: dict[str, list[float]] = {"lightning Trainer.fit": [], "plain PyTorch loop": []}
    for r in range(args.rounds):
        order = ["lightning", "plain"] if r % 2 == 0 else ["plain", "lightning"]
        for which in order:
            if which == "lightning":
                results["lightning Trainer.fit"].append(lightning_round(module, dm, args.steps, args.warmup))
            else:
                results["plain PyTorch loop"].append(plain_round(model, dm, args.steps, args.warmup))
    rows = [[k, f"{median(v):,.0f}", spread(v, ",.0f"), ", ".join(f"{x:,.0f}" for x in v)] for k, v in results.items()]
    print_table(["loop", "tokens/s (median)", "IQR", "per round"], rows)
    ratio = median(results["lightning Trainer.fit"]) / median(results["plain PyTorch loop"])
    print(f"\nLightning / plain PyTorch tokens/s: {ratio:.3f}  {verdict(ratio, 0.95, True)}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating Lightning / plain rounds")
    parser.add_argument("--records", type=int, default=1500, help="generated chat records")
    parser.add_argument("--profile-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's start is not observed)")
    setup(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"# lightning_loop: {machine_line()}, lightning {L.__version__}")
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="esft-bench-") as tmp:
        data = Path(tmp) / "bench_task.jsonl"
        write_chat_jsonl(data, args.records)
        for name in args.models:
            ratios[name] = bench_model(name, args, data, Path(tmp) / "cache")
    print("\n## summary")
    print_table(["model", "Lightning / plain (tokens/s)"], [[k, f"{v:.3f}"] for k, v in ratios.items()])


if __name__ == "__main__":
    main()
    print(f"\n# end: {load_line()}")
