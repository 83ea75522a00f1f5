"""Data files people have: Parquet, CSV, JSON arrays, globs, `datasets` dirs; ShareGPT, prompt/completion and
`columns=` shapes; and the errors for bad ones (naming `file:line` or `file[row]`)."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esft_lightning.data.constants import IGNORE_INDEX, DataError
from esft_lightning.data.datamodule import ESFTDataModule
from esft_lightning.data.readers import read_records
from esft_lightning.data.sources import Source, tokenize_source
from esft_lightning.data.templates import encode_records
from esft_lightning.data.tokenizer import byte_tokenizer

from .conftest import chat, write_jsonl

TOK = byte_tokenizer()


def rendered(ds, i=0) -> tuple[str, str]:
    """(the whole sequence, its trained tokens) of row ``i`` as text."""
    ids, labels = ds[i]["input_ids"], ds[i]["labels"]
    return TOK.decode(ids), TOK.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_with_a_messages_column_reads_like_jsonl(tmp_path):
    conversations = [
        [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0", "mask": 1}],  # mask on one only
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
    ]
    path = write_parquet(tmp_path / "x.parquet", {"messages": conversations, "id": [7, 8]})
    ds = tokenize_source(path, TOK, tmp_path / "c")
    reference = tokenize_source(write_jsonl(tmp_path / "x.jsonl", [{"messages": m} for m in conversations]), TOK)
    assert ds["input_ids"] == reference["input_ids"] and ds["labels"] == reference["labels"]
    assert rendered(ds, 1) == ("<bos>s\n\nUser: q1\n\nAssistant: a1<eos>", " a1<eos>")
    assert rendered(ds, 0)[1] == ""  # Arrow's null `mask` of the other messages is "no mask", the masked one stays


def test_sharegpt_conversations_become_messages(tmp_path):
    record = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
    }
    path = write_jsonl(tmp_path / "share.jsonl", [record])
    ds = tokenize_source(path, TOK, tmp_path / "c")
    assert rendered(ds) == ("<bos>Be brief.\n\nUser: hi\n\nAssistant: hello<eos>", " hello<eos>")
    ((where, normalized),) = read_records(path)
    assert where == f"{path}:1" and normalized["messages"][1] == {"role": "user", "content": "hi"}


def test_prompt_completion_trains_the_completion_and_eos(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4", "source": "math"}])
    ds = tokenize_source(path, TOK, tmp_path / "c")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert TOK.decode(ids) == "<bos>2+2= 4<eos>"  # plain text, no chat template
    assert ids[0] == TOK.bos_token_id and ids[-1] == TOK.eos_token_id
    n_prompt = 1 + len("2+2=")  # BOS + the prompt's bytes
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    # Not a chat: the tokenizer's chat template (template "model") renders it the same way.
    located = list(read_records(path))
    assert encode_records(located, TOK, "model") == encode_records(located, TOK, "esft") == [(ids, labels)]


def test_json_array_file(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([chat("q0", "a0"), {"text": "plain"}], indent=2))
    ds = tokenize_source(path, TOK, tmp_path / "c")
    assert [rendered(ds, i)[0] for i in range(2)] == ["<bos>User: q0\n\nAssistant: a0<eos>", "<bos>plain<eos>"]
    path.write_text(json.dumps([chat("q", "a"), 3]))
    with pytest.raises(DataError, match=r"arr\.json\[1\]: expected a JSON object, got int"):
        tokenize_source(path, TOK, tmp_path / "c")
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=r"arr\.json:3: malformed JSON"):
        tokenize_source(path, TOK, tmp_path / "c")


def test_a_record_cut_short_at_the_end_of_its_line_names_that_line(tmp_path):
    # The JSON error's position lies past the line's newline; it was reported as the next line (file:4).
    path = tmp_path / "cut.jsonl"
    whole = json.dumps(chat("q", "a"))
    path.write_text(f"{whole}\n{whole}\n{whole[:-5]}\n{whole}\n")
    with pytest.raises(DataError, match=r"cut\.jsonl:3: malformed JSON \(.*, column \d+\)"):
        list(read_records(path))
    path.write_text(f"{whole}\n{whole[:-5]}")  # the last line, with no newline after it
    with pytest.raises(DataError, match=r"cut\.jsonl:2: malformed JSON"):
        list(read_records(path))


def test_csv_with_prompt_completion_or_text_columns(tmp_path):
    path = tmp_path / "pc.csv"
    path.write_text('prompt,completion\n"Say 0123, then NA:"," 0123 NA"\n')
    ds = tokenize_source(path, TOK, tmp_path / "c")
    assert rendered(ds) == ("<bos>Say 0123, then NA: 0123 NA<eos>", " 0123 NA<eos>")  # strings stay strings
    text = tmp_path / "t.csv"
    text.write_text("text,id\nhello world,1\nsecond,2\n")
    assert [rendered(tokenize_source(text, TOK, tmp_path / "c"), i)[0] for i in range(2)] == [
        "<bos>hello world<eos>",
        "<bos>second<eos>",
    ]


def test_csv_chat_column_mapped_by_columns_is_decoded(tmp_path):
    path = tmp_path / "chats.csv"
    chat = '[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]'
    path.write_text(f'dialog,id\n"{chat}",1\n')
    ds = tokenize_source(path, TOK, tmp_path / "c", columns={"messages": "dialog"})
    assert rendered(ds) == ("<bos>User: hi\n\nAssistant: yo<eos>", " yo<eos>")


def test_glob_reads_every_match_and_its_files_key_the_cache(tmp_path):
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data/a.parquet", {"text": ["a0", "a1"]})
    write_parquet(tmp_path / "data/b.parquet", {"text": ["b0"]})
    pattern = str(tmp_path / "data/*.parquet")
    assert [where for where, _ in read_records(pattern, cache_dir=tmp_path / "c")] == [
        f"{tmp_path}/data/a.parquet[0]",
        f"{tmp_path}/data/a.parquet[1]",
        f"{tmp_path}/data/b.parquet[0]",
    ]
    assert len(tokenize_source(pattern, TOK, tmp_path / "c")) == 3
    write_parquet(tmp_path / "data/c.parquet", {"text": ["c0"]})  # a new match: not the cached 3 rows
    assert len(tokenize_source(pattern, TOK, tmp_path / "c")) == 4
    assert Source(pattern).label == "data"
    with pytest.raises(FileNotFoundError, match="no file matches"):
        tokenize_source(str(tmp_path / "data/*.csv"), TOK, tmp_path / "c")


def test_columns_map_other_field_names(tmp_path):
    dialog = write_jsonl(tmp_path / "d.jsonl", [{"dialog": chat("q", "a")["messages"], "text": "ignored"}])
    ds = tokenize_source(dialog, TOK, tmp_path / "c", columns={"messages": "dialog"})
    assert rendered(ds) == ("<bos>User: q\n\nAssistant: a<eos>", " a<eos>")
    qa = write_parquet(tmp_path / "qa.parquet", {"question": ["Q?"], "answer": ["A."], "text": ["other"]})
    unmapped = tokenize_source(qa, TOK, tmp_path / "c")
    mapped = tokenize_source(qa, TOK, tmp_path / "c", columns={"prompt": "question", "completion": "answer"})
    assert rendered(unmapped)[0] == "<bos>other<eos>"  # the columns are part of the cache key
    assert rendered(mapped) == ("<bos>Q?A.<eos>", "A.<eos>")
    with pytest.raises(DataError, match=r"qa\.parquet\[0\]: no field 'q' \(columns maps 'prompt' to it\)"):
        tokenize_source(qa, TOK, tmp_path / "c", columns={"prompt": "q", "completion": "answer"})
    with pytest.raises(ValueError, match="columns maps onto unknown field 'reply'"):
        Source(str(qa), columns={"reply": "answer"})


def test_save_to_disk_dir(tmp_path):
    datasets.Dataset.from_list([chat("q", "a"), chat("q2", "a2")]).save_to_disk(tmp_path / "saved")
    ds = tokenize_source(tmp_path / "saved", TOK, tmp_path / "c")
    assert len(ds) == 2 and rendered(ds, 1) == ("<bos>User: q2\n\nAssistant: a2<eos>", " a2<eos>")


def test_bad_files_and_records_name_where_and_what_was_expected(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(
        DataError, match=r"notes\.txt: unsupported file type '\.txt'.*\.jsonl, \.json, \.parquet, \.csv"
    ):
        tokenize_source(txt, TOK, tmp_path / "c")
    fields = write_parquet(tmp_path / "f.parquet", {"text": ["fine", None], "title": ["x", "y"]})
    with pytest.raises(
        DataError,
        match=r"f\.parquet\[1\]: record needs 'messages'.*'conversations'.*'prompt'.*"
        r"the record has fields \['title'\]",
    ):
        tokenize_source(fields, TOK, tmp_path / "c")
    turns = [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]
    share = write_jsonl(tmp_path / "s.jsonl", [chat("q", "a"), {"conversations": turns}])
    with pytest.raises(
        DataError, match=r"s\.jsonl:2: conversations\[1\] has unknown 'from' 'bot' \(expected one of human"
    ):
        tokenize_source(share, TOK, tmp_path / "c")
    corrupt = tmp_path / "broken.parquet"
    corrupt.write_bytes(b"PAR1\xff\xfe\x00 not really parquet \xe9\xe9")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file") as err:
        tokenize_source(corrupt, TOK, tmp_path / "c")
    assert "UTF-8" not in str(err.value)
    bad_csv = tmp_path / "latin.csv"
    bad_csv.write_bytes(b"text\nfine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.csv:3: not UTF-8 \(byte 0xe9 at column 4\)"):
        tokenize_source(bad_csv, TOK, tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.arrow"))  # nothing half-written into the cache


def test_datamodule_trains_on_a_parquet_source(tmp_path):
    rows = [chat(f"question {i}", f"answer {i}")["messages"] for i in range(24)]
    path = write_parquet(tmp_path / "x.parquet", {"messages": rows})
    dm = ESFTDataModule(task=[Source(str(path))], seq_length=64, batch_size=4, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != IGNORE_INDEX).any()
    assert dm.val_names == ["x"] and len(next(iter(dm.val_dataloader()[0]))["input_ids"]) > 0
