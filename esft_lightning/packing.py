"""Samples -> training sequences: packing, the seeded resumable sampler, mixture counts, batch arithmetic."""

from __future__ import annotations

import math
from collections.abc import Iterator

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from .sources import IGNORE_INDEX


class SequenceDataset(Dataset):
    """Fixed list of (input_ids, labels) token sequences."""

    def __init__(self, sequences: list[tuple[np.ndarray, np.ndarray]]) -> None:
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


def _columns(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat token and label arrays plus per-sample offsets, straight from Arrow (no Python lists)."""
    ids = ds.data.column("input_ids").combine_chunks()
    labels = ds.data.column("labels").combine_chunks()
    offsets = ids.offsets.to_numpy()
    return ids.values.to_numpy().astype(np.int64), labels.values.to_numpy().astype(np.int64), offsets


def pack_sequences(
    ds: datasets.Dataset,
    indices: np.ndarray,
    seq_length: int,
    packing: str,
    rng: np.random.Generator,
    random_concat_ratio: float,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Samples ``indices`` of ``ds`` -> sequences of at most ``seq_length``; returns (sequences, truncated).

    ``pack``: samples concatenated in order and cut into full ``seq_length`` chunks (the tail is dropped
    unless it is the only chunk). ``pad``: one sample per sequence (longer ones truncated), and with
    probability ``random_concat_ratio`` a sequence takes further random samples while they fit (the
    reference's random concatenation).
    """
    ids, labels, offsets = _columns(ds)
    if packing == "pack":
        sel = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices]) if len(indices) else []
        stream_ids, stream_labels = ids[sel], labels[sel]
        n = max(1, len(stream_ids) // seq_length)
        return [
            (stream_ids[j * seq_length : (j + 1) * seq_length], stream_labels[j * seq_length : (j + 1) * seq_length])
            for j in range(n)
            if len(stream_ids[j * seq_length : (j + 1) * seq_length]) > 1
        ], 0
    if packing != "pad":
        raise ValueError(f"packing must be 'pack' or 'pad', got {packing!r}")
    sequences, truncated = [], 0
    for i in indices:
        parts = [(ids[offsets[i] : offsets[i + 1]], labels[offsets[i] : offsets[i + 1]])]
        length = len(parts[0][0])
        if random_concat_ratio > 0 and rng.random() < random_concat_ratio:
            while True:
                j = int(rng.choice(indices))
                extra = offsets[j + 1] - offsets[j]
                if length + extra > seq_length:
                    break
                parts.append((ids[offsets[j] : offsets[j + 1]], labels[offsets[j] : offsets[j + 1]]))
                length += extra
        seq_ids, seq_labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if len(seq_ids) > seq_length:
            truncated += 1
            seq_ids, seq_labels = seq_ids[:seq_length], seq_labels[:seq_length]
        sequences.append((seq_ids, seq_labels))
    return sequences, truncated


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
