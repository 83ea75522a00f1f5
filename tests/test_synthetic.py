"""Synthetic domains: deterministic from a seed, answers correct and parseable, the shipped files reproducible."""

from __future__ import annotations

import json

import pytest

from esft_lightning.data import synthetic
from esft_lightning.data.templates import tokenize_messages
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.resources.make_synthetic_data import write_all


def test_every_domain_is_deterministic_per_seed_and_split():
    for name in synthetic.DOMAINS:
        first = synthetic.chat_records(name, 20, seed=3)
        assert first == synthetic.chat_records(name, 20, seed=3)
        assert first != synthetic.chat_records(name, 20, seed=4)
        assert synthetic.eval_records(name, 20, seed=3) != synthetic.eval_records(name, 20, seed=3, split="other")


def test_general_answers_are_correct():
    for prompt, answer in synthetic.pairs("arithmetic", 50):
        a, op, b = prompt.removeprefix("Compute ").removesuffix(".").split()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    for prompt, answer in synthetic.pairs("sorting", 50):
        assert answer.split() == [str(n) for n in sorted(int(n) for n in prompt.removeprefix("Sort: ").split())]
    for prompt, answer in synthetic.pairs("reversal", 50):
        assert answer[::-1] == prompt.removeprefix("Reverse: ")
    for prompt, answer in synthetic.pairs("lookup", 50):
        table = dict(kv.split("=") for kv in prompt.removeprefix("Table ").split(". What")[0].split(", "))
        assert table[prompt.rstrip("?")[-1]] == answer


def test_new_tasks_parse_and_differ_from_pretraining_domains():
    for prompt, answer in synthetic.pairs("intent", 50):
        parsed = json.loads(answer)
        assert parsed["intent"] in ("on", "off", "query") and parsed["device"] in prompt and parsed["room"] in prompt
    substitution = {}
    for prompt, answer in synthetic.pairs("cipher", 50):
        plain = prompt.removeprefix("Substitute: ")
        assert len(plain) == len(answer)
        for p, c in zip(plain, answer):
            assert substitution.setdefault(p, c) == c  # one fixed key
    shift3 = {p: chr((ord(p) - ord("a") + 3) % 26 + ord("a")) for p in substitution if p.isalpha()}
    assert sum(substitution[p] == c for p, c in shift3.items()) < len(shift3) // 2  # not the pretrained shift
    for prompt, answer in synthetic.pairs("upper", 20):
        assert answer == prompt.removeprefix("Uppercase: ").upper() and answer.isupper()
    assert set(synthetic.TASK_DOMAINS).isdisjoint(synthetic.GENERAL_DOMAINS)


def test_command_is_intent_with_three_slots_and_a_short_answer():
    lengths = []
    for prompt, answer in synthetic.pairs("command", 200):
        parsed = json.loads(answer)
        assert set(parsed) == {"intent", "device", "room"} and " " not in answer
        assert parsed["device"] in prompt and parsed["room"] in prompt
        action = {"on": "turn on", "off": "turn off", "query": "check"}[parsed["intent"]]
        assert action in prompt
        lengths.append(len(answer.encode()))
    assert max(lengths) <= 55 < min(len(a) for _, a in synthetic.pairs("intent", 50))  # shorter than intent's
    assert set(synthetic.EXTRA_TASKS).isdisjoint(synthetic.TASK_DOMAINS) and "command" in synthetic.DOMAINS
    assert set(synthetic.ALL_TASKS) == {*synthetic.TASK_DOMAINS, *synthetic.EXTRA_TASKS}


def test_lexicon_translates_word_for_word_with_one_fixed_made_up_word_each():
    vocabulary: dict[str, str] = {}
    for prompt, answer in synthetic.pairs("lexicon", 200):
        words, translated = prompt.removeprefix("Translate: ").split(), answer.split()
        assert 1 <= len(words) == len(translated) <= 3
        for word, made_up in zip(words, translated):
            assert vocabulary.setdefault(word, made_up) == made_up and made_up != word
    assert len(set(vocabulary.values())) == len(vocabulary)  # one made-up word per word: a dictionary, no clashes


def test_records_tokenize_with_the_esft_template():
    tokenizer = byte_tokenizer()
    record = synthetic.chat_records("intent", 1)[0]
    ids, labels = tokenize_messages(record["messages"], tokenizer)
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100], skip_special_tokens=True)
    assert trained.strip() == record["messages"][1]["content"]
    prompt = synthetic.eval_records("intent", 1, split="train")[0]["prompt"]
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith(prompt)


def test_shipped_synthetic_files_are_what_the_script_writes(tmp_path):
    from esft_lightning.resources import synthetic_data_path

    for path in write_all(tmp_path):
        assert path.read_text() == synthetic_data_path(path.stem).read_text(), path.name
    with pytest.raises(FileNotFoundError, match="known"):
        synthetic_data_path("nope")
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        synthetic.chat_records("nope", 1)
