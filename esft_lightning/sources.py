"""Read one data source (ESFT chat JSONL, plain text JSONL or a `datasets` dir) and tokenize it, cached."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
TEMPLATE_VERSION = "esft-chat-v1"  # bump when the template or record handling changes: invalidates caches


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


def tokenize_messages(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, where: str = "record"
) -> tuple[list[int], list[int]]:
    """ESFT's chat template for one conversation: (input_ids, labels), labels -100 where not trained.

    BOS; each user turn ``User: {content}\\n\\nAssistant:`` (masked); each assistant turn
    `` {content}`` + EOS (trained unless the message has ``"mask": 1``); contents stripped; encoded
    without special tokens.
    """
    segments = _chat_segments(messages, where)
    encoded = tokenizer([text for text, _, _ in segments], add_special_tokens=False)["input_ids"]
    return _assemble(segments, encoded, tokenizer)


def _chat_segments(messages: Any, where: str) -> list[tuple[str, bool, bool]]:
    """(text, is_assistant, trained) per message, validated."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    segments = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} must be an object with a string 'content'")
        role, content = message.get("role"), message["content"].strip()
        if role == "user":
            segments.append((f"User: {content}\n\nAssistant:", False, False))
        elif role == "assistant":
            segments.append((f" {content}", True, message.get("mask", 0) != 1))
        else:
            raise ValueError(f"{where}: message {i} has unknown role {role!r} (expected 'user' or 'assistant')")
    return segments


def _assemble(
    segments: list[tuple[str, bool, bool]], encoded: list[list[int]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: ESFT's template ends replies with it")
    # Some tokenizers (Qwen's) have no BOS token: then the sequence starts with the first turn.
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for (_, is_assistant, trained), ids in zip(segments, encoded):
        if is_assistant:
            ids = [*ids, tokenizer.eos_token_id]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def _segments_of(record: dict[str, Any], where: str) -> list[tuple[str, bool, bool]]:
    if "messages" in record:
        return _chat_segments(record["messages"], where)
    if isinstance(record.get("text"), str):
        return [(record["text"], True, True)]  # plain text: BOS + text + EOS, all trained
    raise ValueError(f"{where}: record needs 'messages' (ESFT chat format) or a string 'text'")


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) pairs; location is 'file:line' for JSONL, 'dir[row]' for datasets dirs."""
    if path.is_dir():
        for i, row in enumerate(datasets.load_from_disk(str(path))):
            yield f"{path}[{i}]", row
        return
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{lineno}", record


def tokenize_source(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """Tokenize every record of ``path`` with ``datasets.map``; cached on the file's content and tokenizer.

    Returns a dataset with ``input_ids`` and ``labels`` columns. A second call with the same file and
    tokenizer memory-maps the cached Arrow file and skips reading and tokenizing.
    """
    path = Path(path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cache_file = cache / f"{path.stem}-{_fingerprint(path, tokenizer)}.arrow"
    if cache_file.exists():
        return datasets.Dataset.from_file(str(cache_file))
    located = list(_records(path))
    if not located:
        raise ValueError(f"data source {path} holds no records")
    raw = datasets.Dataset.from_dict({"where": [w for w, _ in located], "record": [json.dumps(r) for _, r in located]})

    def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
        segments = [_segments_of(json.loads(r), w) for w, r in zip(batch["where"], batch["record"])]
        flat = [text for segs in segments for text, _, _ in segs]
        encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out: dict[str, list] = {"input_ids": [], "labels": []}
        start = 0
        for segs in segments:
            ids, labels = _assemble(segs, encoded[start : start + len(segs)], tokenizer)
            start += len(segs)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out

    tmp_file = cache_file.with_suffix(f".{os.getpid()}.tmp")
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
    return datasets.Dataset.from_file(str(cache_file))


def default_cache_dir() -> Path:
    """$ESFT_CACHE_DIR, else $XDG_CACHE_HOME/esft-lightning (~/.cache/esft-lightning)."""
    base = os.environ.get("ESFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "esft-lightning"
    )
    return Path(base)


def _fingerprint(path: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256(TEMPLATE_VERSION.encode())
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
