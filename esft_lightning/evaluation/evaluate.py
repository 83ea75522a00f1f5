"""Task evaluation: load eval sets, generate greedily in batches (KV cache), score with torchmetrics (and an LLM
judge when one is given)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.text import bleu_score
from torchmetrics.text import CHRFScore, ROUGEScore
from transformers import PreTrainedTokenizerBase

from ..data.templates import esft_prompt_text
from ..distributed.generation import GenerationMode, UnshardPolicy, sharded_generation
from .judge import Judge, JudgeError

__all__ = [
    "EvalSample",
    "ExactMatch",
    "load_eval_set",
    "generate",
    "score",
    "exact_match",
    "sentence_bleu",
    "evaluate_set",
]

EvalSample = dict[str, Any]  # {"prompt": str, "answers": list[str]}
METRICS = ("exact_match", "chrf", "bleu", "rougeL")  # plus "judge" when an LLM judge scores the set


def load_eval_set(path: str | Path, max_samples: int | None = None) -> list[EvalSample]:
    """Eval records from a JSONL file: ESFT's ``{"prompt", "answers"}`` or the project's chat records.

    A chat record ``{"messages": [...]}`` becomes its conversation up to the last assistant turn in ESFT's
    template (``User: ...\\n\\nAssistant:``), with that turn's content as the one reference answer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval set {path} does not exist")
    samples = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            samples.append(_sample(record, where))
            if max_samples is not None and len(samples) >= max_samples:
                break
    if not samples:
        raise ValueError(f"eval set {path} holds no records")
    return samples


def _sample(record: Any, where: str) -> EvalSample:
    if isinstance(record, dict) and "prompt" in record:
        answers = record.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(record["prompt"], str) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(
                f"{where}: an eval record needs a string 'prompt' and a non-empty list of string 'answers'"
            )
        return {"prompt": record["prompt"], "answers": list(answers)}
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        messages = record["messages"]
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise ValueError(f"{where}: a chat eval record must end with an assistant message (the reference)")
        # Rendered exactly as training renders it (earlier replies end in EOS there, which text cannot hold).
        prompt = esft_prompt_text(messages[:-1], where) if len(messages) > 1 else ""
        return {"prompt": prompt, "answers": [last["content"].strip()]}
    raise ValueError(f"{where}: record needs 'prompt' and 'answers' (ESFT eval format) or 'messages' (chat format)")


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (BOS prepended, left padding, KV cache), stopped at EOS, stripped.

    ``synced_gpus``: keep generating until every rank is done (needed when ranks share weights, e.g. FSDP).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("generation needs a tokenizer with a pad token (batches are left-padded)")
    device = next(model.parameters()).device
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [
                bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]
            ]
            width = max(len(ids) for ids in encoded)
            ids_BT = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            mask_BT = torch.zeros_like(ids_BT)
            for row, ids in enumerate(encoded):
                ids_BT[row, width - len(ids) :] = torch.tensor(ids)
                mask_BT[row, width - len(ids) :] = 1
            new_BN = model.generate(
                input_ids=ids_BT.to(device),
                attention_mask=mask_BT.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced_gpus,
            )[:, width:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_BN.cpu(), skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def _normalised(text: str) -> Any:
    """Parsed JSON when ``text`` is a JSON object or array (so key order and spacing do not matter), else text."""
    text = text.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when ``prediction`` equals an answer: as parsed JSON when both parse, else as stripped text."""
    guess = _normalised(prediction)
    return any(guess == _normalised(answer) for answer in answers)


class ExactMatch(Metric):
    """Share of predictions that equal one of their reference answers (JSON compared parsed, see ``exact_match``)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"ExactMatch got {len(preds)} predictions for {len(target)} reference lists")
        self.correct += sum(exact_match(p, answers) for p, answers in zip(preds, target))
        self.total += len(preds)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


def sentence_bleu(prediction: str, answers: Sequence[str], max_n_gram: int = 4) -> float:
    """Smoothed BLEU of one prediction (whitespace tokens) up to ``max_n_gram``-grams, capped at the orders the
    prediction and its longest reference have (a one-word answer is scored on unigrams): an exact match scores 1.

    Why not corpus BLEU-4 (torchmetrics ``BLEUScore(n_gram=4, smooth=True)``): its score is 0 whenever no 4-gram
    matches in the whole corpus, and torchmetrics returns that 0 before its smoothing (Lin & Och's add-one on the
    2..n-gram precisions) applies, so eval sets of answers under 4 words (the quickstart's cipher and upper tasks)
    always scored 0. Averaging over samples also weighs every sample alike, as exact match does. With the same
    torchmetrics function a prediction sharing no n-gram of some order up to the cap still scores 0.
    """
    n_gram = max(1, min(max_n_gram, len(prediction.split()), max(len(a.split()) for a in answers)))
    return float(bleu_score([prediction], [list(answers)], n_gram=n_gram, smooth=True))


def score(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    judge_scores: Sequence[float] | None = None,
) -> dict[str, float]:
    """exact_match, chrf, bleu (sentence BLEU up to 4-grams, smoothed, averaged: see ``sentence_bleu``) and rougeL
    (F-measure) of ``predictions`` against ``answers``; with ``judge_scores`` (an LLM judge's 0-10 rating per
    prediction, see ``evaluation.judge``) also ``judge``: their mean divided by 10, as the ESFT paper reports."""
    preds, target = list(predictions), [list(a) for a in answers]
    rouge = ROUGEScore(rouge_keys=("rougeL",))(preds, target)["rougeL_fmeasure"]
    scores = {
        "exact_match": float(ExactMatch()(preds, target)),
        "chrf": float(CHRFScore()(preds, target)),
        "bleu": sum(sentence_bleu(p, a) for p, a in zip(preds, target)) / max(len(preds), 1),
        "rougeL": float(rouge),
    }
    if judge_scores is not None:
        if len(judge_scores) != len(preds):
            raise ValueError(f"{len(judge_scores)} judge scores for {len(preds)} predictions")
        scores["judge"] = sum(judge_scores) / 10 / max(len(preds), 1)
    return scores


def evaluate_set(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[EvalSample],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    mode: GenerationMode | None = None,
    unshard: UnshardPolicy = "auto",
    judge: Judge | None = None,
    judge_task: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate on ``samples`` and score them; returns (scores, per-sample records).

    ``judge`` and ``judge_task`` (``summary``, ``law``, ``translation`` or ``generic``: the prompt, see
    ``evaluation.judge``): an LLM judge also rates every prediction 0-10 (``judge`` in the scores: the mean / 10;
    each record gets its own ``judge`` / 10). A judge that cannot score raises ``JudgeError`` on every rank.

    Under torch.distributed each rank generates every world_size-th sample and the predictions are
    all-gathered: every rank returns the same scores and records.

    ``mode``: how the model is prepared (``sharded_generation``); None prepares it for this set alone (an
    FSDP2 model is unsharded once when it fits, see ``unshard``). A caller evaluating several sets opens
    ``sharded_generation`` once around all of them and passes its mode. In ``"gathered"`` mode the ranks share
    weights at every forward: shards are padded to equal length and ``generate`` keeps every rank stepping
    until all are done, so each enters the same collectives.
    """
    if mode is None:
        with sharded_generation(model, unshard) as prepared:
            return evaluate_set(
                model, tokenizer, samples, max_new_tokens, batch_size, prepared, judge=judge, judge_task=judge_task
            )
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    lockstep = mode == "gathered" and world > 1
    # Lockstep: equal shards (padding repeats samples) so every rank runs as many batches. Otherwise a rank
    # runs only its own samples and stops at its own EOS.
    end = -(-len(samples) // world) * world if lockstep else len(samples)
    mine = [(i % len(samples)) for i in range(rank, end, world)]
    local = generate(model, tokenizer, [samples[i]["prompt"] for i in mine], max_new_tokens, batch_size, lockstep)
    judging = judge is not None and judge_task is not None
    rated: dict[int, float] = {}
    failure = ""
    if judge is not None and judge_task is not None:
        # Each rank rates the samples it generated (a lockstep shard's padding repeats another rank's sample and
        # is left to that rank): no request is sent twice.
        own = {i: p for i, p in zip(mine, local) if i % world == rank}
        own_ids = sorted(own)
        try:
            values = judge.rate_many(
                judge_task,
                [samples[i]["prompt"] for i in own_ids],
                [samples[i]["answers"] for i in own_ids],
                [own[i] for i in own_ids],
            )
            rated = dict(zip(own_ids, values))
        except JudgeError as err:
            failure = str(err)  # raised below on every rank, so none is left waiting in a collective
    pairs = [(i, p, rated.get(i)) for i, p in zip(mine, local)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (pairs, failure))  # a host sync: once per set
        pairs = [p for part, _ in gathered for p in part]
        failure = next((f for _, f in gathered if f), "")
    if failure:
        raise JudgeError(failure)
    prediction = {i: p for i, p, _ in pairs}  # padding duplicates map to the same sample
    for i, _, value in pairs:
        if value is not None:
            rated[i] = value
    predictions = [prediction[i] for i in range(len(samples))]
    answers = [s["answers"] for s in samples]
    records = [
        {"prompt": s["prompt"], "answers": s["answers"], "prediction": p, "exact_match": exact_match(p, s["answers"])}
        for s, p in zip(samples, predictions)
    ]
    judge_scores = None
    if judging:
        judge_scores = [rated[i] for i in range(len(samples))]
        for record, value in zip(records, judge_scores):
            record["judge"] = value / 10
    return score(predictions, answers, judge_scores), records
