"""One data source (`Source`): its records (read by `readers`) tokenized with a template, cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from .readers import check_columns, data_files, is_glob, read_records
from .templates import IGNORE_INDEX, DataError, Template, check_template, encode_records, tokenize_messages

__all__ = ["IGNORE_INDEX", "DataError", "Source", "tokenize_messages", "tokenize_source", "default_cache_dir"]
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
) -> datasets.Dataset:
    """Tokenize every record of ``path`` with ``datasets.map``; cached on the files' content and tokenizer.

    ``path`` is anything ``Source.path`` takes (a file, a glob, a ``datasets`` dir); ``columns`` as in
    ``Source``. Returns a dataset with ``input_ids`` and ``labels`` columns. A second call with the same
    files, columns, tokenizer and template memory-maps the cached Arrow file and skips reading and
    tokenizing. Bad records raise ``DataError`` naming the file and line (``file:line``) or row (``file[row]``).
    """
    check_columns(columns)
    check_template(tokenizer, template)
    files = data_files(path)
    path = Path(path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", path.stem).strip("_") or "data"
    fingerprint = _fingerprint(files, columns, tokenizer, template)
    cache_file = cache / f"{stem}-{fingerprint}.arrow"
    if cache_file.exists():
        return datasets.Dataset.from_file(str(cache_file))
    located = list(read_records(path, columns, cache))
    if not located:
        raise DataError(f"data source {path} holds no records")
    raw = datasets.Dataset.from_dict({"where": [w for w, _ in located], "record": [_json(w, r) for w, r in located]})

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
            # Our content key, so datasets does not hash the function itself (dill-pickling the tokenizer with
            # it measured 0.5 s of 2.7 s on ESFT's intent + law sets).
            new_fingerprint=fingerprint,
            desc=f"Tokenizing {path.name}",
        )
        del tokenized
        os.replace(tmp_file, cache_file)  # atomic: an interrupted run never leaves a half-written cache
    finally:
        tmp_file.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(cache_file))


def _json(where: str, record: dict) -> str:
    try:
        return json.dumps(record)
    except (TypeError, ValueError) as err:  # e.g. a Parquet binary column mapped onto a message field
        raise DataError(f"{where}: a value of an unexpected type ({err})") from None


def default_cache_dir() -> Path:
    """$ESFT_CACHE_DIR, else $XDG_CACHE_HOME/esft-lightning (~/.cache/esft-lightning)."""
    base = os.environ.get("ESFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "esft-lightning"
    )
    return Path(base)


def _fingerprint(
    files: list[Path], columns: dict[str, str] | None, tokenizer: PreTrainedTokenizerBase, template: Template
) -> str:
    h = hashlib.sha256(f"{TEMPLATE_VERSION}/{template}".encode())
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
