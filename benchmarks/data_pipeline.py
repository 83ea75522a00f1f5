"""Data pipeline time: tokenize + pack the ESFT intent train set with ESFTDataModule, cold vs cached.

Cold: a fresh datamodule with an empty cache directory (read JSONL, tokenize with ESFT's chat template,
write the Arrow cache, split, pack). Cached: a new datamodule instance on the same cache directory (what a
second run of training does). Both time ``ESFTDataModule.setup("fit")`` plus the first training batch.
Run from the repo root: ``python benchmarks/data_pipeline.py [path/to/intent.jsonl]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, load_line, machine_line, median, print_table, setup, verdict

from esft_lightning import ESFTDataModule, Source

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "esft" / "train" / "intent.jsonl"


def run_once(path: Path, cache: Path, args: argparse.Namespace) -> tuple[float, ESFTDataModule]:
    start = time.perf_counter()
    dm = ESFTDataModule(
        task=[Source(str(path))],
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        general_ratio=0,
        cache_dir=str(cache),
        packing=args.packing,
    )
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    return time.perf_counter() - start, dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "path",
        nargs="?",
        default=str(DEFAULT_DATA),
        help="ESFT chat JSONL (default: ../shared/data/esft/train/intent.jsonl)",
    )
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--packing", default="pack", choices=["pack", "pad"])
    parser.add_argument("--repeats", type=int, default=3, help="cached runs (each a new datamodule)")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default: a fresh temp dir)")
    args = parser.parse_args()
    setup()
    path = Path(args.path)
    if not path.exists():
        parser.error(f"{path} does not exist (pass the intent train set's path)")
    print(f"# data_pipeline: {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="esft-data-bench-") as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        if cache.exists() and any(cache.iterdir()):
            parser.error(f"--cache-dir {cache} is not empty: the cold run needs an empty cache")
        cold, dm = run_once(path, cache, args)
        cached = [run_once(path, cache, args)[0] for _ in range(args.repeats)]
        train_seqs = sum(len(v) for v in dm.train_sequences.values())
        val_seqs = sum(len(v) for v in dm.val_sequences.values())
        tokens = sum(len(ids) for v in dm.train_sequences.values() for ids, _ in v)
        with open(path, "rb") as f:
            records = sum(1 for line in f if line.strip())
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    print(
        f"\n{path} ({records:,} records) -> {train_seqs:,} train + {val_seqs:,} validation sequences "
        f"of <= {args.seq_length} tokens ({args.packing}), {tokens:,} training tokens; "
        f"cache {cache_bytes / 2**20:.1f} MiB\n"
    )
    print_table(
        ["run", "seconds"],
        [
            ["cold (empty cache)", f"{cold:.2f}"],
            [f"cached (median of {len(cached)} new datamodules)", f"{median(cached):.2f}"],
        ],
    )
    print(f"\ncached run: {median(cached):.2f} s  {verdict(median(cached), 2.0, False)}")
    print(f"cold / cached: {cold / median(cached):.1f}x")


if __name__ == "__main__":
    main()
    print(f"\n# end: {load_line()}")
