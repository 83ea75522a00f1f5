"""`esft profile` / `esft select` from a model: profile the task data with `esft fit`'s arguments, or dispatch to the
file-based forms (ESFT's routing logs, a scores file, ``--joint``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..callbacks import ExpertSelectionCallback
from ..files import atomic_write_text
from ..pipeline import decide
from ..selection.spec import SelectionSpec
from ..weights.loading import MODEL_ARGS, load_model, load_tokenizer, resolve_model_path
from .commands import describe
from .lightning_cli import make_cli
from .scores import add_score_averaging_argument, profile_logs_main, select_from_files_main, wants_file_command
from .select_joint import add_exclusion_arguments, joint_main

if TYPE_CHECKING:
    import lightning as L

__all__ = ["configured_spec", "profile_main", "select_main"]


def profile_main(argv: list[str]) -> None:
    """`esft profile`: routing scores of the task data, or of ESFT's routing logs (``--esft_logs``)."""
    _profile_or_select("profile", argv)


def select_main(argv: list[str]) -> None:
    """`esft select`: an expert config from profiling, a scores file, ESFT's logs, or ``--joint`` scores files."""
    if "--joint" in argv:  # several tasks from their scores files: no model, no config
        joint_main(argv)
        return
    _profile_or_select("select", argv)


def _profile_or_select(command: str, argv: list[str]) -> None:
    if wants_file_command(argv):  # ESFT's routing logs or a scores file: no model, no config
        (profile_logs_main if command == "profile" else select_from_files_main)(argv)
        return
    parser = argparse.ArgumentParser(prog=f"esft {command}", description=describe(command))
    parser.add_argument(
        "--out", required=True, help="output file (scores JSON for profile, expert_cfg.json for select)"
    )
    # Unset flags keep the config's ExpertSelectionCallback settings (or the callback's defaults).
    parser.add_argument("--score_function", choices=["token", "gate"], default=None)
    parser.add_argument("--top_p", type=float, default=None, help="default: 0.2 token, 0.1 gate")
    parser.add_argument("--max_tokens", type=int, default=None)
    parser.add_argument("--shared_experts", action="store_true", default=None)
    parser.add_argument("--non_expert_modules", action="store_true", default=None)
    add_score_averaging_argument(parser, None)  # unset: the callback's score_averaging holds
    parser.add_argument(  # listed for --help only: dispatched to scores.py before this
        "--esft_logs",
        metavar="DIR",
        help="work from ESFT's routing logs (expert_weights_<layer>.txt) instead of a model; select also takes "
        "--scores FILE and --decimals N (see `esft select --esft_logs x --help`)",
    )
    if command == "select":
        add_exclusion_arguments(
            parser,
            exclude_help="expert_cfg.json files or adapter directories whose experts must not be selected "
            "(next-best taken)",
            best_effort_help="a layer that cannot reach top_p without excluded experts keeps the rest (warning) "
            "instead of failing",
            best_effort_default=None,  # unset: the callback's exclude_strict holds
        )
        parser.add_argument(  # listed for --help only: `--joint` is dispatched to select_joint.py before this
            "--joint",
            nargs="+",
            metavar="TASK=SCORES.json",
            help="disjoint expert configs for several tasks from their scores files, written to --out DIR/<task>.json "
            "(no model or config needed; see `esft select --joint x --help`)",
        )
    ns, rest = parser.parse_known_args(argv)
    cli = make_cli(rest, run=False)
    args = cli.config.model  # ESFTModule's arguments, loaded without building the LightningModule's model
    tokenizer = load_tokenizer(args.tokenizer, resolve_model_path(args.model, args.family), args.trust_remote_code)
    model = load_model(**{name: args[name] for name in MODEL_ARGS}, vocab_size=len(tokenizer))
    cli.datamodule.tokenizer = tokenizer
    spec, batch_size = configured_spec(cli.trainer, vars(ns))
    device = cli.trainer.strategy.root_device  # profile where training would run (the GPU when there is one)
    decision = decide(model, cli.datamodule.task_dataloader(batch_size), spec, device=device)
    out = Path(ns.out)
    if command == "profile":
        profile = decision.profile
        atomic_write_text(out, json.dumps(profile.to_dict(), indent=1))
        layers, tokens = len(profile.token_scores), profile.num_tokens
        print(f"scores of {layers} layers over {tokens} tokens on {device} written to {out}")
        return
    decision.config.save(out)
    print(
        f"{decision.config.num_selected} experts in {len(decision.config.experts)} layers selected; "
        f"config written to {out}"
    )


def configured_spec(trainer: L.Trainer, overrides: dict) -> tuple[SelectionSpec, int | None]:
    """The config's ExpertSelectionCallback settings (or the defaults) with the command line's explicit ones, as a
    spec that always profiles; and the callback's profiling batch size."""
    found = ExpertSelectionCallback.of(trainer)
    spec = found.spec if found is not None else SelectionSpec()
    score_function = overrides.get("score_function") or spec.score_function
    if score_function not in ("token", "gate"):
        score_function = "token"  # all / none / random need no profile: `profile` and `select` score by tokens
    top_p = overrides.get("top_p")
    if top_p is None and score_function == spec.score_function:
        top_p = spec.top_p  # else the new score function's own default
    spec = replace(
        spec,
        score_function=score_function,
        top_p=top_p,
        max_tokens=spec.max_tokens if overrides.get("max_tokens") is None else overrides["max_tokens"],
        shared_experts=spec.shared_experts or bool(overrides.get("shared_experts")),
        non_expert_modules=spec.non_expert_modules or bool(overrides.get("non_expert_modules")),
        expert_config=None,  # profile / select always profile
        exclude=overrides.get("exclude") or spec.exclude,
        exclude_strict=spec.exclude_strict and not overrides.get("best_effort"),
        score_averaging=overrides.get("score_averaging") or spec.score_averaging,
    )
    return spec, None if found is None else found.profile_batch_size
