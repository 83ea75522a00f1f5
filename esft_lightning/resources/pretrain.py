"""Pretrain the embedded tiny MoE from a seed on the general synthetic domains and save it into the package.

``python -m esft_lightning.resources.pretrain --seed 0`` (about 15 minutes on one busy CPU core) writes
``esft_lightning/resources/pretrained/`` (config.json, model.safetensors, pretrain.json with the command,
steps, wall time and losses). A Qwen3-MoE-style model: 32 routed experts, top-4, byte tokenizer, router
load-balancing loss on, so experts specialise by domain (what ESFT selects from).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data.synthetic import GENERAL_DOMAINS, chat_text, pairs
from ..data.tokenizer import byte_tokenizer
from ..files import atomic_write_dir
from ..models import build_tiny_model

OUT = Path(__file__).parent / "pretrained"
FAMILY = "qwen3_moe"
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=1024,
    router_aux_loss_coef=0.01,
)


def token_stream(seed: int, split: str = "pretrain") -> Iterator[int]:
    """Endless byte tokens: BOS + chat text + EOS of general-domain records, domains drawn uniformly."""
    tokenizer, names = byte_tokenizer(), list(GENERAL_DOMAINS)
    picker = random.Random(f"pretrain-mix/{seed}/{split}")
    streams = {d: pairs(d, 1 << 40, seed, split) for d in names}
    while True:
        prompt, answer = next(streams[picker.choice(names)])
        yield tokenizer.bos_token_id
        yield from tokenizer(chat_text(prompt, answer), add_special_tokens=False)["input_ids"]
        yield tokenizer.eos_token_id


def batches(seed: int, batch_size: int, seq_length: int, split: str = "pretrain") -> Iterator[torch.Tensor]:
    """[batch_size, seq_length] windows cut in order from the token stream (documents packed)."""
    stream = token_stream(seed, split)
    while True:
        flat = [next(stream) for _ in range(batch_size * seq_length)]
        yield torch.tensor(flat, dtype=torch.long).view(batch_size, seq_length)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, seed: int, batch_size: int, seq_length: int, n_batches: int = 8) -> float:
    """Mean next-byte loss (nats per token) on general records of the eval stream, never trained on."""
    model.eval()
    data = batches(seed, batch_size, seq_length, split="eval")
    losses = [float(model(input_ids=x, labels=x, use_cache=False).loss) for x, _ in zip(data, range(n_batches))]
    model.train()
    return sum(losses) / len(losses)


def pretrain(
    seed: int = 0,
    steps: int = 1800,
    batch_size: int = 8,
    seq_length: int = 256,
    lr: float = 3e-3,
    warmup: int = 100,
    max_minutes: float | None = None,
    out: Path | None = OUT,
    log_every: int = 50,
) -> tuple[torch.nn.Module, dict]:
    """Train the embedded model from ``seed``; save it to ``out`` (skip with None); return it and its record."""
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    model = build_tiny_model(FAMILY, vocab_size=len(tokenizer), seed=seed, **MODEL_CONFIG)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    initial = held_out_loss(model, seed, batch_size, seq_length)
    print(f"parameters {sum(p.numel() for p in model.parameters())}, held-out loss at init {initial:.3f}", flush=True)
    started, done, recent = time.perf_counter(), 0, []
    for step, x in zip(range(steps), batches(seed, batch_size, seq_length)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        output = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        output.loss.backward()  # includes router_aux_loss_coef x the load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        recent.append(float((output.loss - model.router_aux_loss_coef * output.aux_loss).detach()))
        elapsed = time.perf_counter() - started
        if done % log_every == 0 or done == steps:
            lm = sum(recent) / len(recent)
            print(
                f"step {done}/{steps} loss {lm:.3f} aux {float(output.aux_loss.detach()):.3f} {elapsed:.0f}s",
                flush=True,
            )
            recent = []
        if max_minutes is not None and elapsed > 60 * max_minutes:
            print(f"stopping at step {done}: wall-clock budget of {max_minutes} minutes spent", flush=True)
            break
    wall = time.perf_counter() - started
    final = held_out_loss(model, seed, batch_size, seq_length)
    record = {
        "command": "python -m esft_lightning.resources.pretrain " + " ".join(sys.argv[1:]),
        "seed": seed,
        "family": FAMILY,
        "steps": done,
        "planned_steps": steps,
        "batch_size": batch_size,
        "seq_length": seq_length,
        "lr": lr,
        "warmup": warmup,
        "domains": list(GENERAL_DOMAINS),
        "wall_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_loss_init": round(initial, 4),
        "held_out_loss_final": round(final, 4),
        "torch": torch.__version__,
    }
    print(json.dumps(record), flush=True)
    if out is not None:

        def fill(folder: Path) -> None:
            model.save_pretrained(folder)
            (folder / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
            for file in folder.iterdir():
                file.chmod(0o644)  # shipped files: readable by everyone (some writers make 0600 files)

        atomic_write_dir(out, fill)
        print(f"saved to {out}", flush=True)
    return model, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esft_lightning.resources.pretrain", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max_minutes", type=float, default=None, help="stop early after this wall-clock time")
    parser.add_argument("--out", default=str(OUT), help="output folder ('' to skip saving)")
    ns = parser.parse_args(argv)
    pretrain(
        ns.seed,
        ns.steps,
        ns.batch_size,
        ns.seq_length,
        ns.lr,
        ns.warmup,
        ns.max_minutes,
        Path(ns.out) if ns.out else None,
    )


if __name__ == "__main__":
    main()
