"""TaskEvalCallback: generate on eval sets before training and at every validation; log and save the scores."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from ..distributed.generation import UnshardPolicy, sharded_generation
from ..evaluation.evaluate import EvalSample, evaluate_set, load_eval_set
from ..evaluation.judge import JUDGE_TASKS, Judge, JudgeConfig, judge_task_for
from ..files import atomic_write_text
from .context import find_tokenizer, moe_model


class TaskEvalCallback(L.Callback):
    """Task metrics from greedy generation, at fit start (step 0), at the end of every validation in fit, when
    training ends after the last validation, and at the end of a test run (``esft test``).

    Logs ``eval/<name>/<metric>`` (exact_match, chrf, bleu, rougeL, and judge for the sets an LLM judge rates)
    through the trainer's loggers (so a CSVLogger puts them in metrics.csv, at the current global step) and writes
    every evaluation's scores and predictions to ``<log_dir>/task_eval.json`` (rewritten atomically after each
    evaluation).

    Args:
        eval_sets: ``[{"path": ..., "name": ..., "judge": ...}]``: JSONL files in ESFT's eval format (``{"prompt",
            "answers"}``) or the project's chat format (the last assistant turn is the reference). ``judge``
            (optional) is the judge prompt for the set: ``summary``, ``law``, ``translation``, ``generic`` or
            ``none`` (not judged); by default the task the name contains (``summary``, ``law``, ``translation``),
            ``none`` for ``intent`` (exact match is its metric, as in the paper), ``generic`` otherwise.
        max_new_tokens: generation length limit.
        batch_size: prompts generated together (left-padded).
        max_samples: first samples of each set to evaluate (None: all).
        filename: the predictions file in the log dir.
        tokenizer: tokenizer (or its directory) to generate with; default the datamodule's, else the module's.
        model_attr: the attribute (dotted path) of the LightningModule holding the model, when it holds several
            MoE models (default: the one found by structure).
        fsdp_unshard: under FSDP2, ``auto`` gathers the whole model once per evaluation when it fits the
            device's free memory (no all-gather per new token) and else gathers per layer at every forward;
            ``always``/``never`` skip the memory check. See ``esft_lightning.distributed.sharded_generation``.
        judge: an LLM judge (any OpenAI-compatible chat endpoint, see ``esft_lightning.evaluation.JudgeConfig``) that
            rates each prediction 0-10 against its reference: ``eval/<name>/judge`` is the mean / 10, the ESFT
            paper's metric for summary, law and translation. None (default): no judge, chrF and the rest only.
            Scores are cached on disk, so re-evaluating unchanged predictions sends no request.

    Several ranks share the work: each generates its share of every set and the predictions are
    all-gathered (see ``evaluate_set``); rank 0's loggers record the scores and rank 0 writes the file.
    """

    def __init__(
        self,
        eval_sets: list[dict[str, str]],
        max_new_tokens: int = 64,
        batch_size: int = 16,
        max_samples: int | None = 64,
        filename: str = "task_eval.json",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        model_attr: str | None = None,
        fsdp_unshard: UnshardPolicy = "auto",
        judge: JudgeConfig | None = None,
    ) -> None:
        if not eval_sets:
            raise ValueError("TaskEvalCallback needs at least one eval set ({path, name})")
        self.eval_sets: list[dict[str, str]] = []
        for i, spec in enumerate(eval_sets):
            if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
                raise ValueError(
                    f"TaskEvalCallback eval_sets[{i}] needs a 'path' (and optionally a 'name'), got {spec!r}"
                )
            name = spec.get("name") or Path(spec["path"]).stem
            task = spec.get("judge") or (judge_task_for(name) or "none")
            if task not in (*JUDGE_TASKS, "none"):
                raise ValueError(
                    f"TaskEvalCallback eval_sets[{i}] judge must be one of {', '.join(JUDGE_TASKS)} or none, "
                    f"got {task!r}"
                )
            self.eval_sets.append({"path": spec["path"], "name": name, "judge": task})
        names = [s["name"] for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"TaskEvalCallback eval set names must be distinct, got {names}")
        self.max_new_tokens, self.batch_size, self.max_samples = max_new_tokens, batch_size, max_samples
        self.filename, self.tokenizer, self.model_attr = filename, tokenizer, model_attr
        if fsdp_unshard not in ("auto", "always", "never"):
            raise ValueError(f"TaskEvalCallback fsdp_unshard must be 'auto', 'always' or 'never', got {fsdp_unshard!r}")
        self.fsdp_unshard: UnshardPolicy = fsdp_unshard
        if isinstance(judge, dict):  # a plain mapping from Python code (the CLI passes a JudgeConfig)
            judge = JudgeConfig(**judge)
        # Built here (no request yet): its first use, at the step-0 evaluation, comes before any training step.
        self.judge = Judge(judge) if judge is not None else None
        self.samples: dict[str, list[EvalSample]] = {}
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Read (and validate) every set before any training step.
        for spec in self.eval_sets:
            if spec["name"] not in self.samples:
                self.samples[spec["name"]] = load_eval_set(spec["path"], self.max_samples)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.evaluate(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)  # `esft test` scores the tasks too

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training can stop between validations (max_steps mid-interval): still score the final model.
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run every eval set now; log and record the scores; return ``{eval/<name>/<metric>: value}``."""
        model = moe_model(pl_module, self.model_attr)
        tokenizer = find_tokenizer(trainer, pl_module, self.tokenizer)
        if isinstance(self.tokenizer, str):
            self.tokenizer = tokenizer  # loaded from its directory once, not at every evaluation
        metrics: dict[str, float] = {}
        entry: dict[str, Any] = {"step": trainer.global_step, "epoch": trainer.current_epoch, "sets": {}}
        # FSDP2: one unshard (or none) for all sets, timed apart from the sets.
        started = time.perf_counter()
        with sharded_generation(model, self.fsdp_unshard) as mode:
            entry["generation"] = {"mode": mode, "prepare_seconds": round(time.perf_counter() - started, 3)}
            for spec in self.eval_sets:
                started = time.perf_counter()
                task = spec["judge"] if spec["judge"] != "none" else None
                scores, records = evaluate_set(
                    model,
                    tokenizer,
                    self.samples[spec["name"]],
                    self.max_new_tokens,
                    self.batch_size,
                    mode,
                    judge=self.judge,
                    judge_task=task,
                )
                seconds = time.perf_counter() - started
                metrics.update({f"eval/{spec['name']}/{k}": v for k, v in scores.items()})
                entry["sets"][spec["name"]] = {
                    "path": spec["path"],
                    "scores": scores,
                    "seconds": round(seconds, 3),
                    "samples_per_sec": round(len(records) / max(seconds, 1e-9), 2),
                    "predictions": records,
                }
                if task is not None and self.judge is not None:  # which judge and prompt made the judge score
                    entry["sets"][spec["name"]]["judge"] = {"model": self.judge.config.model, "prompt": task}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append(entry)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank asks
        if trainer.is_global_zero:
            atomic_write_text(folder / self.filename, json.dumps({"evaluations": self.history}, indent=1))
            shown = ("exact_match", "judge")
            summary = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k.endswith(shown))
            rank_zero_info(f"ESFT task eval at step {trainer.global_step}: {summary}")
        return metrics
