"""The `esft` command: LightningCLI (fit / validate / test) plus `profile`, `select`, `merge`, `eval` and `plan`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .data import ESFTDataModule
from .fit_config import FitArgumentsCLI, parse_config
from .module import ESFTModule
from .plan_command import MemoryPlanError, check_memory_plan, plan_inputs, plan_main
from .run_paths import derive_output_paths, resolve_ckpt_path
from .selection_spec import SelectionSpec

__all__ = [
    "ESFTCLI",
    "MemoryPlanError",
    "main",
    "make_cli",
    "parse_config",
    "plan_inputs",
    "resolve_ckpt_path",
]

if TYPE_CHECKING:
    import lightning as L

COMMANDS = {
    "fit": "profile routing, select experts and train only them (LightningCLI: --config, --print_config)",
    "validate": "validation loss per source of a model or checkpoint (esft fit's arguments)",
    "test": "test loss and perplexity on the validation sequences or data.test files (esft fit's arguments)",
    "predict": "Lightning's predict loop over the datamodule (esft fit's arguments)",
    "plan": "memory per GPU of `esft fit` with the same arguments, from config.json alone, before renting GPUs",
    "profile": "routing scores of the task data (ESFT's expert_scores layout), or scores from ESFT's routing logs",
    "select": "an expert config (expert_cfg.json) from profiling, a scores file or ESFT's logs; --joint: disjoint",
    "merge": "a base model plus one or more adapters -> a plain transformers directory",
    "eval": "generation metrics (exact match, chrF, BLEU, ROUGE-L) of a model, with or without adapters",
}
"""Every `esft` command and its purpose, as `esft --help` lists them."""
TOOLS = ("profile", "select", "merge", "eval", "plan")
"""The commands that are not LightningCLI subcommands."""
FIT_ARGUMENTS = (
    "takes `esft fit`'s arguments as well (--config, --model.*, --data.*, --trainer.*, callbacks); "
    "see `esft fit --help`"
)


class ESFTCLI(FitArgumentsCLI):
    """LightningCLI over ESFTModule / ESFTDataModule; resumes reuse the checkpoint's expert selection; `fit` checks
    the memory plan (``--plan.*``) before anything is loaded."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        resuming_last = self.subcommand is not None and config.get("ckpt_path") == "last"
        derive_output_paths(config, resuming_last)  # every output under trainer.default_root_dir
        from .callbacks.progress import add_progress_bar

        add_progress_bar(config.trainer)  # no `Epoch 0/-2` under max_steps

    def _pin_ckpt_path(self) -> None:
        # Lightning tells hooks the checkpoint path only once it restores it, after setup and configure_model,
        # where the expert selection is applied. Setting trainer.ckpt_path (Lightning's user-managed path) to the
        # file `--ckpt_path` resolves to lets the selection come from that checkpoint, with no profiling.
        kwargs = self.config_init[self.subcommand]
        resolved = resolve_ckpt_path(self.trainer, kwargs["ckpt_path"]) if kwargs.get("ckpt_path") else None
        if resolved is not None:
            self.trainer.ckpt_path = resolved
            kwargs["ckpt_path"] = None

    def before_fit(self) -> None:
        from .callbacks import ResumeCheck

        check_memory_plan(self.trainer, self.model, self.datamodule, self.config[self.subcommand])
        self._pin_ckpt_path()
        if not any(isinstance(cb, ResumeCheck) for cb in self.trainer.callbacks):
            # first, so it restores the RNG states before any other callback draws; every checkpoint holds them
            self.trainer.callbacks.insert(0, ResumeCheck())

    def before_validate(self) -> None:
        self._pin_ckpt_path()

    def before_test(self) -> None:
        self._pin_ckpt_path()


def make_cli(args: list[str] | None = None, run: bool = True) -> ESFTCLI:
    """The LightningCLI of `esft fit|validate|test` (``run=False``: only parse and instantiate)."""
    return ESFTCLI(
        ESFTModule,
        ESFTDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def _tool_main(command: str, argv: list[str]) -> None:
    if command == "plan":
        plan_main(argv)
        return
    if command == "eval":
        from .eval_command import eval_main

        eval_main(argv)
        return
    if command == "select" and "--joint" in argv:  # several tasks from their scores files: no model, no config
        from .select_command import joint_main

        joint_main(argv)
        return
    if command in ("profile", "select"):
        from .scores_command import profile_logs_main, select_from_files_main, wants_file_command

        if wants_file_command(argv):  # ESFT's routing logs or a scores file: no model, no config
            (profile_logs_main if command == "profile" else select_from_files_main)(argv)
            return
    purpose = COMMANDS[command][0].upper() + COMMANDS[command][1:]
    shared = "shares no arguments with `esft fit`" if command == "merge" else FIT_ARGUMENTS
    parser = argparse.ArgumentParser(prog=f"esft {command}", description=f"{purpose}. It {shared}.")
    if command == "merge":
        parser.add_argument("--base", required=True, help="base model directory (save_pretrained layout)")
        parser.add_argument(
            "--adapter",
            required=True,
            action="append",
            help="adapter directory (expert_cfg.json + safetensors); repeat it for several task adapters in one model",
        )
        parser.add_argument("--out", required=True, help="output directory for the merged model")
        parser.add_argument(
            "--overlap",
            choices=["refuse", "first", "average"],
            default="refuse",
            help="when adapters train the same expert: refuse (default), keep the first adapter's, or average",
        )
        parser.add_argument(
            "--format",
            choices=["bf16", "original"],
            default="bf16",
            help="for a quantized base (block FP8, MXFP4): bf16 weights, or the base's own format with the trained "
            "experts re-quantized in the same blocks (default: bf16)",
        )
        parser.add_argument("--trust_remote_code", action="store_true")
        ns = parser.parse_args(argv)
        from .adapters import merge_adapter

        out = merge_adapter(ns.base, ns.adapter, ns.out, ns.trust_remote_code, overlap=ns.overlap, format=ns.format)
        print(f"merged model with {len(ns.adapter)} adapter(s) written to {out}")
        return
    parser.add_argument(
        "--out", required=True, help="output file (scores JSON for profile, expert_cfg.json for select)"
    )
    # Unset flags keep the config's ExpertSelectionCallback settings (or the callback's defaults).
    parser.add_argument("--score_function", choices=["token", "gate"], default=None)
    parser.add_argument("--top_p", type=float, default=None, help="default: 0.2 token, 0.1 gate")
    parser.add_argument("--max_tokens", type=int, default=None)
    parser.add_argument("--shared_experts", action="store_true", default=None)
    parser.add_argument("--non_expert_modules", action="store_true", default=None)
    from .scores_command import add_score_averaging_argument

    add_score_averaging_argument(parser, None)  # unset: the callback's score_averaging holds
    parser.add_argument(  # listed for --help only: dispatched to scores_command.py before this
        "--esft_logs",
        metavar="DIR",
        help="work from ESFT's routing logs (expert_weights_<layer>.txt) instead of a model; select also takes "
        "--scores FILE and --decimals N (see `esft select --esft_logs x --help`)",
    )
    if command == "select":
        from .select_command import add_exclusion_arguments

        add_exclusion_arguments(
            parser,
            exclude_help="expert_cfg.json files or adapter directories whose experts must not be selected "
            "(next-best taken)",
            best_effort_help="a layer that cannot reach top_p without excluded experts keeps the rest (warning) "
            "instead of failing",
            best_effort_default=None,  # unset: the callback's exclude_strict holds
        )
        parser.add_argument(  # listed for --help only: `--joint` is dispatched to select_command.py before this
            "--joint",
            nargs="+",
            metavar="TASK=SCORES.json",
            help="disjoint expert configs for several tasks from their scores files, written to --out DIR/<task>.json "
            "(no model or config needed; see `esft select --joint x --help`)",
        )
    ns, rest = parser.parse_known_args(argv)
    cli = make_cli(rest, run=False)
    from .files import atomic_write_text
    from .models.loading import MODEL_ARGS, load_model, load_tokenizer, resolve_model_path
    from .selection_spec import decide

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
    from .callbacks import ExpertSelectionCallback

    found = next((cb for cb in trainer.callbacks if isinstance(cb, ExpertSelectionCallback)), None)
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


def commands_help() -> str:
    """What `esft`, `esft --help` and an unknown command print: every command with its purpose."""
    width = max(map(len, COMMANDS))
    lines = ["usage: esft COMMAND [ARGUMENTS]", "", "Expert-Specialized Fine-Tuning of MoE language models.", ""]
    lines += ["commands:", *(f"  {name:{width}s}  {purpose}" for name, purpose in COMMANDS.items())]
    lines += ["", "`esft COMMAND --help` lists a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `esft` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(commands_help())
        return
    if args[0] in TOOLS:
        _tool_main(args[0], args[1:])
    elif not args[0].startswith("-") and args[0] not in COMMANDS:
        print(f"esft: unknown command {args[0]!r}\n\n{commands_help()}", file=sys.stderr)
        raise SystemExit(2)
    else:
        make_cli(argv)


if __name__ == "__main__":
    main()
