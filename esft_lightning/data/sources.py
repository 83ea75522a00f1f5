"""One data source (`Source`): its records (read by `readers`) tokenized with a template into a cached token store."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .constants import DataError
from .readers import check_columns, data_files, is_glob, read_records
from .store_build import EmptySource, build_store
from .templates import Template, check_template, encode_records
from .token_store import FORMAT as STORE_FORMAT
from .token_store import TokenStore, default_cache_dir

__all__ = ["Source", "tokenize_source"]
TEMPLATE_VERSION = "esft-chat-v3"  # bump when the template or record handling changes: invalidates caches


@dataclass
class Source:
    """One dataset in a mixture."""

    path: str
    """A `.jsonl` / `.json` (JSON lines or an array), `.parquet` or `.csv` file, a glob of them
    (`data/train-*.parquet`) or a `datasets.save_to_disk` dir. Records are chats (`messages`: [{role, content,
    mask}]), ShareGPT chats (`conversations`: [{from, value}]), `prompt` + `completion` pairs or `text`."""
    weight: float = 1.0
    """Relative share of this source within its group (task or general)."""
    name: str | None = None
    """Name used in logged metrics (`val/<name>/loss`); defaults to the file stem."""
    val_path: str | None = None
    """Explicit validation file; otherwise a seeded share of `path` is held out."""
    columns: dict[str, str] | None = None
    """Other field names read as the known ones, e.g. `{messages: dialog}` or `{prompt: question, completion:
    answer}` (keys: messages, conversations, system, prompt, completion, text)."""

    def __post_init__(self) -> None:
        check_columns(self.columns, f"data source {self.path}: columns")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if is_glob(self.path):  # data/train-*.parquet -> train, data/*.parquet -> data
            return re.sub(r"[*?\[\]]", "", Path(self.path).stem).strip("-_. ") or Path(self.path).parent.name or "data"
        return Path(self.path).stem


def tokenize_source(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | os.PathLike | None = None,
    template: Template = "esft",
    columns: dict[str, str] | None = None,
) -> TokenStore:
    """Tokenize every record of ``path`` into a memory-mapped ``TokenStore``, cached on the files and tokenizer.

    ``path`` is anything ``Source.path`` takes (a file, a glob, a ``datasets`` dir); ``columns`` as in
    ``Source``. The records are read and tokenized in batches as a stream, written to the cache as they go (host
    memory does not grow with the file). A second call with the same files, columns, tokenizer and template
    maps the cached store and skips reading and tokenizing; processes asking at once tokenize it once (see
    ``store_build.build_store``). Bad records raise ``DataError`` naming the file and line (``file:line``) or
    row (``file[row]``), and leave nothing in the cache.
    """
    check_columns(columns)
    check_template(tokenizer, template)
    files = data_files(path)
    path = Path(path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", path.stem).strip("_") or "data"
    target = cache / f"{stem}-{_fingerprint(files, columns, tokenizer, template)}.tokens"

    def records() -> Iterator[tuple[str, dict]]:
        # Through JSON and back, as the records went through an Arrow column before: the same values reach the
        # template (tuples as lists, ...), and a value JSON cannot hold is a DataError naming its row.
        for where, record in read_records(path, columns, cache):
            yield where, json.loads(_json(where, record))

    try:
        return build_store(
            target,
            records,
            lambda batch: encode_records(batch, tokenizer, template),
            vocab_size=max(len(tokenizer), tokenizer.vocab_size or 0),
            desc=f"Tokenizing {path.name}",
        )
    except EmptySource:
        raise DataError(f"data source {path} holds no records") from None


def _json(where: str, record: dict) -> str:
    try:
        return json.dumps(record)
    except (TypeError, ValueError) as err:  # e.g. a Parquet binary column mapped onto a message field
        raise DataError(f"{where}: a value of an unexpected type ({err})") from None


def _fingerprint(
    files: list[Path], columns: dict[str, str] | None, tokenizer: PreTrainedTokenizerBase, template: Template
) -> str:
    h = hashlib.sha256(f"{TEMPLATE_VERSION}/{STORE_FORMAT}/{template}".encode())
    h.update(json.dumps(sorted((columns or {}).items())).encode())
    if template == "model":
        h.update((tokenizer.get_chat_template() or "").encode())
    for path in files:  # a glob's matches (sorted), each named: adding, removing or renaming one is a miss
        h.update(f"\0{path.name}\0".encode())
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
        else:
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    h.update(chunk)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()[:16]
