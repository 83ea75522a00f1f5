"""`esft eval`: score a model (optionally with an ESFT adapter) on eval sets by greedy generation."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from ..adapters import load_adapter
from ..evaluation.evaluate import evaluate_set, load_eval_set
from ..evaluation.judge import JUDGE_TASKS, Judge, JudgeConfig, config_help, judge_from_args, judge_task_for
from ..files import atomic_write_text
from ..weights.loading import load_model, load_tokenizer, resolve_model_path


def parse_eval_set(spec: str) -> dict[str, str]:
    """``name=path`` or ``path`` (named after the file) -> ``{"name", "path"}``."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--eval expects NAME=PATH or PATH, got {spec!r}")
    return {"name": name, "path": path}


def parse_judge_prompt(spec: str) -> tuple[str, str]:
    """``NAME=PROMPT`` -> ``(name, prompt)``: the judge prompt of one eval set."""
    name, sep, prompt = spec.partition("=")
    if not sep or not name or not prompt:
        raise argparse.ArgumentTypeError(f"--judge_prompt expects NAME=PROMPT, got {spec!r}")
    return name, prompt


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--judge_<field>`` flag per ``JudgeConfig`` field (help from its docstring), plus ``--judge_prompt``."""

    group = parser.add_argument_group(
        "LLM judge", "rate predictions 0-10 with an OpenAI-compatible chat endpoint (on when --judge_base_url is set)"
    )
    helps = config_help()
    for field in fields(JudgeConfig):
        default = None if field.default is MISSING else field.default
        kind = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str
        text = helps.get(field.name, "").rstrip(".")
        if default is not None:
            text += f" (default: {default})"
        if field.name == "api_key_env":
            text += "; 'none' for no key"
        group.add_argument(f"--judge_{field.name}", type=kind, default=None, help=text)
    group.add_argument(
        "--judge_prompt",
        action="append",
        type=parse_judge_prompt,
        default=[],
        help=f"NAME=PROMPT: the judge prompt of eval set NAME ({', '.join(JUDGE_TASKS)}, none); default from the "
        "name: summary/law/translation when it contains one, none for intent (exact match), generic otherwise",
    )


def eval_main(argv: list[str]) -> dict:
    """Parse ``argv``, evaluate, print one line per set, write ``--out`` (scores and predictions) if given."""
    parser = argparse.ArgumentParser(
        prog="esft eval", description=f"{__doc__.strip()} It shares no arguments with `esft fit`; its own:"
    )
    parser.add_argument("--model", default="embedded", help="model directory, or 'embedded' (default)")
    parser.add_argument("--adapter", default=None, help="ESFT adapter directory applied to the model first")
    parser.add_argument(
        "--eval",
        dest="eval_sets",
        action="append",
        type=parse_eval_set,
        required=True,
        help="eval set NAME=PATH (JSONL: {prompt, answers} or chat records); repeatable",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file for scores and predictions")
    add_judge_arguments(parser)
    ns = parser.parse_args(argv)

    samples = {s["name"]: load_eval_set(s["path"], ns.max_samples) for s in ns.eval_sets}  # fail before loading
    try:
        config = judge_from_args({k.removeprefix("judge_"): v for k, v in vars(ns).items() if k.startswith("judge_")})
    except ValueError as err:
        parser.error(str(err))
    prompts = {s["name"]: judge_task_for(s["name"]) for s in ns.eval_sets}
    for name, prompt in ns.judge_prompt:
        if name not in prompts:
            parser.error(f"--judge_prompt names {name!r}, which no --eval names ({', '.join(prompts)})")
        if prompt not in (*JUDGE_TASKS, "none"):
            parser.error(f"--judge_prompt {name}= must be one of {', '.join(JUDGE_TASKS)}, none; got {prompt!r}")
        prompts[name] = None if prompt == "none" else prompt
    judge = Judge(config) if config is not None else None
    if judge is not None and any(prompts.values()):
        judge.check()  # an unreachable endpoint fails here, before the model is loaded and generates
    path = resolve_model_path(ns.model)
    tokenizer = load_tokenizer(model_path=path, trust_remote_code=ns.trust_remote_code)
    model = load_model(path, dtype=ns.dtype, trust_remote_code=ns.trust_remote_code)
    if ns.adapter:
        load_adapter(model, ns.adapter)
    model.to(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {"model": ns.model, "adapter": ns.adapter, "max_new_tokens": ns.max_new_tokens, "sets": {}}
    for spec in ns.eval_sets:
        started = time.perf_counter()
        task = prompts[spec["name"]] if judge is not None else None
        scores, records = evaluate_set(
            model, tokenizer, samples[spec["name"]], ns.max_new_tokens, ns.batch_size, judge=judge, judge_task=task
        )
        seconds = time.perf_counter() - started
        rate = len(records) / max(seconds, 1e-9)
        report["sets"][spec["name"]] = {
            "path": spec["path"],
            "scores": scores,
            "samples_per_sec": rate,
            "predictions": records,
        }
        if judge is not None and task is not None:
            report["sets"][spec["name"]]["judge"] = {"model": judge.config.model, "prompt": task}
        print(
            f"{spec['name']}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            + f" ({len(records)} samples, {rate:.1f} samples/s)",
            flush=True,
        )
    if ns.out:
        atomic_write_text(ns.out, json.dumps(report, indent=1))
        print(f"scores and predictions written to {ns.out}")
    return report
