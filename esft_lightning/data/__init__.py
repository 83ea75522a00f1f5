"""Training data: files read into records, chat templates to labelled tokens, cached token stores, packing, mixing."""

from .constants import IGNORE_INDEX, DataError
from .datamodule import ESFTDataModule
from .sources import Source, tokenize_source
from .templates import tokenize_messages
from .tokenizer import as_tokenizer, byte_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "ESFTDataModule",
    "Source",
    "as_tokenizer",
    "byte_tokenizer",
    "tokenize_messages",
    "tokenize_source",
]
