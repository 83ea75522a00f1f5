"""Names the whole data path shares: the label that trains nothing, and the error every bad input raises."""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "DataError"]

IGNORE_INDEX = -100
"""Label of a token that is not trained (prompts, padding, tool results): PyTorch's cross-entropy ignore index."""


class DataError(ValueError):
    """Bad input data. The message names where (``file:line``, ``dir[row]``) and what was expected."""
