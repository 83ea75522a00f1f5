"""Memory-mapped token stores: windows equal to the in-memory packing they replace (masks included), the smallest
dtype, mixtures by index, resume, tokenizer objects, crash safety and one tokenization for two processes."""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from esft_lightning.data.constants import DataError
from esft_lightning.data.datamodule import ESFTDataModule
from esft_lightning.data.packing import has_target, pack_sequences
from esft_lightning.data.readers import read_records
from esft_lightning.data.sources import Source, tokenize_source
from esft_lightning.data.templates import encode_records
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.data.windows import Mixed

from .conftest import REPO, chat, write_jsonl

TOK = byte_tokenizer()


def varied_records(n: int, seed: int = 0) -> list[dict]:
    """Chats of many lengths, multi-turn and masked ones, prompt-only texts, completions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 4
        q, a = "q" * int(rng.integers(1, 60)), "a" * int(rng.integers(1, 40))
        if kind == 0:
            out.append(chat(q, a))
        elif kind == 1:
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "s" * int(rng.integers(1, 20))},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a, "mask": 1},
                        {"role": "user", "content": q[::2]},
                        {"role": "assistant", "content": a[::2]},
                    ]
                }
            )
        elif kind == 2:
            out.append({"text": "t" * int(rng.integers(1, 80))})
        else:
            out.append({"prompt": q, "completion": a})
    return out


def reference_pack(pairs, indices, seq_length, packing, rng, ratio):
    """The in-memory packing of before the stores (numpy arrays in a list), kept here as the reference."""
    ids = [np.asarray(i, dtype=np.int64) for i, _ in pairs]
    labels = [np.asarray(lab, dtype=np.int64) for _, lab in pairs]
    if packing == "pack":
        sel_ids = np.concatenate([ids[i] for i in indices]) if len(indices) else np.zeros(0, np.int64)
        sel_labels = np.concatenate([labels[i] for i in indices]) if len(indices) else np.zeros(0, np.int64)
        n = max(1, len(sel_ids) // seq_length)
        chunks = [
            (sel_ids[j * seq_length : (j + 1) * seq_length], sel_labels[j * seq_length : (j + 1) * seq_length])
            for j in range(n)
        ]
        return [c for c in chunks if len(c[0]) > 1], 0
    sequences, truncated = [], 0
    for i in indices:
        parts, length = [(ids[i], labels[i])], len(ids[i])
        if ratio > 0 and rng.random() < ratio:
            while True:
                j = int(rng.choice(indices))
                if length + len(ids[j]) > seq_length:
                    break
                parts.append((ids[j], labels[j]))
                length += len(ids[j])
        seq_ids, seq_labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if len(seq_ids) > seq_length:
            truncated += 1
            seq_ids, seq_labels = seq_ids[:seq_length], seq_labels[:seq_length]
        sequences.append((seq_ids, seq_labels))
    return sequences, truncated


@pytest.mark.parametrize(
    "packing, seq_length, ratio",
    [("pack", 16, 0.0), ("pack", 64, 0.0), ("pack", 100000, 0.0), ("pad", 24, 0.0), ("pad", 96, 0.5), ("pad", 64, 1)],
)
def test_windows_equal_the_in_memory_packing_masks_included(tmp_path, packing, seq_length, ratio):
    path = write_jsonl(tmp_path / "v.jsonl", varied_records(700))  # > one 512-record write batch
    store = tokenize_source(path, TOK, tmp_path / "c")
    pairs = encode_records(list(read_records(path)), TOK)
    assert len(store) == len(pairs)
    order = np.random.default_rng(7).permutation(len(pairs))[:650]
    windows, truncated = pack_sequences(store, order, seq_length, packing, np.random.default_rng(3), ratio)
    expected, expected_truncated = reference_pack(pairs, order, seq_length, packing, np.random.default_rng(3), ratio)
    assert truncated == expected_truncated and len(windows) == len(expected)
    for (ids, labels), (want_ids, want_labels) in zip(windows, expected):
        assert ids.dtype == labels.dtype == np.int64
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels, want_labels)  # the trained/untrained mask survives the store
    np.testing.assert_array_equal(windows.has_target(), [has_target(s) for s in expected])
    np.testing.assert_array_equal(windows.sizes(), [len(i) for i, _ in expected])
    kept = windows.select(windows.has_target())
    assert [s[0].tolist() for s in kept] == [s[0].tolist() for s in expected if has_target(s)]


def test_store_is_memory_mapped_in_the_smallest_dtype(tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", varied_records(300))
    store = tokenize_source(path, TOK, tmp_path / "c")
    assert isinstance(store.ids, np.memmap) and store.ids.dtype == np.uint16  # 259 ids
    files = [f for f in store.path.iterdir() if f.is_file()]
    assert sum(f.stat().st_size for f in files) / store.num_tokens < 2.5  # 2 bytes of ids + offsets and runs
    assert store[1] == dict(zip(("input_ids", "labels"), map(list, encode_records(list(read_records(path)), TOK)[1])))
    again = pickle.loads(pickle.dumps(store))  # DataLoader workers reopen it by its path
    assert len(pickle.dumps(store)) < 500 and again["labels"] == store["labels"]


def test_real_vocabularies_store_uint32(tmp_path):
    tok = byte_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(70000)])  # a vocabulary past uint16
    path = write_jsonl(tmp_path / "t.jsonl", [chat("hi <extra_69999>", "yo")])
    store = tokenize_source(path, tok, tmp_path / "c")
    assert store.ids.dtype == np.uint32 and 259 + 69999 in store[0]["input_ids"]


def test_mixture_is_indices_over_the_stores_and_pickles_small(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("A" * 40, "a" * 40) for _ in range(300)])
    g = write_jsonl(tmp_path / "g.jsonl", [{"text": "G" * 300} for _ in range(300)])
    dm = ESFTDataModule(task=[Source(str(a))], general=[Source(str(g))], general_ratio=2.0, seq_length=64, seed=2)
    dm.setup("fit")
    mixed = dm.train_dataset.sequences
    assert isinstance(mixed, Mixed) and len(mixed) == round(len(dm.train_sequences["a"]) * 3)
    general_share = np.mean([mixed.parts[p] is dm.train_sequences["g"] for p in mixed.part])
    assert general_share == pytest.approx(2 / 3, abs=0.01)
    tokens = sum(len(s[0]) for s in mixed)
    assert len(pickle.dumps(dm.train_dataset)) < 4 * tokens  # offsets and indices, not int64 tokens (8 bytes each)
    for source in ("a", "g"):  # per-source validation as before
        assert len(dm.val_sequences[source]) >= 1 and all(has_target(s) for s in dm.val_sequences[source])


def test_resumed_loader_continues_with_the_same_batches(tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", varied_records(400))

    def loader():
        dm = ESFTDataModule(task=[Source(str(path))], seq_length=48, batch_size=4, packing="pad", seed=4)
        dm.setup("fit")
        return dm.train_dataloader()

    whole = [b["input_ids"] for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it)["input_ids"] for _ in range(5)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(head + rest) == len(whole)
    assert all(x.equal(y) for x, y in zip(head + rest, whole))


def test_datamodule_takes_a_tokenizer_object_or_its_directory(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(50)])
    batches = []
    for tokenizer in (tok, str(tmp_path / "tok"), tmp_path / "tok"):
        dm = ESFTDataModule(task=[Source(str(path))], seq_length=32, tokenizer=tokenizer)
        dm.setup("fit")
        batches.append(next(iter(dm.train_dataloader()))["input_ids"])
    assert dm.tokenizer is not tok and ESFTDataModule(task=[Source(str(path))], tokenizer=tok).tokenizer is tok
    assert batches[0].equal(batches[1]) and batches[1].equal(batches[2])


def test_a_failed_or_killed_build_leaves_no_store(tmp_path, monkeypatch):
    import esft_lightning.data.sources as sources

    path = write_jsonl(tmp_path / "v.jsonl", varied_records(1200))
    calls = []

    def failing(batch, *args):
        calls.append(len(batch))
        if len(calls) == 2:
            raise DataError("disk on fire")
        return encode_records(batch, *args)

    monkeypatch.setattr(sources, "encode_records", failing)
    with pytest.raises(DataError, match="disk on fire"):
        tokenize_source(path, TOK, tmp_path / "c")
    assert [f.name for f in (tmp_path / "c").iterdir() if not f.name.endswith(".lock")] == []
    monkeypatch.undo()
    # a builder killed mid-write leaves its temp dir: the next build clears it, then renames a whole store
    store = tokenize_source(path, TOK, tmp_path / "c").path
    shutil.rmtree(store)  # as if that build had never finished
    stale = store.with_name(f".{store.name}.999999.tmp")
    stale.mkdir()
    (stale / "ids.bin").write_bytes(b"\0" * 10)
    again = tokenize_source(path, TOK, tmp_path / "c")
    expected = [ids for ids, _ in encode_records(list(read_records(path)), TOK)]
    assert not stale.exists() and again["input_ids"] == expected


@pytest.mark.slow
def test_two_processes_tokenize_once_and_map_the_same_store(tmp_path):
    """Two ranks of a node set up the same datamodule at once: one tokenizes, the other waits and maps."""
    path = write_jsonl(tmp_path / "v.jsonl", varied_records(3000))
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time, hashlib
            import esft_lightning.data.sources as sources
            from esft_lightning.data.datamodule import ESFTDataModule, Source

            encode = sources.encode_records
            def counted(batch, *args):
                with open({str(tmp_path / "calls")!r}, "a") as f:
                    f.write(os.environ["LOCAL_RANK"] + "\\n")
                time.sleep(0.05)  # slow enough that both processes ask while the store is being built
                return encode(batch, *args)
            sources.encode_records = counted
            dm = ESFTDataModule(task=[Source({str(path)!r})], seq_length=64, cache_dir={str(tmp_path / "c")!r})
            dm.setup("fit")
            batches = [b["input_ids"].numpy().tobytes() for b in dm.train_dataloader()]
            print("DIGEST", hashlib.sha256(b"".join(batches)).hexdigest(), len(batches))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    calls = (tmp_path / "calls").read_text().split()
    assert len(set(calls)) == 1 and len(calls) == math.ceil(3000 / 512)  # one process tokenized, once
    digests = [next(line for line in out.splitlines() if line.startswith("DIGEST")) for out, _ in outs]
    assert digests[0] == digests[1]
    stores = [f for f in (tmp_path / "c").iterdir() if f.suffix == ".tokens"]
    assert len(stores) == 1 and json.loads((stores[0] / "meta.json").read_text())["samples"] == 3000
    assert not list((tmp_path / "c").glob(".*.tmp"))
