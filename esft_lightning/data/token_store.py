"""A tokenized source on disk, memory-mapped: token ids in their smallest dtype, trained runs, per-sample offsets.

A store is a directory of flat binary files that ``store_build`` writes in one streaming pass:

- ``ids.bin``: every sample's token ids end to end, in the smallest unsigned dtype that holds the vocabulary
  (uint32 for real vocabularies, uint16 below 65,536 ids);
- ``offsets.bin``: int64, sample ``i`` is ``ids[offsets[i]:offsets[i + 1]]``;
- ``runs.bin``: int64 (start, end) pairs, the trained/untrained mask in run-length form: positions in
  ``[start, end)`` are trained (their label is their id), all others have label ``IGNORE_INDEX``. A chat has
  one run per trained reply, so this costs a few hundredths of a byte per token where a mask byte costs one,
  and "does this window train any token" is a binary search instead of a scan;
- ``meta.json``: the format, dtype and counts, written last.

Nothing is read into memory up front: the arrays are ``np.memmap``s, and the pages a window touches are the
only ones the process maps in. A store pickles by its path (DataLoader workers reopen it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .constants import IGNORE_INDEX

FORMAT = "esft-token-store-v1"
META = "meta.json"


def default_cache_dir() -> Path:
    """Where token stores live (and datasets' builder locks, judge ratings).

    $ESFT_CACHE_DIR, else $XDG_CACHE_HOME/esft-lightning (~/.cache/esft-lightning)."""
    base = os.environ.get("ESFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "esft-lightning"
    )
    return Path(base)


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ids ``0 .. vocab_size - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


class TokenStore:
    """The memory-mapped tokens of one source; ``len`` is its number of samples (records).

    ``store.sample(i)`` gives sample ``i`` as (input_ids, labels) int64 arrays; ``store.window(start, stop)``
    any range of the flat token stream. ``store[i]`` and ``store["input_ids"]`` read like the ``datasets.Dataset``
    that ``tokenize_source`` returned before (lists of ints), for callers that inspect a few samples.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = json.loads((self.path / META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a token store of format {FORMAT} (found {meta.get('format')!r})")
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens, self.num_samples, num_runs = meta["tokens"], meta["samples"], meta["runs"]
        self.ids = _map(self.path / "ids.bin", self.dtype, (self.num_tokens,))
        self.offsets = _map(self.path / "offsets.bin", np.int64, (self.num_samples + 1,))
        runs = _map(self.path / "runs.bin", np.int64, (num_runs, 2))
        self.run_starts, self.run_ends = runs[:, 0], runs[:, 1]

    def __getstate__(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self.num_samples

    def lengths(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Token counts of samples ``indices`` (all samples by default), int64."""
        if indices is None:
            return np.diff(self.offsets)
        indices = np.asarray(indices, dtype=np.int64)
        return self.offsets[indices + 1] - self.offsets[indices]

    def trained(self, start: int, stop: int) -> np.ndarray:
        """The trained mask of stream positions ``[start, stop)`` as booleans."""
        mask = np.zeros(stop - start, dtype=bool)
        first = int(np.searchsorted(self.run_ends, start, side="right"))  # the first run ending after start
        last = int(np.searchsorted(self.run_starts, stop, side="left"))  # runs from here on start at/after stop
        for s, e in zip(self.run_starts[first:last].tolist(), self.run_ends[first:last].tolist()):
            mask[max(s, start) - start : min(e, stop) - start] = True
        return mask

    def any_trained(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Per range ``[starts[k], stops[k])``: whether it holds a trained position (vectorized)."""
        starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
        if len(self.run_ends) == 0:
            return np.zeros(len(starts), dtype=bool)
        k = np.searchsorted(self.run_ends, starts, side="right")  # runs are sorted and disjoint: the first after
        inside = k < len(self.run_ends)
        return inside & (self.run_starts[np.minimum(k, len(self.run_ends) - 1)] < stops) & (starts < stops)

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of stream positions ``[start, stop)``, int64 (what the model's batches hold)."""
        ids = self.ids[start:stop].astype(np.int64)
        return ids, np.where(self.trained(start, stop), ids, IGNORE_INDEX)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.window(int(self.offsets[i]), int(self.offsets[i + 1]))

    def __getitem__(self, key: int | str) -> dict[str, list[int]] | list[list[int]]:
        if isinstance(key, str):  # a whole column, as datasets.Dataset["input_ids"] gives it
            if key not in ("input_ids", "labels"):
                raise KeyError(key)
            return [row[key] for row in self]
        if not -len(self) <= key < len(self):
            raise IndexError(f"sample {key} of a store with {len(self)} samples")
        ids, labels = self.sample(key % len(self))
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, samples={self.num_samples}, tokens={self.num_tokens}, {self.dtype})"


def _map(path: Path, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
    if int(np.prod(shape)) == 0:  # mmap refuses empty files
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)
