"""Chat templates -> (input_ids, labels): ESFT's own format, or the tokenizer's `apply_chat_template`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from .chat_spans import SpanError, encode_spans, reply_spans
from .constants import IGNORE_INDEX, DataError

Template = Literal["esft", "model"]
ROLES = ("system", "user", "assistant", "tool")  # tool results: never trained
# transformers marks the assistant's tokens through `{% generation %}` blocks in the template (the same test).
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenize_messages(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    where: str = "record",
    template: Template = "esft",
) -> tuple[list[int], list[int]]:
    """One conversation -> (input_ids, labels), labels -100 where not trained.

    ``esft`` (ESFT's template): BOS; each system message ``{content}\\n\\n`` (masked); each user turn
    ``User: {content}\\n\\nAssistant:`` (masked); each assistant turn `` {content}`` + EOS (trained unless the
    message has ``"mask": 1``); contents stripped; encoded without special tokens.
    ``model``: the tokenizer's own chat template; trained tokens are those inside its ``{% generation %}``
    blocks when it has them, else each assistant reply plus its end-of-turn marker found by rendering the chat
    message by message (``chat_spans``; whitespace after the marker, e.g. ChatML's ``\\n``, is not trained).
    Replies with ``"mask": 1`` and ``tool`` messages are never trained.
    """
    return encode_records([(where, {"messages": messages})], tokenizer, template)[0]


def encode_records(
    located: Sequence[tuple[str, Any]], tokenizer: PreTrainedTokenizerBase, template: Template = "esft"
) -> list[tuple[list[int], list[int]]]:
    """(location, record) pairs -> (input_ids, labels) each; records are chats, ``{"prompt", "completion"}``
    (plain text: BOS + prompt untrained, completion + EOS trained, whatever the template) or ``{"text": ...}``."""
    if template not in ("esft", "model"):
        raise ValueError(f"template must be 'esft' or 'model', got {template!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: replies and texts end with it")
    kinds = [_check_record(record, where) for where, record in located]
    out: list[tuple[list[int], list[int]] | None] = [None] * len(located)
    esft = [i for i, kind in enumerate(kinds) if kind != "chat" or template == "esft"]
    if esft:
        segments = [_esft_segments(located[i][1], located[i][0]) for i in esft]
        flat = [text for segs in segments for text, _, _ in segs]
        encoded = _encode_texts(tokenizer, flat)
        start = 0
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        for i, segs in zip(esft, segments):
            out[i] = _assemble(segs, encoded[start : start + len(segs)], bos, tokenizer.eos_token_id)
            start += len(segs)
    chats = [i for i, kind in enumerate(kinds) if kind == "chat" and template == "model"]
    if chats:
        check_template(tokenizer, "model")
        for i, pair in zip(chats, _model_encode([located[i] for i in chats], tokenizer)):
            out[i] = pair
    return out  # type: ignore[return-value]


def check_template(tokenizer: PreTrainedTokenizerBase, template: Template) -> None:
    """Raise before any data is read when ``template`` cannot work with ``tokenizer``."""
    if template == "esft":
        return
    if template != "model":
        raise ValueError(f"template must be 'esft' or 'model', got {template!r}")
    chat_template = model_chat_template(tokenizer)
    if chat_template is None:
        raise ValueError(
            f"data.template is 'model' but tokenizer {tokenizer.name_or_path!r} has no chat template: "
            "use template: esft, or a tokenizer whose tokenizer_config.json has a chat_template"
        )
    if not _GENERATION_MARKER.search(chat_template) and not getattr(tokenizer, "is_fast", False):
        # replies are located by character offsets (chat_spans), which only fast tokenizers report
        raise ValueError(
            f"the chat template of tokenizer {tokenizer.name_or_path!r} has no {{% generation %}} markers and the "
            "tokenizer is not a fast one, so the assistant's tokens cannot be located by character offsets: use "
            "its tokenizer.json (a fast tokenizer), wrap each assistant reply of the template in "
            "{% generation %}...{% endgeneration %}, or use template: esft"
        )


def model_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's default chat template, or None."""
    try:
        return tokenizer.get_chat_template()
    except ValueError:  # transformers: "Cannot use chat template functions because ... no chat template"
        return None


# -- validation -------------------------------------------------------------------------------------
def _check_record(record: Any, where: str) -> str:
    """'chat', 'completion' or 'text'; raises DataError naming ``where`` for anything else."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f"{where}: message {i} must be an object with a string 'content'")
            role = message.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise DataError(f"{where}: message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if message.get("mask", 0) not in (0, 1):  # (True and False compare equal to 1 and 0)
                raise DataError(f"{where}: message {i} has 'mask' {message['mask']!r} (expected 0 or 1)")
            _check_unicode(message["content"], f"{where}: message {i} content")
        return "chat"
    if "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
            _check_unicode(record[key], f"{where}: {key!r}")
        return "completion"
    if isinstance(record.get("text"), str):
        _check_unicode(record["text"], f"{where}: 'text'")
        return "text"
    raise DataError(f"{where}: record needs 'messages' (a chat), 'prompt' and 'completion' strings or a string 'text'")


def _check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON escapes can encode lone surrogates, which no tokenizer takes
        raise DataError(f"{what} is not valid Unicode ({err.reason} at character {err.start})") from None


# -- ESFT's template ----------------------------------------------------------------------------------
def _esft_segments(record: dict[str, Any], where: str) -> list[tuple[str, bool, bool]]:
    """(text, is_reply, trained) per segment of a validated record."""
    if "messages" not in record and "prompt" in record and "completion" in record:
        return [(record["prompt"], False, False), (record["completion"], True, True)]  # plain text, no template
    if "messages" not in record:
        return [(record["text"], True, True)]  # plain text: BOS + text + EOS, all trained
    segments = []
    for i, message in enumerate(record["messages"]):
        role, content = message["role"], message["content"].strip()
        if role == "system":
            segments.append((f"{content}\n\n", False, False))
        elif role == "user":
            segments.append((f"User: {content}\n\nAssistant:", False, False))
        elif role == "tool":
            raise DataError(
                f"{where}: message {i} is a 'tool' message, which ESFT's template has no place for: "
                "use template: model (the tokenizer's chat template)"
            )
        else:
            segments.append((f" {content}", True, message.get("mask", 0) != 1))
    return segments


def esft_prompt_text(messages: Sequence[dict[str, Any]], where: str = "record") -> str:
    """ESFT's template of ``messages`` as text (no BOS/EOS), e.g. the prompt a reply is generated after.

    The same rendering as training uses; messages are validated the same way (``DataError`` naming ``where``).
    """
    record = {"messages": list(messages)}
    _check_record(record, where)
    return "".join(text for text, _, _ in _esft_segments(record, where))


def _assemble(
    segments: list[tuple[str, bool, bool]], encoded: list[list[int]], bos: list[int], eos_id: int
) -> tuple[list[int], list[int]]:
    # Some tokenizers (Qwen's) have no BOS token (``bos`` empty): then the sequence starts with the first turn.
    input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for (_, is_reply, trained), ids in zip(segments, encoded):
        if is_reply:
            ids = [*ids, eos_id]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added. A fast tokenizer's Rust backend is called directly when
    nothing would differ (no truncation, padding or special-token splitting set on it): transformers' wrapper
    converts every encoding in Python, about a quarter of the whole tokenization time on ESFT's train sets."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = backend is not None and backend.truncation is None and backend.padding is None
    if plain and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False)):
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# -- the tokenizer's own template ---------------------------------------------------------------------
def _model_encode(
    located: Sequence[tuple[str, dict[str, Any]]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    conversations = [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for _, r in located]
    if not _GENERATION_MARKER.search(model_chat_template(tokenizer) or ""):
        return _rendered_encode(located, conversations, tokenizer)
    # the template marks its replies itself: that wins over locating them by rendering
    try:
        out = tokenizer.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception:  # a template may refuse a record (e.g. raise_exception on a system role): find which
        for (where, _), conversation in zip(located, conversations):
            try:
                tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)
            except Exception as err:
                raise DataError(f"{where}: the tokenizer's chat template rejected this record: {err}") from None
        raise
    pairs = []
    for (where, record), ids, mask in zip(located, out["input_ids"], out["assistant_masks"]):
        mask = list(mask)
        masked = [m.get("mask", 0) == 1 for m in record["messages"] if m["role"] == "assistant"]
        if any(masked):
            runs = _runs(mask)
            if len(runs) != len(masked):
                raise DataError(
                    f"{where}: 'mask' needs one generation block per assistant reply in the chat template "
                    f"(found {len(runs)} blocks for {len(masked)} replies)"
                )
            for (start, end), drop in zip(runs, masked):
                if drop:
                    mask[start:end] = [0] * (end - start)
        pairs.append((list(ids), [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]))
    return pairs


def _rendered_encode(
    located: Sequence[tuple[str, dict[str, Any]]],
    conversations: list[list[dict[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
) -> list[tuple[list[int], list[int]]]:
    """A template without generation markers: each trained reply located by incremental rendering (chat_spans)."""
    texts, spans = [], []
    for (where, record), conversation in zip(located, conversations):
        trained = [m["role"] == "assistant" and m.get("mask", 0) != 1 for m in record["messages"]]
        try:
            text, text_spans = reply_spans(tokenizer, conversation, trained)
        except SpanError as err:
            raise DataError(f"{where}: {err}") from None
        texts.append(text)
        spans.append(text_spans)
    encoded = encode_spans(tokenizer, texts, spans)
    return [(ids, [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]) for ids, trained in encoded]


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs
