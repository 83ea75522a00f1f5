"""Samples -> training sequences: packing, the seeded resumable sampler, mixture counts, batch arithmetic."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from .constants import IGNORE_INDEX
from .token_store import TokenStore
from .windows import Windows


class SequenceDataset(Dataset):
    """(input_ids, labels) token sequences as tensors: a list of arrays, or ``Windows``/``Mixed`` that read each
    sequence from a memory-mapped store when it is asked for."""

    def __init__(self, sequences: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.sequences[i]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


class ResumableSampler(DistributedSampler):
    """A seeded permutation per epoch, sharded by rank, that records how far it got.

    Each rank takes every ``num_replicas``-th index of the same permutation. Like ``DistributedSampler``,
    the permutation is padded by repeating its head until it divides evenly, so every rank yields the same
    number of indices (and so of batches) whatever the dataset size, even with more ranks than samples:
    ranks that ran out of batches would otherwise hang or fail Lightning's zero-length check. The state
    (epoch, indices yielded) lets ``StatefulDataLoader`` resume mid-epoch exactly, with workers too. It
    is a DistributedSampler, so Lightning keeps it instead of wrapping it in its own.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        shard: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            distributed = shard and torch.distributed.is_available() and torch.distributed.is_initialized()
            world, here = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
            num_replicas = world if num_replicas is None else num_replicas
            rank = here if rank is None else rank
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.size = size
        self.yielded, self._skip = 0, 0

    def _indices(self) -> list[int]:
        indices = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()
            if self.shuffle
            else (list(range(self.size)))
        )
        if self.num_replicas > 1 and indices:
            total = math.ceil(self.size / self.num_replicas) * self.num_replicas
            padding = total - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding]  # DistributedSampler's padding
            indices = indices[self.rank : total : self.num_replicas]
        return indices

    def __len__(self) -> int:
        # The whole epoch, also right after a resume: Lightning counts the restored batches itself.
        return len(self._indices())

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        start, self._skip = self._skip, 0
        self.yielded = start
        for i in indices[start:]:
            self.yielded += 1
            yield int(i)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts from its beginning (a restored position is for its own epoch)
            self._skip = 0
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["yielded"] % max(len(self._indices()), 1)


def pack_sequences(
    store: TokenStore,
    indices: np.ndarray,
    seq_length: int,
    packing: str,
    rng: np.random.Generator,
    random_concat_ratio: float,
) -> tuple[Windows, int]:
    """Samples ``indices`` of ``store`` -> sequences of at most ``seq_length``; returns (sequences, truncated).

    ``pack``: samples concatenated in order and cut into full ``seq_length`` chunks (the tail is dropped
    unless it is the only chunk). ``pad``: one sample per sequence (longer ones truncated), and with
    probability ``random_concat_ratio`` a sequence takes further random samples while they fit (the
    reference's random concatenation). The sequences are ``Windows``: offsets into the store, no tokens copied.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if packing == "pack":
        return _pack(store, indices, seq_length), 0
    if packing != "pad":
        raise ValueError(f"packing must be 'pack' or 'pad', got {packing!r}")
    if random_concat_ratio <= 0:  # no draws from rng: the same stream as before for what follows
        lengths = store.lengths(indices)
        windows = Windows.single_pieces(store, store.offsets[indices], np.minimum(lengths, seq_length))
        return windows, int((lengths > seq_length).sum())
    return _pad_concatenated(store, indices, seq_length, rng, random_concat_ratio)


def _pack(store: TokenStore, indices: np.ndarray, seq_length: int) -> Windows:
    # The stream is the samples end to end; window j is its positions [j * seq_length, (j + 1) * seq_length).
    # Pieces are cut at every window and sample boundary, found by sorting the boundaries (no token is read).
    cum = np.concatenate([[0], np.cumsum(store.lengths(indices))])
    total = int(cum[-1])
    n = max(1, total // seq_length)
    bounds = np.arange(n + 1, dtype=np.int64) * seq_length
    bounds[-1] = min(total, n * seq_length)  # one short window when the stream is shorter than seq_length
    points = np.union1d(cum[cum < bounds[-1]], bounds)
    piece_pos = points[:-1]
    sample = np.searchsorted(cum, piece_pos, side="right") - 1  # skips empty samples: the next one holds it
    starts = store.offsets[indices[sample]] + piece_pos - cum[sample]
    windows = Windows(store, starts, np.diff(points), np.searchsorted(points, bounds))
    long_enough = np.diff(bounds) > 1  # a one-token chunk predicts nothing
    return windows if long_enough.all() else windows.select(long_enough)


def _pad_concatenated(
    store: TokenStore, indices: np.ndarray, seq_length: int, rng: np.random.Generator, ratio: float
) -> tuple[Windows, int]:
    lengths, offsets = store.lengths().tolist(), store.offsets
    samples, ptr, truncated = [], [0], 0
    for i in indices.tolist():
        parts, length = [i], lengths[i]
        if rng.random() < ratio:
            while True:
                j = int(rng.choice(indices))
                if length + lengths[j] > seq_length:
                    break
                parts.append(j)
                length += lengths[j]
        truncated += length > seq_length  # only the first sample can be longer: the others are added if they fit
        samples.extend(p for p in parts if lengths[p])  # an empty piece would hide which token comes first
        ptr.append(len(samples))
    samples = np.asarray(samples, dtype=np.int64)
    sizes = np.minimum(store.lengths(samples), seq_length)
    return Windows(store, offsets[samples], sizes, np.asarray(ptr, dtype=np.int64)), truncated


def has_target(sequence: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether a sequence trains at least one token (labels shift by one: the first label predicts nothing)."""
    return bool((sequence[1][1:] != IGNORE_INDEX).any())


def gradient_accumulation(global_batch_size: int, micro_batch_size: int, world_size: int, configured: int = 1) -> int:
    """Accumulation steps so that micro-batch x data-parallel ranks x steps = ``global_batch_size``."""
    per_step = micro_batch_size * world_size
    if global_batch_size <= 0 or global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not a multiple of data.batch_size={micro_batch_size} x "
            f"{world_size} data-parallel rank(s) = {per_step}: change batch_size or the number of devices"
        )
    steps = global_batch_size // per_step
    if configured not in (1, steps):
        raise ValueError(
            f"trainer.accumulate_grad_batches={configured} contradicts data.global_batch_size={global_batch_size} "
            f"(which needs {steps} with batch_size {micro_batch_size} on {world_size} rank(s)): set only one of them"
        )
    return steps


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Split ``total`` draws in proportion to ``weights`` (largest remainders; sums exactly to total)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be non-negative and sum to a positive number, got {weights}")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[j] += 1
    return counts.tolist()
