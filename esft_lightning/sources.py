"""Read one data source (ESFT chat JSONL, plain text JSONL or a `datasets` dir) and tokenize it, cached."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from .templates import IGNORE_INDEX, DataError, Template, check_template, encode_records, tokenize_messages

__all__ = ["IGNORE_INDEX", "DataError", "Source", "tokenize_messages", "tokenize_source", "default_cache_dir"]
TEMPLATE_VERSION = "esft-chat-v2"  # bump when the template or record handling changes: invalidates caches


@dataclass
class Source:
    """One dataset in a mixture."""

    path: str
    """A JSONL file (ESFT `{"messages": [...]}` or `{"text": ...}` records) or a `datasets.save_to_disk` dir."""
    weight: float = 1.0
    """Relative share of this source within its group (task or general)."""
    name: str | None = None
    """Name used in logged metrics (`val/<name>/loss`); defaults to the file stem."""
    val_path: str | None = None
    """Explicit validation file; otherwise a seeded share of `path` is held out."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) pairs; location is 'file:line' for JSONL, 'dir[row]' for datasets dirs."""
    if path.is_dir():
        try:
            rows = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a JSONL file or a datasets.save_to_disk directory ({err})") from None
        if isinstance(rows, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict ({list(rows)}); point data.path at one split's directory")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row
        return
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    with path.open("rb") as f:  # bytes, so a bad encoding is reported with its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "JSONL data must be UTF-8 encoded"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: malformed JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{lineno}", record


def tokenize_source(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | os.PathLike | None = None,
    template: Template = "esft",
) -> datasets.Dataset:
    """Tokenize every record of ``path`` with ``datasets.map``; cached on the file's content and tokenizer.

    Returns a dataset with ``input_ids`` and ``labels`` columns. A second call with the same file, tokenizer
    and template memory-maps the cached Arrow file and skips reading and tokenizing. Bad records raise
    ``DataError`` naming the file and line.
    """
    path = Path(path)
    check_template(tokenizer, template)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cache_file = cache / f"{path.stem}-{_fingerprint(path, tokenizer, template)}.arrow"
    if cache_file.exists():
        return datasets.Dataset.from_file(str(cache_file))
    located = list(_records(path))
    if not located:
        raise DataError(f"data source {path} holds no records")
    raw = datasets.Dataset.from_dict({"where": [w for w, _ in located], "record": [json.dumps(r) for _, r in located]})

    def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
        pairs = encode_records(
            [(w, json.loads(r)) for w, r in zip(batch["where"], batch["record"])], tokenizer, template
        )
        return {"input_ids": [ids for ids, _ in pairs], "labels": [labels for _, labels in pairs]}

    tmp_file = cache_file.with_suffix(f".{os.getpid()}.tmp")
    try:
        tokenized = raw.map(
            tokenize_batch,
            batched=True,
            batch_size=512,
            remove_columns=raw.column_names,
            cache_file_name=str(tmp_file),
            desc=f"Tokenizing {path.name}",
        )
        del tokenized
        os.replace(tmp_file, cache_file)  # atomic: an interrupted run never leaves a half-written cache
    finally:
        tmp_file.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(cache_file))


def default_cache_dir() -> Path:
    """$ESFT_CACHE_DIR, else $XDG_CACHE_HOME/esft-lightning (~/.cache/esft-lightning)."""
    base = os.environ.get("ESFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "esft-lightning"
    )
    return Path(base)


def _fingerprint(path: Path, tokenizer: PreTrainedTokenizerBase, template: Template) -> str:
    h = hashlib.sha256(f"{TEMPLATE_VERSION}/{template}".encode())
    if template == "model":
        h.update((tokenizer.get_chat_template() or "").encode())
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    else:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()[:16]
