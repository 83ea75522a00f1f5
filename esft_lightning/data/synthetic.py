"""Deterministic synthetic domains: general ones (pretraining) and new tasks (fine-tuning), as ESFT records.

Every domain is a function ``rng -> (prompt, answer)``. From a seed, a domain yields the same records on any
machine (Python's ``random.Random`` is stable across platforms and versions for ``random``/``randrange``/
``choice``/``shuffle``). Records come in ESFT's two formats:

- training: ``{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}``
- evaluation: ``{"prompt": "User: {prompt}\\n\\nAssistant:", "answers": [answer]}`` (the eval sets' format)

General domains (``GENERAL_DOMAINS``) are what the embedded model is pretrained on; task domains
(``TASK_DOMAINS``) never appear in pretraining: ``intent`` (a request to a JSON object), ``cipher`` (a fixed
letter substitution, unlike the shift cipher of the general ``caesar`` domain) and ``upper`` (upper-casing).
``EXTRA_TASKS`` are new tasks too, but not shipped as files in ``resources/synthetic/`` (benchmarks/replicate_paper.py
writes its own): ``command`` (intent with three slots and a compact answer, at most 55 bytes) and ``lexicon``
(word-for-word translation into a made-up language).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterator
from pathlib import Path

from .templates import esft_prompt_text

Domain = Callable[[random.Random], tuple[str, str]]

_NOUNS = ["cat", "river", "robot", "garden", "train", "lamp", "teacher", "market", "bird", "window", "boat", "child"]
_ADJECTIVES = ["red", "quiet", "small", "old", "bright", "busy", "green", "tired", "happy", "cold"]
_VERBS = ["sleeps", "waits", "sings", "runs", "glows", "rests", "works", "plays", "shines", "drifts"]
_PLACES = ["in the garden", "near the harbour", "under the bridge", "by the window", "at the market", "on the hill"]
_WORDS = ["apple", "stone", "cloud", "paper", "music", "tiger", "bread", "silver", "ocean", "pencil", "forest"]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    """Add, subtract or multiply small integers."""
    a, b = rng.randrange(100), rng.randrange(100)
    op = rng.choice("+-*")
    if op == "*":
        a, b = a % 20, b % 20
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute {a} {op} {b}.", str(value)


def sorting(rng: random.Random) -> tuple[str, str]:
    """Sort a short list of integers ascending."""
    numbers = [rng.randrange(100) for _ in range(rng.randint(3, 7))]
    return f"Sort: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def reversal(rng: random.Random) -> tuple[str, str]:
    """Reverse a word's letters."""
    word = rng.choice(_WORDS) + rng.choice(["", rng.choice(_WORDS)])
    return f"Reverse: {word}", word[::-1]


def lookup(rng: random.Random) -> tuple[str, str]:
    """Read one key's value from a small key-value table."""
    keys = rng.sample(string.ascii_lowercase, 4)
    values = [rng.randrange(10, 100) for _ in keys]
    key = rng.choice(keys)
    table = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"Table {table}. What is {key}?", str(values[keys.index(key)])


def english(rng: random.Random) -> tuple[str, str]:
    """Turn three words into a template English sentence."""
    noun, adjective, verb, place = rng.choice(_NOUNS), rng.choice(_ADJECTIVES), rng.choice(_VERBS), rng.choice(_PLACES)
    return f"Write a sentence with {noun}, {adjective}, {verb}.", f"The {adjective} {noun} {verb} {place}."


def caesar(rng: random.Random) -> tuple[str, str]:
    """Shift every letter of a word forward by 3 (a Caesar cipher)."""
    word = rng.choice(_WORDS)
    return f"Encode with shift 3: {word}", _translate(word, _shifted(3))


GENERAL_DOMAINS: dict[str, Domain] = {
    "arithmetic": arithmetic,
    "sorting": sorting,
    "reversal": reversal,
    "lookup": lookup,
    "english": english,
    "caesar": caesar,
}

_DEVICES = ["lights", "heater", "fan", "radio", "oven", "blinds", "speaker", "kettle"]
_ROOMS = ["kitchen", "bedroom", "office", "garage", "hall", "bathroom"]
_TIMES = ["now", "at seven", "tonight", "at noon", "in an hour"]
_ACTIONS = {"turn on": "on", "turn off": "off", "check": "query"}
_REQUESTS = ["please {a} the {d} in the {r} {t}", "can you {a} the {r} {d} {t}?", "{a} the {d}, {r}, {t}"]
# A fixed letter substitution (a permutation drawn once from seed 7): nothing like it is in pretraining.
_SUBSTITUTION = "".join(random.Random(7).sample(string.ascii_lowercase, 26))


def intent(rng: random.Random) -> tuple[str, str]:
    """NEW task: a smart-home request to a JSON object with its intent and slots."""
    action, device, room, when = (
        rng.choice(list(_ACTIONS)),
        rng.choice(_DEVICES),
        rng.choice(_ROOMS),
        rng.choice(_TIMES),
    )
    request = rng.choice(_REQUESTS).format(a=action, d=device, r=room, t=when)
    answer = {"intent": _ACTIONS[action], "device": device, "room": room, "time": when}
    return f"To JSON: {request}", json.dumps(answer)


def cipher(rng: random.Random) -> tuple[str, str]:
    """NEW task: encode a word with a fixed letter substitution (a key pretraining never saw)."""
    word = rng.choice(_WORDS) + rng.choice(["", " " + rng.choice(_WORDS)])
    return f"Substitute: {word}", _translate(word, dict(zip(string.ascii_lowercase, _SUBSTITUTION)))


def upper(rng: random.Random) -> tuple[str, str]:
    """NEW task: upper-case a phrase. Capital letters barely occur in pretraining, so their embeddings and LM-head
    rows are nearly untrained: with those frozen (plain ESFT) it learns slowly; a case for ``non_expert_modules``."""
    words = rng.sample(_WORDS, rng.randint(1, 3))
    return f"Uppercase: {' '.join(words)}", " ".join(words).upper()


_COMMANDS = ["please {a} the {d} in the {r}", "can you {a} the {r} {d}?", "{a} the {d}, {r}"]


def command(rng: random.Random) -> tuple[str, str]:
    """NEW task: ``intent`` with fewer slots and a short answer: a smart-home request to a compact JSON object with
    its intent, device and room (no time slot, no spaces; 44-55 bytes, where intent's answers run to 82)."""
    action, device, room = rng.choice(list(_ACTIONS)), rng.choice(_DEVICES), rng.choice(_ROOMS)
    request = rng.choice(_COMMANDS).format(a=action, d=device, r=room)
    answer = {"intent": _ACTIONS[action], "device": device, "room": room}
    return f"Command: {request}", json.dumps(answer, separators=(",", ":"))


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def _made_up_words(seed: int) -> dict[str, str]:
    """A made-up word of 2-3 consonant-vowel syllables for each of ``_WORDS``, drawn from ``seed``."""
    rng = random.Random(seed)
    return {word: _pseudo_word(rng) for word in _WORDS}


_LEXICON = _made_up_words(11)  # fixed: vocabulary pretraining never saw


def lexicon(rng: random.Random) -> tuple[str, str]:
    """NEW task: translate one to three words into a made-up language, word for word. The skill (rewrite the
    words in order, as ``caesar`` and ``reversal`` do) is pretrained; the vocabulary is new knowledge."""
    words = rng.sample(_WORDS, rng.randint(1, 3))
    return f"Translate: {' '.join(words)}", " ".join(_LEXICON[w] for w in words)


TASK_DOMAINS: dict[str, Domain] = {"intent": intent, "cipher": cipher, "upper": upper}
EXTRA_TASKS: dict[str, Domain] = {"command": command, "lexicon": lexicon}
"""New tasks outside ``TASK_DOMAINS``: not written to ``resources/synthetic/`` (its files stay as shipped)."""
ALL_TASKS: dict[str, Domain] = {**TASK_DOMAINS, **EXTRA_TASKS}
DOMAINS: dict[str, Domain] = {**GENERAL_DOMAINS, **ALL_TASKS}


def _shifted(shift: int) -> dict[str, str]:
    letters = string.ascii_lowercase
    return dict(zip(letters, letters[shift:] + letters[:shift]))


def _translate(text: str, table: dict[str, str]) -> str:
    return "".join(table.get(c, c) for c in text)


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def _rng(domain: str, seed: int, split: str) -> random.Random:
    # One stream per (domain, seed, split): adding a domain or a split never changes another's records.
    return random.Random(f"{domain}/{seed}/{split}")


def pairs(domain: str, n: int, seed: int = 0, split: str = "train") -> Iterator[tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``domain``; ``split`` names an independent stream (train, eval, ...)."""
    make, rng = _domain(domain), _rng(domain, seed, split)
    for _ in range(n):
        yield make(rng)


def chat_record(prompt: str, answer: str) -> dict:
    """An ESFT training record."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def eval_record(prompt: str, answer: str) -> dict:
    """An ESFT eval record: the prompt in the chat template up to the reply, the reference answers."""
    return {"prompt": esft_prompt_text([{"role": "user", "content": prompt}]), "answers": [answer]}


def chat_records(domain: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` ESFT training records of ``domain``."""
    return [chat_record(p, a) for p, a in pairs(domain, n, seed, split)]


def eval_records(domain: str, n: int, seed: int = 0, split: str = "eval") -> list[dict]:
    """``n`` ESFT eval records of ``domain`` (by default from a stream disjoint from training's)."""
    return [eval_record(p, a) for p, a in pairs(domain, n, seed, split)]


def mixed_records(domains: list[str], n: int, seed: int = 0, split: str = "train", kind: str = "chat") -> list[dict]:
    """``n`` records spread evenly over ``domains`` and interleaved (``kind``: ``chat`` or ``eval``)."""
    make = chat_records if kind == "chat" else eval_records
    per = [n // len(domains) + (i < n % len(domains)) for i in range(len(domains))]
    streams = [make(d, k, seed, split) for d, k in zip(domains, per)]
    return [r for group in zip(*streams) for r in group] + [r for s in streams for r in s[min(per) :]]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Write records one JSON object a line (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def chat_text(prompt: str, answer: str) -> str:
    """The chat template as one string (without BOS/EOS): what pretraining reads."""
    return esft_prompt_text([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
