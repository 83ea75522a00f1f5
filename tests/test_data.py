"""Chat template and label masking, bad data errors, mixtures, caching, packing."""

import json

import numpy as np
import pytest

from esft_lightning.data.constants import IGNORE_INDEX
from esft_lightning.data.datamodule import ESFTDataModule
from esft_lightning.data.packing import mixture_counts
from esft_lightning.data.sources import Source, tokenize_source
from esft_lightning.data.templates import tokenize_messages
from esft_lightning.data.tokenizer import byte_tokenizer

from .conftest import chat, write_jsonl


def test_template_and_label_masking():
    tok = byte_tokenizer()
    messages = [
        {"role": "user", "content": "  What is 2+2? "},
        {"role": "assistant", "content": "4", "mask": 1},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": " 6 "},
    ]
    ids, labels = tokenize_messages(messages, tok)
    text = tok.decode(ids)
    assert text == "<bos>User: What is 2+2?\n\nAssistant: 4<eos>User: And 3+3?\n\nAssistant: 6<eos>"
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == " 6<eos>"  # user turns and the masked reply never reach the loss
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


def test_bad_records_name_file_and_line(tmp_path):
    tok = byte_tokenizer()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(chat("a", "b")) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        tokenize_source(bad_json, tok, tmp_path / "c")
    bad_role = write_jsonl(tmp_path / "role.jsonl", [chat("a", "b"), {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"role\.jsonl:2: message 0 has unknown role 'robot'"):
        tokenize_source(bad_role, tok, tmp_path / "c")
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: record needs 'messages'"):
        tokenize_source(no_field, tok, tmp_path / "c")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        tokenize_source(empty, tok, tmp_path / "c")
    # nothing half-written into the cache (only the builders' lock files stay)
    assert not [f for f in (tmp_path / "c").iterdir() if not f.name.endswith(".lock")]


def test_tokenization_is_cached_and_reused(tmp_path, monkeypatch):
    import esft_lightning.data.sources as sources

    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    first = tokenize_source(path, byte_tokenizer(), tmp_path / "cache")
    monkeypatch.setattr(sources, "encode_records", lambda *a, **k: pytest.fail("re-tokenized despite the cache"))
    second = tokenize_source(path, byte_tokenizer(), tmp_path / "cache")
    assert second["input_ids"] == first["input_ids"]
    path.write_text(path.read_text() + json.dumps(chat("new", "row")) + "\n")  # content change: cache miss
    with pytest.raises(pytest.fail.Exception):
        tokenize_source(path, byte_tokenizer(), tmp_path / "cache")


def test_mixture_counts():
    assert mixture_counts([1, 1, 2], 8) == [2, 2, 4]
    assert sum(mixture_counts([0.3, 0.7], 11)) == 11
    for bad in ([0, 0], [-1, 2], []):
        with pytest.raises(ValueError, match="sum to a positive"):
            mixture_counts(bad, 4)


def test_mixture_proportions_follow_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("A" * 40, "a" * 40) for _ in range(200)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("B" * 40, "b" * 40) for _ in range(200)])
    g = write_jsonl(tmp_path / "g.jsonl", [{"text": "G" * 90} for _ in range(200)])
    dm = ESFTDataModule(
        task=[Source(str(a), weight=3), Source(str(b), weight=1)],
        general=[Source(str(g))],
        general_ratio=1.0,
        seq_length=128,
        packing="pad",
        num_train_sequences=400,
        seed=1,
    )
    dm.setup("fit")
    tok = byte_tokenizer()
    firsts = [tok.decode(ids[1:8]) for ids, _ in dm.train_dataset.sequences]
    share = {
        k: sum(f.startswith(p) for f in firsts) / len(firsts)
        for k, p in (("a", "User: A"), ("b", "User: B"), ("g", "GGGGG"))
    }
    assert share == pytest.approx({"a": 0.375, "b": 0.125, "g": 0.5}, abs=0.01)
    assert dm.val_names == ["a", "b", "g"] and len(dm.val_dataloader()) == 3
    task_batches = list(dm.task_dataloader())  # profiling data: task sources only
    assert task_batches and all("G" not in tok.decode(b["input_ids"][0][:8]) for b in task_batches)
    again = ESFTDataModule(
        task=[Source(str(a), weight=3), Source(str(b), weight=1)],
        general=[Source(str(g))],
        seq_length=128,
        packing="pad",
        num_train_sequences=400,
        seed=1,
    )
    again.setup("fit")
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(dm.train_dataset.sequences, again.train_dataset.sequences))


def test_packing_and_truncation(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("x" * 30, "y" * 30) for _ in range(50)])
    dm = ESFTDataModule(task=[Source(str(path))], seq_length=32, packing="pack", val_fraction=0.1)
    dm.setup("fit")
    assert all(len(ids) == 32 for ids, _ in dm.train_dataset.sequences)
    padded = ESFTDataModule(task=[Source(str(path))], seq_length=64, packing="pad")
    with pytest.warns(UserWarning, match="truncated"):
        padded.setup("fit")
    batch = next(iter(padded.train_dataloader()))
    assert batch["input_ids"].shape[1] == 64 and batch["attention_mask"].all()
    cut = ESFTDataModule(task=[Source(str(path))], seq_length=32, packing="pad")  # truncation cuts every reply
    with pytest.raises(ValueError, match="no training sequence with a trained token"), pytest.warns(UserWarning):
        cut.setup("fit")


def test_resumable_sampler_continues_mid_epoch():
    from esft_lightning.data.datamodule import ResumableSampler

    s = ResumableSampler(10, seed=3)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    rest = list(it)
    resumed = ResumableSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert len(resumed) == 10  # Lightning counts the restored batches itself: the epoch length stays whole
    assert list(resumed) == rest and sorted(head + rest) == list(range(10))
    resumed.set_epoch(3)
    assert sorted(resumed) == list(range(10))  # the next epoch is whole again


def test_esft_intent_train_set_tokenizes(esft_data, tmp_path):
    dm = ESFTDataModule(task=[Source(str(esft_data / "train/intent.jsonl"))], seq_length=512, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.train_dataset) > 1000


def test_tokenizer_without_bos_token():
    tok = byte_tokenizer()
    tok.bos_token = None  # like Qwen's tokenizers
    ids, labels = tokenize_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)
    assert tok.decode(ids) == "User: a\n\nAssistant: b<eos>" and None not in ids and len(labels) == len(ids)


def test_bad_mixture_weights_name_the_source(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a")])
    with pytest.raises(ValueError, match=r"data.task\[1\].weight must be a number >= 0"):
        ESFTDataModule(task=[Source(str(path)), Source(str(path), weight=-1)])
    with pytest.raises(ValueError, match="data.general weights must sum to a positive number"):
        ESFTDataModule(task=[Source(str(path))], general=[Source(str(path), weight=0)])


def test_random_concatenation_fills_sequences(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(200)])
    plain = ESFTDataModule(task=[Source(str(path))], seq_length=256, packing="pad")
    plain.setup("fit")
    concat = ESFTDataModule(task=[Source(str(path))], seq_length=256, packing="pad", random_concat_ratio=1.0)
    concat.setup("fit")
    lengths = [len(ids) for ids, _ in concat.train_dataset.sequences]
    assert max(lengths) <= 256 and np.mean(lengths) > 4 * np.mean([len(i) for i, _ in plain.train_dataset.sequences])


@pytest.mark.parametrize("size, world", [(1, 3), (2, 5), (7, 3), (10, 4), (0, 2)])
def test_every_rank_gets_the_same_number_of_indices(size, world):
    from esft_lightning.data.datamodule import ResumableSampler

    for shuffle in (True, False):
        shards = [
            list(ResumableSampler(size, seed=1, shuffle=shuffle, num_replicas=world, rank=r)) for r in range(world)
        ]
        assert len({len(s) for s in shards}) == 1  # equal shares, padded like DistributedSampler
        assert all(len(s) == -(-size // world) for s in shards)
        assert set().union(*shards) == set(range(size))  # every sample is seen on some rank


def test_loader_length_is_equal_on_every_rank_with_more_ranks_than_sequences(tmp_path, monkeypatch):
    """The 3-process crash: one validation sequence, three ranks -> each rank still gets one batch."""
    import torch.distributed as dist

    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(40)])
    dm = ESFTDataModule(task=[Source(str(path))], seq_length=4096, val_fraction=0.05, batch_size=4)
    dm.setup("fit")
    assert len(dm.val_sequences["t"]) == 1  # the held-out samples pack into a single sequence
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    lengths = []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        (val,) = dm.val_dataloader()
        lengths.append(len(val))
        assert len(list(val)) == 1
    assert lengths == [1, 1, 1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_mid_epoch_exactly(tmp_path, num_workers):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(60)])
    dm = ESFTDataModule(task=[Source(str(path))], seq_length=64, packing="pad", batch_size=3, num_workers=num_workers)
    dm.setup("fit")

    def ids(batches):
        return [b["input_ids"].tolist() for b in batches]

    for epoch in (0, 2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        head = [next(it) for _ in range(4)]
        state = loader.state_dict()  # what Lightning checkpoints after the 4th batch (workers prefetched more)
        rest = list(it)
        resumed = dm.train_dataloader()  # a fresh process: fresh loader, sampler at epoch 0
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(epoch)
        assert ids(resumed) == ids(rest)
        assert len(head) + len(rest) == len(loader)
        again = dm.train_dataloader()
        again.sampler.set_epoch(epoch)
        assert ids(again) == ids(head + rest)  # same seed and epoch: same order


@pytest.mark.parametrize(
    "key, value",
    [
        ("seq_length", 1),
        ("batch_size", 0),
        ("val_fraction", 1.0),
        ("random_concat_ratio", 2.0),
        ("general_ratio", -1),
        ("num_workers", -1),
        ("num_train_sequences", 0),
        ("template", "chatml"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, key, value):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("q", "a")])
    with pytest.raises(ValueError, match=rf"data\.{key} must be"):
        ESFTDataModule(task=[Source(str(path))], **{key: value})


def test_folder_that_is_not_a_dataset_is_named(tmp_path):
    from esft_lightning.data.constants import DataError

    (tmp_path / "notdata").mkdir()
    (tmp_path / "notdata/readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notdata: not a JSONL file or a datasets.save_to_disk directory"):
        tokenize_source(tmp_path / "notdata", byte_tokenizer(), tmp_path / "c")


def test_prompt_only_chunks_are_not_trained_on(tmp_path):
    """A packed chunk inside a long prompt trains nothing; a batch of them had a NaN mean loss (0 / 0)."""
    path = write_jsonl(tmp_path / "t.jsonl", [chat("p" * 200, "r") for _ in range(40)])
    dm = ESFTDataModule(task=[Source(str(path))], seq_length=32, packing="pack", val_fraction=0.2)
    dm.setup("fit")
    assert all((labels[1:] != IGNORE_INDEX).any() for _, labels in dm.train_dataset.sequences)
    assert all((labels[1:] != IGNORE_INDEX).any() for _, labels in dm.val_sequences["t"])
    profiled = sum(len(b["input_ids"]) for b in dm.task_dataloader())
    assert profiled > len(dm.train_sequences["t"])  # routing profiling still reads the prompt-only chunks
