"""Property-based tests: arbitrary input to the JSONL reader, the chat template and the expert-config parser
raises nothing but our clear error (naming where), and valid input always round-trips."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from esft_lightning.data.constants import IGNORE_INDEX, DataError
from esft_lightning.data.readers import read_records
from esft_lightning.data.templates import encode_records, tokenize_messages
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.selection.rules import ExpertConfig

# Hypothesis keeps caches in ./.hypothesis: the suite must leave the checkout as it found it.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="esft-hypothesis-"))
TOKENIZER = byte_tokenizer()
SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_subnormal=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["user", "assistant", "system"]) | json_values
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": st.text(max_size=30) | json_values},
        optional={"mask": st.sampled_from([0, 1, True, False]) | json_values},
    )
    | json_values,
    max_size=5,
)
records = st.fixed_dictionaries({"messages": messages}) | st.fixed_dictionaries({"text": st.text() | json_values})


def read_and_encode(path: Path) -> list:
    return encode_records(list(read_records(path)), TOKENIZER)


@SETTINGS
@given(lines=st.lists(st.binary(max_size=60), max_size=6))
def test_jsonl_reader_on_arbitrary_bytes(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        read_and_encode(path)
    except DataError as err:
        assert str(err).startswith(f"{path}:")  # names the file and the line


@SETTINGS
@given(rows=st.lists(records | json_values, max_size=6))
def test_jsonl_reader_on_arbitrary_json(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        pairs = read_and_encode(path)
    except DataError as err:
        assert str(err).startswith(f"{path}:")
        return
    for ids, labels in pairs:
        assert len(ids) == len(labels) and all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=30)},
        optional={"mask": st.sampled_from([0, 1])},
    ),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(conversation=valid_messages)
def test_esft_template_renders_and_masks_exactly(conversation):
    try:
        ids, labels = tokenize_messages(conversation, TOKENIZER)
    except DataError as err:  # only lone surrogates in otherwise valid messages
        assert "not valid Unicode" in str(err)
        return
    parts, trained = ["<bos>"], []
    for m in conversation:
        content = m["content"].strip()
        if m["role"] == "system":
            parts.append(f"{content}\n\n")
        elif m["role"] == "user":
            parts.append(f"User: {content}\n\nAssistant:")
        else:
            parts.append(f" {content}<eos>")
            if m.get("mask", 0) != 1:
                trained.append(f" {content}<eos>")
    assert TOKENIZER.decode(ids) == "".join(parts)
    assert TOKENIZER.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "".join(trained)


@SETTINGS
@given(data=json_values | st.fixed_dictionaries({"experts": json_values}, optional={"shared_experts": json_values}))
def test_expert_config_parser_on_arbitrary_json(data):
    try:
        config = ExpertConfig.from_dict(data, source="cfg.json")
    except ValueError as err:
        assert str(err).startswith("cfg.json: ")
        return
    assert ExpertConfig.from_dict(json.loads(json.dumps(config.to_dict()))).experts == config.experts


@SETTINGS
@given(content=st.binary(max_size=80))
def test_expert_config_file_on_arbitrary_bytes(tmp_path, content):
    path = tmp_path / "expert_cfg.json"
    path.write_bytes(content)
    try:
        ExpertConfig.load(path)
    except ValueError as err:
        assert str(path) in str(err)
