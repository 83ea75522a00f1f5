"""Read data files (JSONL, JSON arrays, Parquet, CSV, globs, `datasets` dirs) into records of one known shape."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

from .constants import DataError
from .token_store import default_cache_dir

__all__ = ["SHAPES", "SUFFIXES", "check_columns", "data_files", "normalize", "read_records", "records_of_file"]

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SHAPES = (
    "'messages' (OpenAI/ESFT chat: [{role, content, mask}]), 'conversations' (ShareGPT: [{from, value}]), "
    "'prompt' and 'completion' strings, or a string 'text'"
)
# The fields a record's shape is read from, and what `Source(columns=...)` may map other field names onto.
FIELDS = ("messages", "conversations", "system", "prompt", "completion", "text")
# ShareGPT's `from` -> our role. LLaMA-Factory's tool-use flavour: `function_call` is the assistant calling a
# tool (trained like a reply), `observation` the tool's answer.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
}
_GLOB_CHARS = "*?["


def check_columns(columns: Mapping[str, str] | None, what: str = "columns") -> None:
    """Raise ValueError unless ``columns`` maps known fields (``messages``, ``prompt``, ...) to field names."""
    if columns is None:
        return
    if not isinstance(columns, Mapping):
        raise ValueError(f"{what} must be a mapping like {{messages: dialog}}, got {columns!r}")
    for target, field in columns.items():
        if target not in FIELDS:
            raise ValueError(f"{what} maps onto unknown field {target!r} (expected one of {', '.join(FIELDS)})")
        if not isinstance(field, str) or not field:
            raise ValueError(f"{what}.{target} must be a field name (a string), got {field!r}")


def is_glob(path: str | Path) -> bool:
    return not Path(path).exists() and any(c in str(path) for c in _GLOB_CHARS)


def data_files(path: str | Path) -> list[Path]:
    """The files (or the one ``datasets`` dir) ``path`` names: itself, or a glob's matches in sorted order."""
    if is_glob(path):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"data source {path}: no file matches this pattern")
        return matches
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    return [path]


def read_records(
    path: str | Path, columns: Mapping[str, str] | None = None, cache_dir: str | Path | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, normalized record) pairs of every file ``path`` names (a glob reads each match in turn).

    Locations are ``file:line`` for JSON lines, ``file[row]`` for JSON arrays, Parquet and CSV rows and
    ``dir[row]`` for ``datasets.save_to_disk`` dirs. Records come out as ``{"messages": [...]}``,
    ``{"prompt", "completion"}`` or ``{"text"}`` (see ``normalize``); bad input raises ``DataError`` naming where.
    ``cache_dir``: where ``datasets``' builders keep their lock files (they stream, so they copy nothing).
    """
    check_columns(columns)
    for file in data_files(path):
        for where, record in records_of_file(file, cache_dir):
            yield where, normalize(record, where, columns)


def records_of_file(path: Path, cache_dir: str | Path | None = None) -> Iterator[tuple[str, Any]]:
    """(location, raw row) pairs of one file or ``datasets`` dir, chosen by its extension."""
    if path.is_dir():
        yield from _saved_dataset(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        yield from _json_records(path)
    elif path.suffix.lower() in (".parquet", ".csv"):
        yield from _columnar_records(path, cache_dir)
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; data sources are "
            f"{', '.join(SUFFIXES)} files, a glob of them (data/*.parquet) or a datasets.save_to_disk directory"
        )


def _saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(
            f"{path}: not a JSONL file or a datasets.save_to_disk directory ({err}); for a folder of data files "
            f"use a glob such as {path}/*.parquet"
        ) from None
    if isinstance(rows, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict ({list(rows)}); point data.path at one split's directory")
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    # Parsed here rather than by datasets' "json" builder: pyarrow's JSON reader reports a bad line by byte
    # offset at best (not `file:line`), unifies one schema over all rows (a file mixing chat and text records,
    # or string and list contents, fails or gains nulls) and reads a whole block before the first error.
    with path.open("rb") as f:
        head = f.read(1 << 12).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        yield from _json_array(path)
        return
    with path.open("rb") as f:  # bytes, so a bad encoding is reported with its line
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record = _parse_json(raw, path, lineno, "JSONL")
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{lineno}", record


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    rows = _parse_json(path.read_bytes(), path, 1, "JSON")
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json file holds JSON lines or one array of records, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(row).__name__}")
        yield f"{path}[{i}]", row


def _parse_json(raw: bytes, path: Path, first_line: int, kind: str) -> Any:
    """``raw`` (the lines of ``path`` from ``first_line`` on) as JSON; bad UTF-8 or JSON raise ``DataError`` naming
    ``file:line`` (bytes in, so a bad encoding is reported with its line and column)."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as err:
        line = first_line + raw[: err.start].count(b"\n")
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            f"{kind} data must be UTF-8 encoded"
        ) from None
    except json.JSONDecodeError as err:
        # A record cut short fails past its last character (after the line's newline): report where the text ends.
        end = min(err.pos, len(text.rstrip()))
        line = first_line + text.count("\n", 0, end)
        column = end - (text.rfind("\n", 0, end) + 1) + 1
        raise DataError(f"{path}:{line}: malformed JSON ({err.msg}, column {column})") from None
    except RecursionError:
        raise DataError(f"{path}:{first_line}: malformed JSON (nested too deeply)") from None


def _columnar_records(path: Path, cache_dir: str | Path | None) -> Iterator[tuple[str, Any]]:
    """Parquet and CSV rows through `datasets`' packaged builders, streamed (no Arrow copy in the cache)."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    cache_dir = Path(cache_dir) / "datasets"
    kind = "Parquet" if path.suffix.lower() == ".parquet" else "CSV"
    try:
        with _quiet_datasets():  # (also while the caller holds a row: callers collect the rows in a list)
            if kind == "Parquet":
                rows = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir), streaming=True)
            else:
                # Every column as a string ("0123" stays "0123", "None" and "NA" stay text); empty cells are absent.
                rows = datasets.Dataset.from_csv(
                    str(path),
                    cache_dir=str(cache_dir),
                    streaming=True,
                    features=datasets.Features({name: datasets.Value("string") for name in _csv_header(path)}),
                    keep_default_na=False,
                    na_values=[""],
                )
            for i, row in enumerate(rows):
                yield f"{path}[{i}]", row  # (a chat in a CSV cell is JSON text: `normalize` decodes it)
    except (ValueError, OSError, TypeError, KeyError) as err:  # pyarrow.ArrowInvalid is a ValueError
        if isinstance(err, DataError):
            raise
        if kind == "CSV" and isinstance(err, UnicodeDecodeError):
            raise DataError(_csv_encoding_error(path)) from None
        raise DataError(f"{path}: not a readable {kind} file ({type(err).__name__}: {err})") from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs each unreadable file at ERROR level before raising; the DataError says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _csv_header(path: Path) -> list[str]:
    import csv

    with path.open(encoding="utf-8-sig", newline="") as f:  # (a byte-order mark is not part of the name)
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: an empty CSV file (the first line names the columns)")
    return header


def _csv_encoding_error(path: Path) -> str:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "CSV data must be UTF-8 encoded"
                )
    return f"{path}: not UTF-8; CSV data must be UTF-8 encoded"


def _json_cell(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value  # left as is: validation names the row
    return value


# -- shapes -----------------------------------------------------------------------------------------------
def normalize(record: Any, where: str, columns: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One raw record -> ``{"messages": [...]}``, ``{"prompt", "completion"}`` or ``{"text"}``.

    ``columns`` renames fields first (``{"messages": "dialog"}`` reads ``dialog`` as ``messages``). Fields that
    are null (Parquet and CSV rows have every column) count as absent; ShareGPT ``conversations`` become
    ``messages`` (a top-level ``system`` string becomes a first system message); other fields are dropped.
    The result is validated when it is encoded (``templates.encode_records``).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if columns:
        record = dict(record)
        for target, field in columns.items():
            if field not in record:
                raise DataError(
                    f"{where}: no field {field!r} (columns maps {target!r} to it); the record has {_keys(record)}"
                )
        renamed = {target: record[field] for target, field in columns.items()}
        for field in columns.values():
            record.pop(field, None)
        record.update(renamed)
    record = {k: v for k, v in record.items() if v is not None}
    for chat in ("messages", "conversations"):  # a chat stored as JSON text (a CSV cell), after any renaming
        if chat in record:
            record[chat] = _json_cell(record[chat])
    if "messages" in record:
        return {"messages": _clean_messages(record["messages"])}
    if "conversations" in record:
        return {"messages": _sharegpt(record["conversations"], record.get("system"), where)}
    if "prompt" in record and "completion" in record:
        return {key: _string(record, key, where) for key in ("prompt", "completion")}
    if "text" in record:
        return {"text": _string(record, "text", where)}
    hint = "" if columns else "; map other field names with the source's `columns` (e.g. {prompt: question})"
    raise DataError(f"{where}: record needs {SHAPES}; the record has {_keys(record)}{hint}")


def _string(record: dict, key: str, where: str) -> str:
    if not isinstance(record[key], str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _keys(record: dict) -> str:
    keys = sorted(map(str, record))
    return f"fields {keys[:12]}{' ...' if len(keys) > 12 else ''}" if keys else "no fields"


def _clean_messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages  # validation says what is wrong
    return [
        {k: m[k] for k in ("role", "content", "mask") if m.get(k) is not None} if isinstance(m, dict) else m
        for m in messages
    ]


def _sharegpt(turns: Any, system: Any, where: str) -> list[Any]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "from" not in turn and "role" in turn:
            messages.extend(_clean_messages([turn]))  # {role, content} turns under a ShareGPT key
            continue
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}] has unknown 'from' {turn.get('from')!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        message = {"role": role, "content": turn["value"]}
        if turn.get("mask") is not None:
            message["mask"] = turn["mask"]
        messages.append(message)
    return messages
