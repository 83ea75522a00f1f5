"""Training sequences as offsets into memory-mapped token stores: `Windows` (one store) and `Mixed` (several).

A packed or padded sequence is a list of pieces, each a range of a store's token stream: a ``pack`` chunk
spans the end of one sample and the start of the next, a padded sequence with random concatenation is
several whole samples. Only the pieces' offsets live in memory (a few int64 per sequence); the tokens are
read from the store when a sequence is asked for. Both classes are read-only sequences of
``(input_ids, labels)`` int64 array pairs, as the lists of arrays they replace were.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .token_store import TokenStore


class Windows:
    """Sequences over one ``TokenStore``: sequence ``i`` joins pieces ``ptr[i]:ptr[i + 1]``, piece ``k`` being
    stream positions ``[starts[k], starts[k] + lengths[k])``."""

    def __init__(self, store: TokenStore, starts: np.ndarray, lengths: np.ndarray, ptr: np.ndarray) -> None:
        self.store = store
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.ptr = np.asarray(ptr, dtype=np.int64)

    @classmethod
    def single_pieces(cls, store: TokenStore, starts: np.ndarray, lengths: np.ndarray) -> Windows:
        """One piece per sequence."""
        return cls(store, starts, lengths, np.arange(len(starts) + 1))

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of {len(self)}")
        i %= len(self)
        lo, hi = int(self.ptr[i]), int(self.ptr[i + 1])
        starts, lengths = self.starts[lo:hi].tolist(), self.lengths[lo:hi].tolist()
        parts = [self.store.window(s, s + n) for s, n in zip(starts, lengths)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def sizes(self) -> np.ndarray:
        """Tokens per sequence."""
        return np.bincount(self._owners(), weights=self.lengths, minlength=len(self)).astype(np.int64)

    def _owners(self) -> np.ndarray:
        """The sequence of each piece."""
        return np.repeat(np.arange(len(self)), np.diff(self.ptr))

    def has_target(self) -> np.ndarray:
        """Per sequence: whether it trains a token past its first (labels shift by one: the first predicts nothing).

        Vectorized over the store's trained runs; nothing is read but the runs."""
        starts = self.starts.copy()
        firsts = self.ptr[:-1][np.diff(self.ptr) > 0]
        starts[firsts] += 1  # the sequence's first token is never a target
        hit = self.store.any_trained(starts, self.starts + self.lengths)
        return np.bincount(self._owners(), weights=hit, minlength=len(self)) > 0

    def select(self, keep: np.ndarray) -> Windows:
        """The sequences ``keep`` (indices or a boolean mask), in that order, as new ``Windows``."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            keep = np.flatnonzero(keep)
        keep = keep.astype(np.int64)
        counts = self.ptr[keep + 1] - self.ptr[keep]
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # piece indices of the kept sequences, end to end: each sequence's first piece plus 0, 1, ...
        pieces = np.repeat(self.ptr[keep] - ptr[:-1], counts) + np.arange(ptr[-1])
        return Windows(self.store, self.starts[pieces], self.lengths[pieces], ptr)

    def head(self, n: int) -> Windows:
        return self.select(np.arange(min(n, len(self))))


class Mixed:
    """Sequence ``i`` is ``parts[part[i]][index[i]]``: a mixture (or concatenation) of sequence collections
    by index, never by copy."""

    def __init__(self, parts: Sequence[Sequence], part: np.ndarray, index: np.ndarray) -> None:
        self.parts = list(parts)
        self.part = np.asarray(part, dtype=np.int32)
        self.index = np.asarray(index, dtype=np.int64)

    @classmethod
    def chain(cls, parts: Sequence[Sequence]) -> Mixed:
        """Every sequence of ``parts``, one collection after the other."""
        sizes = [len(p) for p in parts]
        part = np.repeat(np.arange(len(parts)), sizes)
        index = np.concatenate([np.arange(n) for n in sizes]) if parts else np.zeros(0, dtype=np.int64)
        return cls(parts, part, index)

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.parts[int(self.part[i])][int(self.index[i])]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]
