"""Find each assistant reply's tokens under a chat template without `{% generation %}` markers (incremental rendering).

A reply's trained text is what the model must generate at inference: everything the template renders after the
prompt it builds for that reply (``add_generation_prompt=True``) up to the end of the reply as rendered when it
is the last message, so the reply and its end-of-turn marker (``<|im_end|>``, ``<｜end▁of▁sentence｜>``,
``<|return|>``), without the whitespace a template puts after the marker (ChatML's ``\\n``: at inference the
model stops at the marker and never generates it). Both renderings must be prefixes of the whole conversation's
rendering, which is what is tokenized and trained; a template that renders a reply one way as the last message
and another way once later messages follow (it drops the reasoning of earlier turns) is refused, because the
tokens in the sequence are then not the ones the model learns to generate. One such difference is accepted:
only the end marker swapped (GPT-OSS ends the last reply with ``<|return|>``, the same reply in history with
``<|end|>``); that history reply is trained without its marker, since the model is meant to stop on
``<|return|>`` and ``<|end|>`` does not stop generation.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class SpanError(ValueError):
    """A conversation whose replies cannot be located; the message names the message index and why."""


def reply_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], trained: Sequence[bool]
) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as the template renders it, and the ``[start, end)`` characters of each trained reply.

    ``trained[i]`` says whether message ``i`` (an assistant reply) is trained; only those are located, so a
    template that rewrites earlier turns works when those turns are masked (only the last reply trained).
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, train in enumerate(trained):
        if not train:
            continue
        if i == 0:  # transformers refuses to render an empty conversation, so the reply has no prompt to find
            raise SpanError(
                "message 0 is an assistant reply with no message before it, so its prompt cannot be rendered: "
                'start the chat with a system or user message, or mark that reply "mask": 1'
            )
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        if not full.startswith(prompt):
            raise SpanError(
                f"message {i} (assistant): the chat template's generation prompt before this reply is not how it "
                f"renders the reply in the conversation ({_difference(prompt, full)}), so the reply's tokens cannot "
                "be told from the prompt; use a template whose generation prompt starts the assistant turn as "
                "rendered, or add {% generation %} markers to it"
            )
        # rstrip: whitespace after the end marker is the template's separator, not something the model generates
        reply = _render(tokenizer, messages[: i + 1], generation_prompt=False).rstrip()
        end = len(reply) if full.startswith(reply) else _swapped_end_marker(tokenizer, reply, full, len(prompt))
        if end is None:
            raise SpanError(
                f"message {i} (assistant): the chat template is not prefix-stable: it renders this reply one way "
                f"when it is the last message and another once later messages follow ({_difference(reply, full)}), "
                "e.g. it drops the reasoning of earlier turns, so the tokens trained would not be the ones the "
                'model generates; mark the earlier replies "mask": 1 to train only the last one, or use a '
                "template that renders earlier turns unchanged"
            )
        spans.append((len(prompt), max(end, len(prompt))))
    return full, spans


def encode_spans(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]]
) -> list[tuple[list[int], list[bool]]]:
    """Tokenize each text once -> (input_ids, trained) with ``trained`` true for tokens starting inside a span.

    Character offsets of the one tokenization that is trained, rather than token counts of separately tokenized
    prefixes: a prefix can tokenize differently at its cut than the whole text does (a BPE merge across the
    cut, SentencePiece's leading space), which would shift every later label by a token without any error.
    """
    # no special tokens added: the template renders BOS itself, as apply_chat_template(tokenize=True) assumes
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, text_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        starts = [start for start, _ in text_spans]
        trained = []
        for begin, _ in offsets:
            k = bisect.bisect_right(starts, begin) - 1  # the last span starting at or before this token
            trained.append(k >= 0 and begin < text_spans[k][1])
        out.append((list(ids), trained))
    return out


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja errors and templates' raise_exception (e.g. roles must alternate)
        raise SpanError(f"the tokenizer's chat template rejected this record: {err}") from None


def _swapped_end_marker(tokenizer: PreTrainedTokenizerBase, reply: str, full: str, start: int) -> int | None:
    """End of a history reply that differs from its last-message rendering only in the end marker, else None."""
    markers = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)  # added tokens: the only markers
    last = next((m for m in markers if reply.endswith(m)), None)
    if last is None:
        return None
    body = reply[: -len(last)]
    if len(body) < start or not full.startswith(body):
        return None
    return len(body) if any(full.startswith(m, len(body)) for m in markers) else None


def _difference(rendered: str, full: str) -> str:
    """Where two renderings part, for error messages."""
    at = next((i for i, (a, b) in enumerate(zip(rendered, full)) if a != b), min(len(rendered), len(full)))
    return f"at character {at}: {rendered[at : at + 40]!r} alone, {full[at : at + 40]!r} in the whole chat"
