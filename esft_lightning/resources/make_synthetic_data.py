"""Writes the synthetic fine-tuning and eval data shipped in `resources/synthetic/` (deterministic, seed 0).

Run from anywhere: `python -m esft_lightning.resources.make_synthetic_data`. For each new task (intent, cipher, upper):
`<task>_train.jsonl` (600 ESFT chat records) and `<task>_eval.jsonl` (64 ESFT eval records); for the general
domains the embedded model was pretrained on: `general_train.jsonl` (2,000 records, the six domains interleaved:
about as many tokens as the intent file) and
`general_eval.jsonl`. Training and eval records come from disjoint generator streams ("train", "eval"),
and both differ from pretraining's stream ("pretrain").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.synthetic import GENERAL_DOMAINS, TASK_DOMAINS, chat_records, eval_records, mixed_records, write_jsonl

OUT = Path(__file__).parent / "synthetic"


def write_all(
    out: Path = OUT, seed: int = 0, n_train: int = 600, n_general: int = 2000, n_eval: int = 64
) -> list[Path]:
    """Write every file; return their paths."""
    written = []
    for task in TASK_DOMAINS:
        written.append(write_jsonl(out / f"{task}_train.jsonl", chat_records(task, n_train, seed)))
        written.append(write_jsonl(out / f"{task}_eval.jsonl", eval_records(task, n_eval, seed)))
    general = list(GENERAL_DOMAINS)
    written.append(write_jsonl(out / "general_train.jsonl", mixed_records(general, n_general, seed)))
    written.append(write_jsonl(out / "general_eval.jsonl", mixed_records(general, n_eval, seed, "eval", "eval")))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m esft_lightning.resources.make_synthetic_data")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    for path in write_all(Path(ns.out), ns.seed):
        print(path)


if __name__ == "__main__":
    main()
