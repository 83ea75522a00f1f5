"""Task evaluation: exact match (JSON-aware), eval-set loading, generation, and TaskEvalCallback in a fit."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from esft_lightning import ESFTDataModule, ESFTModule
from esft_lightning.callbacks import ExpertSelectionCallback, TaskEvalCallback
from esft_lightning.data.sources import Source
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.evaluation.evaluate import (
    ExactMatch,
    evaluate_set,
    exact_match,
    generate,
    load_eval_set,
    score,
    sentence_bleu,
)
from esft_lightning.models import build_tiny_model

from .conftest import chat, write_jsonl


def test_exact_match_compares_json_parsed_and_text_stripped():
    assert exact_match('{"a": 1, "b": [2, 3]}', ['{"b":[2,3],"a":1}'])
    assert not exact_match('{"a": 1}', ['{"a": 2}'])
    assert not exact_match('{"a": 1', ['{"a": 1}'])  # unparseable prediction: compared as text
    assert exact_match("  yes ", ["no", "yes"])
    assert not exact_match("Yes", ["yes"])
    metric = ExactMatch()
    metric.update(['{"x": 1}', "b"], [['{ "x" : 1 }'], ["c"]])
    metric.update(["z"], [["z"]])
    assert float(metric.compute()) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metric.update(["a", "b"], [["a"]])


def test_score_reports_every_metric_and_perfect_predictions_score_one():
    answers = [["the red cat sleeps in the garden ."], ['{"intent": "on"}']]
    perfect = score(["the red cat sleeps in the garden .", '{"intent":"on"}'], answers)
    assert set(perfect) == {"exact_match", "chrf", "bleu", "rougeL"}
    assert perfect["exact_match"] == 1.0 and perfect["rougeL"] == pytest.approx(1.0)
    wrong = score(["a dog", "{}"], answers)
    assert wrong["exact_match"] == 0.0 and wrong["chrf"] < perfect["chrf"] and wrong["rougeL"] < 0.5
    # BLEU compares text (no JSON parsing): the respaced JSON answer scores 0, the sentence 1, averaged: 0.5.
    assert perfect["bleu"] == pytest.approx(0.5) and wrong["bleu"] == 0.0


def test_bleu_scores_short_answers():
    # Corpus BLEU-4 (torchmetrics BLEUScore(n_gram=4, smooth=True)) was 0.0 here: no answer has a 4-gram.
    answers = [["GRWW"], ["GRWW XKZ"]] * 5
    assert score(["GRWW", "GRWW XKZ"] * 5, answers)["bleu"] == pytest.approx(1.0)
    assert sentence_bleu("GRWW", ["GRWW"]) == 1.0 and sentence_bleu("XKZ GRWW", ["XKZ GRWW", "Q"]) == 1.0
    assert 0 < sentence_bleu("GRWW", ["GRWW XKZ"]) < 1  # right word, too short: brevity penalty
    assert sentence_bleu("GRWX", ["GRWW"]) == 0.0
    cipher = score(["GRWW"] * 9 + ["GRWX"], [["GRWW"]] * 10)  # the quickstart's case: exact match 0.9
    assert cipher["exact_match"] == pytest.approx(0.9) and cipher["bleu"] == pytest.approx(0.9)


def test_load_eval_set_reads_both_formats_and_names_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "User: hi\n\nAssistant:", "answers": ["yo"]}, chat("q", "a")])
    samples = load_eval_set(path)
    assert samples[1] == {"prompt": "User: q\n\nAssistant:", "answers": ["a"]}
    assert len(load_eval_set(path, max_samples=1)) == 1
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answers": ["y"]}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_eval_set(tmp_path / "bad.jsonl")


def test_batched_left_padded_generation_equals_one_by_one():
    tokenizer = byte_tokenizer()
    model = build_tiny_model("qwen3_moe", vocab_size=len(tokenizer)).eval()
    prompts = ["User: a\n\nAssistant:", "User: a much longer prompt here\n\nAssistant:"]
    together = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert any(together)  # a random model does not stop at once
    scores, records = evaluate_set(model, tokenizer, [{"prompt": p, "answers": ["x"]} for p in prompts], 6)
    assert [r["prediction"] for r in records] == together and set(scores) >= {"exact_match", "chrf"}


def test_task_eval_callback_logs_before_and_after_a_one_step_fit(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(16)])
    evals = write_jsonl(
        tmp_path / "intent.jsonl",
        [{"prompt": f"User: question {i}\n\nAssistant:", "answers": [f"answer {i}"]} for i in range(3)],
    )
    dm = ESFTDataModule(task=[Source(str(task))], seq_length=32, batch_size=2, general_ratio=0)
    callback = TaskEvalCallback(
        eval_sets=[{"path": str(evals), "name": "intent"}, {"path": str(task)}], max_new_tokens=3, max_samples=2
    )
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[ExpertSelectionCallback(max_tokens=256, plot=False, save_adapter=False), callback],
    )
    trainer.fit(ESFTModule(family="qwen3_moe", optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), dm)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("intent", "task"):
        for metric in ("exact_match", "chrf", "bleu", "rougeL"):
            steps = {int(r["step"]) for r in rows if r.get(f"eval/{name}/{metric}")}
            assert steps == {0, 1}, (name, metric, steps)
    saved = json.loads((tmp_path / "logs" / "version_0" / "task_eval.json").read_text())
    assert [e["step"] for e in saved["evaluations"]] == [0, 1]
    first = saved["evaluations"][0]["sets"]["intent"]
    assert len(first["predictions"]) == 2 and first["predictions"][0]["answers"] == ["answer 0"]
    assert set(first["scores"]) == {"exact_match", "chrf", "bleu", "rougeL"}


def test_task_eval_callback_rejects_bad_eval_sets(tmp_path):
    with pytest.raises(ValueError, match="needs at least one"):
        TaskEvalCallback(eval_sets=[])
    with pytest.raises(ValueError, match="distinct"):
        TaskEvalCallback(eval_sets=[{"path": "a/x.jsonl"}, {"path": "b/x.jsonl"}])


def test_task_eval_callback_scores_the_final_model_without_validation(tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(16)])
    dm = ESFTDataModule(task=[Source(str(task))], seq_length=32, batch_size=2, general_ratio=0)
    callback = TaskEvalCallback(eval_sets=[{"path": str(task), "name": "qa"}], max_new_tokens=2, max_samples=2)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[ExpertSelectionCallback(max_tokens=256, plot=False, save_adapter=False), callback],
    )
    module = ESFTModule(family="qwen3_moe")
    trainer.fit(module, dm)
    assert [e["step"] for e in callback.history] == [0, 2]
    trainer.test(module, dm)
    assert [e["step"] for e in callback.history] == [0, 2, 2]
    saved = json.loads((tmp_path / "logs" / "version_0" / "task_eval.json").read_text())
    assert len(saved["evaluations"]) == 3


def test_esft_eval_applies_an_adapter(tmp_path):
    from esft_lightning.adapters import save_adapter
    from esft_lightning.cli import main
    from esft_lightning.experts.split import apply_expert_config
    from esft_lightning.resources import synthetic_data_path
    from esft_lightning.selection.rules import ExpertConfig

    model = ESFTModule(model="embedded").build_model()
    apply_expert_config(model, ExpertConfig(experts={layer: list(range(32)) for layer in range(4)}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # a destroyed adapter: its predictions must differ from the base model's
    save_adapter(model, tmp_path / "adapter")
    args = ["eval", "--eval", f"general={synthetic_data_path('general_eval')}", "--max_samples", "4"]
    main([*args, "--max_new_tokens", "6", "--out", str(tmp_path / "base.json")])
    main([*args, "--max_new_tokens", "6", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "ad.json")])
    base, adapted = (json.loads((tmp_path / f).read_text())["sets"]["general"] for f in ("base.json", "ad.json"))
    assert [p["prediction"] for p in base["predictions"]] != [p["prediction"] for p in adapted["predictions"]]
    assert base["scores"]["chrf"] > adapted["scores"]["chrf"]


def test_esft_eval_sets_load_and_their_json_answers_match_reformatted(esft_data):
    samples = load_eval_set(esft_data / "eval" / "intent.jsonl", max_samples=20)
    assert all(s["prompt"].endswith("Assistant:") for s in samples)
    for s in samples:
        compact = json.dumps(json.loads(s["answers"][0]), separators=(",", ":"), ensure_ascii=True)
        assert compact != s["answers"][0] and exact_match(compact, s["answers"])
    assert len(load_eval_set(esft_data / "eval" / "translation.jsonl", max_samples=3)) == 3


def test_chat_eval_records_render_their_prompt_as_training_does(tmp_path):
    from esft_lightning.evaluation.evaluate import load_eval_set

    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    assert load_eval_set(path) == [{"prompt": "Be brief.\n\nUser: 2+2?\n\nAssistant:", "answers": ["4"]}]
