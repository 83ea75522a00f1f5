"""Write a `TokenStore` in one streaming pass, once per node (a file lock), never half-written (temp dir + rename)."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..files import atomic_write_dir
from .constants import IGNORE_INDEX
from .token_store import FORMAT, META, TokenStore, ids_dtype

BATCH = 512  # records per tokenizer call: large enough for the fast tokenizers' batching, small in memory
Encode = Callable[[Sequence[tuple[str, Any]]], list[tuple[list[int], list[int]]]]


class EmptySource(ValueError):
    """The records iterable yielded nothing."""


def ready(target: Path) -> bool:
    """Whether a finished store is at ``target`` (``meta.json`` is written last, inside the renamed dir)."""
    return (target / META).is_file()


def build_store(
    target: Path, records: Callable[[], Iterable[tuple[str, Any]]], encode: Encode, vocab_size: int, desc: str
) -> TokenStore:
    """The store at ``target``, tokenizing ``records()`` with ``encode`` into it first unless it exists.

    Every process of a node that asks for the same store at once takes a lock on ``<target>.lock``: the first
    builds, the others wait, find the finished store and map it (one tokenization per node, and per shared
    filesystem). A process that dies while building leaves only its temporary directory, which the next
    builder removes; ``target`` appears only complete, by an atomic rename. The lock is released by the OS
    when its holder dies, so a crashed builder never blocks the others.
    """
    if ready(target):
        return TokenStore(target)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not ready(target):  # else built by another process while this one waited
            # files.atomic_write_dir: a temp dir beside target (a killed builder's are removed first: with the
            # lock held, none is live), its files fsynced, then renamed to target.
            atomic_write_dir(target, lambda tmp: _write(tmp, records(), encode, ids_dtype(vocab_size), desc))
    return TokenStore(target)


def _write(out: Path, records: Iterable[tuple[str, Any]], encode: Encode, dtype: np.dtype, desc: str) -> None:
    from datasets.utils import tqdm  # datasets' bar: hidden by datasets.disable_progress_bars() like before

    position = samples = runs = 0
    with (
        open(out / "ids.bin", "wb") as ids_file,
        open(out / "offsets.bin", "wb") as offsets_file,
        open(out / "runs.bin", "wb") as runs_file,
        tqdm(desc=desc, unit=" examples") as bar,
    ):
        offsets_file.write(np.zeros(1, dtype=np.int64).tobytes())
        for batch in _batches(records, BATCH):
            pairs = encode(batch)
            lengths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=len(pairs))
            total = int(lengths.sum())
            ids = np.fromiter(itertools.chain.from_iterable(i for i, _ in pairs), dtype=np.int64, count=total)
            labels = np.fromiter(itertools.chain.from_iterable(lab for _, lab in pairs), dtype=np.int64, count=total)
            trained = labels != IGNORE_INDEX
            # The store keeps only which positions train, so a label must be its own token or IGNORE_INDEX.
            if not np.array_equal(labels[trained], ids[trained]):
                raise ValueError(f"{batch[0][0]}..: a trained label differs from its token id")
            if total and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
                raise ValueError(f"{batch[0][0]}..: token id {ids.max()} is outside the tokenizer's vocabulary")
            ids_file.write(ids.astype(dtype).tobytes())
            offsets_file.write((position + np.cumsum(lengths)).tobytes())
            edges = np.diff(trained.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
            pairs_of_run = np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1) + position
            runs_file.write(pairs_of_run.astype(np.int64).tobytes())
            position, samples, runs = position + total, samples + len(pairs), runs + len(pairs_of_run)
            bar.update(len(pairs))
        if not samples:
            raise EmptySource("no records")
    meta = {"format": FORMAT, "dtype": dtype.name, "tokens": position, "samples": samples, "runs": runs}
    (out / META).write_text(json.dumps(meta))  # last: a store is finished when this file is there


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for as long as the block runs; released by the OS if the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builders may race, the atomic rename still keeps stores whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if not _flock(fcntl, handle):
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flock(fcntl: Any, handle: BinaryIO) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks: as without flock
        return False
    return True
