"""LLM judge: an OpenAI-compatible chat endpoint rates each generated answer 0-10 against its reference (ESFT's
protocol for summary, law and translation), with retries, a clear error when unreachable, and an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from http.client import HTTPException
from pathlib import Path
from typing import Any

from ..data.token_store import default_cache_dir
from ..files import atomic_write_text

__all__ = [
    "JUDGE_PROMPT_VERSION",
    "JUDGE_TASKS",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "config_help",
    "judge_from_args",
    "judge_messages",
    "judge_task_for",
    "parse_score",
]

# Part of every cache key: bump it when the prompts below change in meaning, so old scores are not reused.
JUDGE_PROMPT_VERSION = 1
JUDGE_TASKS = ("summary", "law", "translation", "generic")
# Eval sets scored by exact match alone (the paper's intent task has one right JSON answer: no judge needed).
EXACT_MATCH_TASKS = ("intent",)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class JudgeError(RuntimeError):
    """The judge could not score: endpoint unreachable, refused, or replies without a 0-10 score."""


@dataclass
class JudgeConfig:
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, Ollama, ...).

    Args:
        base_url: the API root that ``/chat/completions`` is appended to, e.g. ``https://api.openai.com/v1`` or
            ``http://localhost:8000/v1``.
        model: the judge model's name at that endpoint (part of the cache key).
        api_key_env: NAME of the environment variable holding the API key, sent as ``Authorization: Bearer``
            (the key itself never goes in a config file); null for an endpoint without authentication.
        timeout_seconds: per-request timeout.
        max_retries: retries of a request after a 429, a 5xx, a timeout, a connection error or a reply without a
            score, each after an exponentially growing wait.
        backoff_seconds: the first retry's wait; doubled at every further retry (a 429's Retry-After wins when
            longer, up to 60 s).
        max_tokens: reply length limit (the judge is asked for one line, ``Score: N``).
        temperature: sampling temperature of the judge (0: as repeatable as the endpoint allows).
        concurrency: requests in flight at once.
        cache_dir: where scores are cached, one file per (prompt, references, answer, judge model, prompt
            version); default ``$ESFT_CACHE_DIR/judge`` (``~/.cache/esft-lightning/judge``).
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_seconds: float = 60.0
    max_retries: int = 5
    backoff_seconds: float = 1.0
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 4
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.base_url or ""):
            raise ValueError(f"judge base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError("judge model must name the judge model at the endpoint")
        # A key pasted here would end up in saved configs: only a variable's name is accepted.
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(
                "judge api_key_env is the NAME of an environment variable holding the key (e.g. OPENAI_API_KEY), "
                "not the key itself"
            )
        if self.max_retries < 0 or self.backoff_seconds < 0 or self.timeout_seconds <= 0 or self.concurrency < 1:
            raise ValueError(
                "judge max_retries and backoff_seconds must be >= 0, timeout_seconds > 0 and concurrency >= 1"
            )


def config_help() -> dict[str, str]:
    """Each ``JudgeConfig`` field's help (its docstring entry), for command-line flags."""
    try:
        from docstring_parser import parse  # jsonargparse[signatures] installs it
    except ImportError:  # help text only: flags still work
        return {}
    return {p.arg_name: " ".join(p.description.split()) for p in parse(JudgeConfig.__doc__ or "").params}


# The criteria follow the paper's (a 0-10 rating against the reference, with the task's own notion of quality);
# the wording is this project's.
_ROLE = (
    "You are a strict, impartial grader. You compare a model's answer with a reference answer written by an "
    "expert and rate how good the model's answer is on a scale from 0 (useless or wrong) to 10 (as good as the "
    "reference). Judge substance, not style: different wording that means the same thing is fine."
)
_CRITERIA = {
    "summary": (
        "The task: summarise a customer-service conversation in a few sentences.\n"
        "Check, against the reference summary:\n"
        "- the customer's problem or request is stated correctly;\n"
        "- the key facts (amounts, dates, services, what the agent did or promised, the follow-up asked for) are "
        "present and right;\n"
        "- nothing is invented or contradicts the conversation;\n"
        "- it is concise and readable, not a copy of the dialogue.\n"
        "10: every key point of the reference, nothing false. 5: the main issue right but about half of the key "
        "points missing, or one notable error. 0: empty, off-topic, or misstates the customer's issue."
    ),
    "law": (
        "The task: predict a court's judgment from the facts of a case.\n"
        "Check, against the reference judgment:\n"
        "- the outcome is the same (claim granted, partly granted or dismissed; divorce allowed or not; who wins);\n"
        "- each concrete order matches: amounts of money, custody and support, division of property, deadlines, "
        "and who bears the court fees;\n"
        "- no order appears that the reference does not make.\n"
        "10: the same outcome and every order. 5: the right outcome with wrong or missing amounts or orders. "
        "3 or less: the opposite outcome. 0: no judgment at all."
    ),
    "translation": (
        "The task: translate a text into the target language.\n"
        "Check, against the reference translation:\n"
        "- the meaning is preserved: every statement, name and number of the source, nothing left out, nothing "
        "added;\n"
        "- it is fluent, grammatical text in the target language.\n"
        "10: the same meaning as the reference, fluent. 5: the gist right but clauses missing or mistranslated. "
        "0: unrelated, untranslated, or empty."
    ),
    "generic": (
        "Check, against the reference answer:\n"
        "- the answer is correct: its facts and conclusions agree with the reference;\n"
        "- it is complete: nothing the reference needs is missing;\n"
        "- it adds nothing false and does what the question asks.\n"
        "10: as correct and complete as the reference. 5: partly correct or half complete. 0: wrong or empty."
    ),
}
_REPLY_FORMAT = "Reply with one line only, in exactly this form: Score: N (N an integer from 0 to 10)."


def judge_task_for(name: str) -> str | None:
    """The judge prompt for an eval set called ``name``: a judged ESFT task named in it (``summary``, ``law``,
    ``translation``), None for ``intent`` (exact match is its metric), else ``generic``."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    if words & set(EXACT_MATCH_TASKS):
        return None
    return next((task for task in JUDGE_TASKS[:-1] if task in words), "generic")


def _question(prompt: str) -> str:
    # ESFT's prompts are rendered for the model ("User: ...\n\nAssistant:"); the judge reads the request alone.
    text = prompt.strip()
    text = text.removeprefix("User:").strip()
    return text.removesuffix("Assistant:").strip()


def judge_messages(task: str, prompt: str, answers: Sequence[str], prediction: str) -> list[dict[str, str]]:
    """The chat messages asking the judge to rate ``prediction`` for ``prompt`` against ``answers``."""
    if task not in _CRITERIA:
        raise ValueError(f"judge task must be one of {', '.join(JUDGE_TASKS)}, got {task!r}")
    if len(answers) == 1:
        references = f"[Reference answer]\n{answers[0].strip()}"
    else:
        references = "\n\n".join(f"[Reference answer {i}]\n{a.strip()}" for i, a in enumerate(answers, 1))
    user = (
        f"{_CRITERIA[task]}\n\n[Question]\n{_question(prompt)}\n\n{references}\n\n"
        f"[Model's answer]\n{prediction.strip() or '(empty)'}\n\n{_REPLY_FORMAT}"
    )
    return [{"role": "system", "content": _ROLE}, {"role": "user", "content": user}]


_NUMBER = r"(\d+(?:\.\d+)?)"
_PATTERNS = (
    re.compile(rf"(?:score|rating|评分|得分|分数)\s*[:：=]?\s*\**\s*{_NUMBER}", re.IGNORECASE),  # Score: 7
    re.compile(rf"^\W*{_NUMBER}\W*$"),  # a bare number: "7", "**7**", "7."
    re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*10\b", re.IGNORECASE),  # 7/10, 7 out of 10
)


def parse_score(reply: str) -> float:
    """The 0-10 score in a judge's reply (``Score: 7``, ``7``, ``7/10``; the last one when several); ValueError
    when there is none or it is out of range."""
    for pattern in _PATTERNS:
        found = pattern.findall(reply or "")
        if found:
            value = float(found[-1])  # a judge that reasons first states its verdict last
            if 0 <= value <= 10:
                return value
            raise ValueError(f"score {found[-1]} is outside 0-10")
    raise ValueError("no score found")


class Judge:
    """Rates answers through ``config``'s endpoint; scores are cached on disk (a rerun sends nothing).

    ``http_requests`` and ``cache_hits`` count what this instance did (requests include retries).
    """

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        if config.cache_dir:
            self.cache_dir = Path(config.cache_dir)
        else:
            self.cache_dir = default_cache_dir() / "judge"
        self.http_requests = 0
        self.cache_hits = 0
        self._checked = False
        self._lock = threading.Lock()  # requests run in a thread pool; the counter is shared

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]  # a callback holding a judge may be copied or pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        name = self.config.api_key_env
        if name is not None:
            key = os.environ.get(name)
            if not key:
                raise JudgeError(
                    f"the judge at {self.config.base_url} needs an API key in ${name}, which is not set "
                    "(export it, or set judge api_key_env to null for an endpoint without authentication)"
                )
            headers["Authorization"] = f"Bearer {key}"  # read at each request: never stored, never written
        return headers

    def check(self) -> None:
        """Fail now, naming the URL, when the endpoint cannot be reached or refuses the key (GET ``/models``;
        any other HTTP answer, even 404, proves the server is there). Runs once per instance."""
        if self._checked:
            return
        url = self.config.base_url.rstrip("/") + "/models"
        self._request(urllib.request.Request(url, headers=self._headers(), method="GET"), url, accept_status=True)
        self._checked = True

    def _request(self, request: urllib.request.Request, url: str, accept_status: bool = False) -> tuple[int, Any]:
        """Send ``request`` with retries; return (status, parsed JSON or None). ``accept_status``: any HTTP
        status other than 401/403/429/5xx is an answer (for ``check``)."""
        attempts = self.config.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            wait = self.config.backoff_seconds * 2**attempt
            with self._lock:
                self.http_requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_seconds) as response:
                    body = response.read()
                    try:
                        return response.status, json.loads(body) if body else None
                    except json.JSONDecodeError:
                        if accept_status:
                            return response.status, None
                        problem = f"a reply that is not JSON: {body[:200]!r}"
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                if err.code in (401, 403):
                    raise JudgeError(
                        f"the judge endpoint {url} refused the request (HTTP {err.code}): check the API key in "
                        f"${self.config.api_key_env} ({detail})"
                    ) from None
                if err.code != 429 and err.code < 500:
                    if accept_status:
                        return err.code, None
                    raise JudgeError(f"the judge endpoint {url} answered HTTP {err.code}: {detail}") from None
                problem = f"HTTP {err.code} {detail}".strip()
                retry_after = (err.headers or {}).get("Retry-After", "")
                if retry_after.strip().isdigit():  # the server says when: wait that long (within reason)
                    wait = max(wait, min(float(retry_after), 60.0))
            except (urllib.error.URLError, OSError, HTTPException) as err:  # refused, DNS, timeout, reset
                problem = str(getattr(err, "reason", None) or err or type(err).__name__)
            if attempt + 1 < attempts:
                time.sleep(wait)
        raise JudgeError(
            f"the judge endpoint {url} is unreachable or failing after {attempts} attempts: {problem} "
            "(check judge base_url and that the server is up)"
        )

    def _ask(self, messages: list[dict[str, str]]) -> tuple[float, str]:
        """(score, reply) from the endpoint; a reply without a score is asked again, up to max_retries times."""
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        data = json.dumps(body).encode()
        reply = ""
        for _ in range(self.config.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            _, answer = self._request(request, self.url)
            try:
                reply = answer["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                reply = json.dumps(answer)[:300]
                continue
            try:
                return parse_score(reply), reply
            except ValueError:
                continue
        raise JudgeError(
            f"the judge {self.config.model} at {self.url} gave no 0-10 score in {self.config.max_retries + 1} "
            f"replies; the last: {reply[:300]!r}"
        )

    def _cache_file(self, messages: list[dict[str, str]]) -> Path:
        # The messages hold the task's prompt version, the question, the references and the answer.
        key = json.dumps([JUDGE_PROMPT_VERSION, self.config.model, messages], ensure_ascii=False)
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def rate(self, task: str, prompt: str, answers: Sequence[str], prediction: str) -> float:
        """One answer's 0-10 score (cached)."""
        return self.rate_many(task, [prompt], [answers], [prediction])[0]

    def rate_many(
        self,
        task: str,
        prompts: Sequence[str],
        answers: Sequence[Sequence[str]],
        predictions: Sequence[str],
    ) -> list[float]:
        """0-10 scores of ``predictions``: cached ones read, the rest asked ``concurrency`` at a time and cached.

        Raises ``JudgeError`` (naming the URL) when the endpoint cannot score: never a silent 0.
        """

        if not len(prompts) == len(answers) == len(predictions):
            raise ValueError(f"{len(prompts)} prompts, {len(answers)} reference lists, {len(predictions)} answers")
        messages = [judge_messages(task, p, a, x) for p, a, x in zip(prompts, answers, predictions)]
        scores: list[float | None] = [None] * len(messages)
        missing: list[int] = []
        for i, m in enumerate(messages):
            path = self._cache_file(m)
            try:
                scores[i] = float(json.loads(path.read_text(encoding="utf-8"))["score"])
                self.cache_hits += 1
            except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: ask again
                missing.append(i)
        if missing:
            self.check()
            with ThreadPoolExecutor(min(self.config.concurrency, len(missing))) as pool:
                results = list(pool.map(self._ask, [messages[i] for i in missing]))
            for i, (value, reply) in zip(missing, results):
                scores[i] = value
                entry = {"score": value, "reply": reply, "model": self.config.model, "task": task}
                entry["prompt_version"] = JUDGE_PROMPT_VERSION
                atomic_write_text(self._cache_file(messages[i]), json.dumps(entry, ensure_ascii=False))
        assert all(s is not None and math.isfinite(s) for s in scores)
        return [float(s) for s in scores]  # type: ignore[arg-type]


def judge_from_args(values: dict[str, Any]) -> JudgeConfig | None:
    """A ``JudgeConfig`` from ``{field: value}`` (``esft eval``'s ``--judge_*`` flags); None without a base_url."""
    known = {f.name for f in fields(JudgeConfig)}
    given = {k: v for k, v in values.items() if k in known and v is not None}
    if "api_key_env" in values and values["api_key_env"] in ("", "none", "null"):
        given["api_key_env"] = None
    if not given.get("base_url"):
        return None
    if not given.get("model"):
        raise ValueError("--judge_base_url needs --judge_model (the judge model's name at the endpoint)")
    return JudgeConfig(**given)
