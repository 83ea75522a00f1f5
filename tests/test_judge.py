"""LLM judge against a stub OpenAI-compatible server on 127.0.0.1: scores, prompts, retries, errors, cache, key
handling, and its wiring into TaskEvalCallback and `esft eval` (no network)."""

from __future__ import annotations

import csv
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from esft_lightning import ESFTDataModule, ESFTModule
from esft_lightning.callbacks import ExpertSelectionCallback, TaskEvalCallback
from esft_lightning.data.sources import Source
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.evaluation.evaluate import evaluate_set, load_eval_set, score
from esft_lightning.evaluation.judge import Judge, JudgeConfig, JudgeError, judge_messages, judge_task_for, parse_score
from esft_lightning.models import build_tiny_model

from .conftest import REPO, chat, write_jsonl

SECRET = "sk-test-7f3a9c-never-on-disk"


class Stub:
    """A chat-completions server: ``script`` answers the next POSTs (an int: that HTTP status; a str: that reply
    text), then ``reply`` (a function of the request's messages) answers the rest. ``requests`` records all."""

    def __init__(self) -> None:
        self.script: list[int | str] = []
        self.reply: Callable[[list[dict[str, str]]], str] = lambda messages: "Score: 7"
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                stub.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers)})
                self._send(200, {"object": "list", "data": [{"id": "stub-judge"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
                step = stub.script.pop(0) if stub.script else stub.reply(body["messages"])
                if isinstance(step, int):
                    self._send(step, {"error": {"message": f"stub status {step}"}})
                    return
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": step}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "POST"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.close()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STUB_JUDGE_KEY", SECRET)
    return "STUB_JUDGE_KEY"


def config(stub: Stub, key: str, tmp_path: Path, **overrides: Any) -> JudgeConfig:
    settings: dict[str, Any] = dict(
        base_url=stub.url, model="stub-judge", api_key_env=key, backoff_seconds=0.001, cache_dir=str(tmp_path / "jc")
    )
    return JudgeConfig(**{**settings, **overrides})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def assert_secret_not_written(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_parse_score_reads_the_verdict_and_rejects_the_rest():
    assert parse_score("Score: 7") == 7
    assert parse_score("The summary misses the fee.\n**Score:** 6.5") == 6.5
    assert parse_score("8") == 8 and parse_score("**9**.") == 9 and parse_score("评分：3") == 3
    assert parse_score("Good, 7/10") == 7 and parse_score("I give it 4 out of 10.") == 4
    assert parse_score("First thought Score: 2, final Score: 5") == 5  # the last verdict wins
    for reply in ("", "Excellent answer!", "Score: 11", "12"):
        with pytest.raises(ValueError):
            parse_score(reply)


def test_each_task_gets_its_own_prompt():
    assert [judge_task_for(n) for n in ("summary", "esft-law", "translation_eval", "intent", "general")] == [
        "summary",
        "law",
        "translation",
        None,
        "generic",
    ]
    texts = {
        task: judge_messages(task, "User: question?\n\nAssistant:", ["ref"], "guess")[1]["content"]
        for task in ("summary", "law", "translation", "generic")
    }
    assert "customer-service conversation" in texts["summary"]
    assert "court's judgment" in texts["law"] and "court fees" in texts["law"]
    assert "translate" in texts["translation"]
    assert len(set(texts.values())) == 4
    for text in texts.values():
        assert "[Question]\nquestion?\n\n" in text and "[Reference answer]\nref" in text and "Score: N" in text
    with pytest.raises(ValueError, match="summary, law, translation, generic"):
        judge_messages("poetry", "q", ["a"], "b")


def test_scores_are_divided_by_ten_and_averaged(stub, key, tmp_path):
    scores = iter(["Score: 9", "Score: 4", "Score: 2"])
    stub.reply = lambda messages: next(scores)
    judge = Judge(config(stub, key, tmp_path, concurrency=1))  # one at a time: the replies arrive in order
    values = judge.rate_many("generic", ["q1", "q2", "q3"], [["a"], ["b"], ["c"]], ["a", "x", "y"])
    assert values == [9, 4, 2]
    metrics = score(["a", "x", "y"], [["a"], ["b"], ["c"]], judge_scores=values)
    assert metrics["judge"] == pytest.approx(0.5) and metrics["exact_match"] == pytest.approx(1 / 3)
    assert "judge" not in score(["a"], [["a"]])


def test_the_prompt_of_the_task_is_sent_with_the_bearer_key(stub, key, tmp_path):
    judge = Judge(config(stub, key, tmp_path))
    for task in ("summary", "law", "translation"):
        judge.rate(task, f"User: a {task} question\n\nAssistant:", ["reference"], "prediction")
    posts = stub.posts()
    assert [p["path"] for p in posts] == ["/v1/chat/completions"] * 3
    assert all(p["headers"]["Authorization"] == f"Bearer {SECRET}" for p in stub.requests)
    assert all(p["body"]["model"] == "stub-judge" and p["body"]["temperature"] == 0.0 for p in posts)
    users = [p["body"]["messages"][1]["content"] for p in posts]
    assert "customer-service" in users[0] and "court" in users[1] and "translate" in users[2]
    assert all("[Model's answer]\nprediction" in u for u in users)
    assert_secret_not_written(tmp_path)


def test_esft_eval_sets_are_judged_with_their_prompts(stub, key, tmp_path, esft_data):
    judge = Judge(config(stub, key, tmp_path))
    for task in ("summary", "law", "translation"):
        samples = load_eval_set(esft_data / "eval" / f"{task}.jsonl", max_samples=2)
        values = judge.rate_many(
            task, [s["prompt"] for s in samples], [s["answers"] for s in samples], [s["answers"][0] for s in samples]
        )
        assert values == [7, 7]
    users = [p["body"]["messages"][1]["content"] for p in stub.posts()]
    assert len(users) == 6
    assert "请总结下面这段客服对话" in users[0] and "customer-service" in users[0]
    assert "请预测以下案件的判决" in users[2] and "court" in users[2]
    assert "Translate Cherokee to English" in users[4] and "\n\nAssistant:" not in users[4]


def test_retries_after_server_errors_and_rate_limits(stub, key, tmp_path):
    stub.script = [500, 429, 503, "Score: 8"]
    judge = Judge(config(stub, key, tmp_path))
    assert judge.rate("generic", "q", ["a"], "a") == 8
    assert len(stub.posts()) == 4
    stub.script = [500] * 3
    with pytest.raises(JudgeError, match=rf"{stub.url}/chat/completions .*after 3 attempts.*HTTP 500"):
        Judge(config(stub, key, tmp_path, max_retries=2)).rate("generic", "q", ["a"], "other")


def test_unparseable_replies_are_asked_again_then_fail_clearly(stub, key, tmp_path):
    stub.script = ["I cannot decide.", "Score: 6"]
    judge = Judge(config(stub, key, tmp_path))
    assert judge.rate("generic", "q", ["a"], "b") == 6
    stub.reply = lambda messages: "A fine answer."
    with pytest.raises(JudgeError, match="stub-judge at .* gave no 0-10 score in 3 replies.*A fine answer"):
        Judge(config(stub, key, tmp_path, max_retries=2)).rate("generic", "q", ["a"], "c")


def test_an_unreachable_endpoint_fails_naming_its_url(key, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = Judge(JudgeConfig(base_url=url, model="m", api_key_env=key, max_retries=1, backoff_seconds=0.001))
    with pytest.raises(JudgeError, match=rf"{url}/models is unreachable .*after 2 attempts"):
        judge.check()
    with pytest.raises(JudgeError, match=url):  # at first use too: an error, never a silent 0
        judge.rate("generic", "q", ["a"], "b")
    assert judge.http_requests == 4


def test_refused_keys_and_missing_variables_are_named(stub, monkeypatch, tmp_path):
    monkeypatch.delenv("STUB_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"\$STUB_JUDGE_KEY, which is not set"):
        Judge(config(stub, "STUB_JUDGE_KEY", tmp_path)).rate("generic", "q", ["a"], "b")
    assert stub.requests == []
    monkeypatch.setenv("STUB_JUDGE_KEY", "wrong")
    stub.script = [401]
    with pytest.raises(JudgeError, match=r"refused the request \(HTTP 401\).*\$STUB_JUDGE_KEY"):
        Judge(config(stub, "STUB_JUDGE_KEY", tmp_path)).rate("generic", "q", ["a"], "b")
    no_auth = Judge(config(stub, None, tmp_path))  # a local server without authentication
    assert no_auth.rate("generic", "q", ["a"], "b") == 7
    assert "Authorization" not in stub.requests[-1]["headers"]


def test_config_takes_a_variable_name_never_a_key():
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        JudgeConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=SECRET)
    with pytest.raises(ValueError, match="http"):
        JudgeConfig(base_url="127.0.0.1:1/v1", model="m")


def test_cached_scores_cost_no_request(stub, key, tmp_path):
    args = ("summary", ["User: q1\n\nAssistant:", "User: q2\n\nAssistant:"], [["a"], ["b"]], ["x", "y"])
    first = Judge(config(stub, key, tmp_path))
    assert first.rate_many(*args) == [7, 7] and first.http_requests == 3  # the /models check + 2 ratings
    stub.reply = lambda messages: "Score: 1"  # a rerun must not see it
    again = Judge(config(stub, key, tmp_path))
    assert again.rate_many(*args) == [7, 7]
    assert again.http_requests == 0 and again.cache_hits == 2 and len(stub.requests) == 3
    # Another judge model, prompt or answer is another key.
    assert Judge(config(stub, key, tmp_path, model="other")).rate_many(*args) == [1, 1]
    assert again.rate_many("generic", *args[1:]) == [1, 1]
    assert again.rate_many("summary", args[1], args[2], ["x", "z"]) == [7, 1]
    entries = [json.loads(p.read_text()) for p in (tmp_path / "jc").rglob("*.json")]
    assert len(entries) == 7 and all(set(e) == {"score", "reply", "model", "task", "prompt_version"} for e in entries)
    assert_secret_not_written(tmp_path)


def test_evaluate_set_adds_the_judge_score_and_per_sample_ratings(stub, key, tmp_path):
    stub.reply = lambda messages: "Score: 10" if "[Model's answer]\n(empty)" in messages[1]["content"] else "Score: 3"
    tokenizer = byte_tokenizer()
    model = build_tiny_model("qwen3_moe", vocab_size=len(tokenizer)).eval()
    samples = [{"prompt": f"User: q{i}\n\nAssistant:", "answers": ["r"]} for i in range(3)]
    judge = Judge(config(stub, key, tmp_path))
    scores, records = evaluate_set(model, tokenizer, samples, 3, judge=judge, judge_task="summary")
    expected = [1.0 if not r["prediction"] else 0.3 for r in records]
    assert [r["judge"] for r in records] == pytest.approx(expected)
    assert scores["judge"] == pytest.approx(sum(expected) / 3)
    plain, plain_records = evaluate_set(model, tokenizer, samples, 3, judge=judge, judge_task=None)
    assert "judge" not in plain and "judge" not in plain_records[0]


def test_task_eval_callback_judges_the_judged_sets(stub, key, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(16)])
    summary = write_jsonl(
        tmp_path / "summary.jsonl",
        [{"prompt": f"User: 请总结 {i}\n\nAssistant:", "answers": [f"总结 {i}"]} for i in range(2)],
    )
    intent = write_jsonl(tmp_path / "intent.jsonl", [{"prompt": "User: q\n\nAssistant:", "answers": ["{}"]}])
    judge = {"base_url": stub.url, "model": "stub-judge", "api_key_env": key, "cache_dir": str(tmp_path / "jc")}
    callback = TaskEvalCallback(
        eval_sets=[
            {"path": str(summary), "name": "summary"},
            {"path": str(intent), "name": "intent"},
            {"path": str(task), "name": "qa", "judge": "law"},
        ],
        max_new_tokens=3,
        max_samples=2,
        judge=judge,
    )
    assert [s["judge"] for s in callback.eval_sets] == ["summary", "none", "law"]
    dm = ESFTDataModule(task=[Source(str(task))], seq_length=32, batch_size=2, general_ratio=0)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[ExpertSelectionCallback(max_tokens=256, plot=False, save_adapter=False), callback],
    )
    trainer.fit(ESFTModule(family="qwen3_moe", optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), dm)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("summary", "qa"):
        assert {float(r[f"eval/{name}/judge"]) for r in rows if r.get(f"eval/{name}/judge")} == {0.7}
    assert "eval/intent/judge" not in rows[0]
    saved = json.loads((Path(logger.log_dir) / "task_eval.json").read_text())
    first = saved["evaluations"][0]["sets"]
    assert first["summary"]["judge"] == {"model": "stub-judge", "prompt": "summary"} and "judge" not in first["intent"]
    assert all(p["judge"] == 0.7 for p in first["summary"]["predictions"])
    users = [p["body"]["messages"][1]["content"] for p in stub.posts()]
    assert sum("customer-service" in u for u in users) >= 2 and sum("court" in u for u in users) >= 2
    assert_secret_not_written(tmp_path)
    with pytest.raises(ValueError, match="judge must be one of"):
        TaskEvalCallback(eval_sets=[{"path": "x.jsonl", "judge": "poetry"}])


def test_esft_eval_judges_caches_and_fails_before_loading_when_unreachable(stub, key, tmp_path):
    from esft_lightning.cli import main

    summary = write_jsonl(
        tmp_path / "summary.jsonl",
        [{"prompt": f"User: 总结 {i}\n\nAssistant:", "answers": [f"r {i}"]} for i in range(2)],
    )
    intent = write_jsonl(tmp_path / "intent.jsonl", [{"prompt": "User: q\n\nAssistant:", "answers": ["{}"]}])
    args = ["eval", "--eval", f"summary={summary}", "--eval", f"intent={intent}", "--max_new_tokens", "4"]
    judge_args = ["--judge_base_url", stub.url, "--judge_model", "stub-judge", "--judge_api_key_env", key]
    main([*args, *judge_args, "--judge_backoff_seconds", "0.001", "--out", str(tmp_path / "a.json")])
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["sets"]["summary"]["scores"]["judge"] == pytest.approx(0.7)
    assert report["sets"]["summary"]["judge"] == {"model": "stub-judge", "prompt": "summary"}
    assert "judge" not in report["sets"]["intent"]["scores"]
    assert len(stub.posts()) == 2 and (tmp_path / "cache" / "judge").is_dir()  # ESFT_CACHE_DIR's judge folder
    main([*args, *judge_args, "--judge_prompt", "intent=generic", "--out", str(tmp_path / "b.json")])
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["sets"]["summary"]["scores"]["judge"] == pytest.approx(0.7)
    assert "judge" in again["sets"]["intent"]["scores"]
    assert len(stub.posts()) == 3  # summary from the cache; only intent, now judged, was asked
    assert_secret_not_written(tmp_path)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    closed = ["--judge_base_url", url, "--judge_model", "m", "--judge_api_key_env", key, "--judge_max_retries", "0"]
    with pytest.raises(JudgeError, match=url):
        main([*args, *closed, "--model", str(tmp_path / "no-such-model")])  # raised before the model loads
    with pytest.raises(SystemExit):
        main([*args, "--judge_base_url", stub.url])  # no --judge_model


def test_judge_config_round_trips_through_print_config(tmp_path, capsys):
    from esft_lightning.cli import main

    cfg = yaml.safe_load((REPO / "configs/deepseek_v2_lite.yaml").read_text())
    evals = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("TaskEvalCallback")]
    assert evals and evals[0]["init_args"]["judge"] is None  # off by default: chrF without an endpoint
    assert evals[0]["init_args"]["eval_sets"] == [{"path": "data/esft/eval/intent.jsonl", "name": "intent"}]
    evals[0]["init_args"]["judge"] = {"base_url": "http://127.0.0.1:9/v1", "model": "judge-m", "api_key_env": "K"}
    (tmp_path / "judged.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "judged.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(printed)
    callbacks = yaml.safe_load(printed)["trainer"]["callbacks"]
    judge = next(c for c in callbacks if c["class_path"].endswith("TaskEvalCallback"))["init_args"]["judge"]
    assert judge["model"] == "judge-m" and judge["api_key_env"] == "K" and judge["max_retries"] == 5


def _rank_worker(rank: int, world: int, folder: str, url: str, closed_url: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        tokenizer = byte_tokenizer()
        model = build_tiny_model("qwen3_moe", seed=0).eval()
        samples = [{"prompt": f"User: q{i}\n\nAssistant:", "answers": ["r"]} for i in range(3)]
        judge = Judge(JudgeConfig(base_url=url, model="m", api_key_env=None, cache_dir=f"{folder}/jc"))
        # Lockstep ("gathered") mode pads rank 1's shard with sample 0: that repeat must not be judged twice.
        scores, records = evaluate_set(model, tokenizer, samples, 2, mode="gathered", judge=judge, judge_task="law")
        unreachable = Judge(JudgeConfig(base_url=closed_url, model="m", api_key_env=None, max_retries=0))
        # One sample: only rank 0 judges (rank 1's shard is padding) and meets the dead endpoint; both must raise.
        try:
            evaluate_set(model, tokenizer, samples[:1], 2, mode="gathered", judge=unreachable, judge_task="law")
            error = ""
        except JudgeError as err:
            error = str(err)
        result = {"scores": scores, "judged": [r["judge"] for r in records], "error": error}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_the_judging_and_its_errors(stub, tmp_path):
    import torch.multiprocessing as mp

    closed = f"http://127.0.0.1:{closed_port()}/v1"
    mp.spawn(_rank_worker, args=(2, str(tmp_path), stub.url, closed), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["judged"] == [0.7] * 3 and results[0]["scores"]["judge"] == pytest.approx(0.7)
    assert len(stub.posts()) == 3  # one rating per sample, whichever rank generated it
    assert closed in results[0]["error"]
