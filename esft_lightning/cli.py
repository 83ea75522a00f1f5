"""The `esft` command: LightningCLI (fit / validate / test) plus `profile`, `select`, `merge` and `eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.cli import LightningCLI

from .data import ESFTDataModule
from .module import ESFTModule
from .run_paths import derive_output_paths, resolve_ckpt_path

__all__ = ["ESFTCLI", "main", "make_cli", "resolve_ckpt_path"]

if TYPE_CHECKING:
    import lightning as L

    from .callbacks import ExpertSelectionCallback

TOOLS = ("profile", "select", "merge", "eval")


class ESFTCLI(LightningCLI):
    """LightningCLI over ESFTModule / ESFTDataModule; resumes reuse the checkpoint's expert selection."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        resuming_last = self.subcommand is not None and config.get("ckpt_path") == "last"
        derive_output_paths(config, resuming_last)  # every output under trainer.default_root_dir
        from .callbacks.progress import add_progress_bar

        add_progress_bar(config.trainer)  # no `Epoch 0/-2` under max_steps

    def before_fit(self) -> None:
        from .callbacks import ExpertSelectionCallback

        ckpt = self.config.get("fit", self.config).get("ckpt_path")
        resolved = resolve_ckpt_path(self.trainer, ckpt) if ckpt else None
        for cb in self.trainer.callbacks:
            if isinstance(cb, ExpertSelectionCallback):
                cb.resume_ckpt = resolved


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
    if command == "eval":
        from .eval_command import eval_main

        eval_main(argv)
        return
    parser = argparse.ArgumentParser(prog=f"esft {command}")
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
        parser.add_argument("--trust_remote_code", action="store_true")
        ns = parser.parse_args(argv)
        from .adapters import merge_adapter

        out = merge_adapter(ns.base, ns.adapter, ns.out, ns.trust_remote_code, overlap=ns.overlap)
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
    ns, rest = parser.parse_known_args(argv)
    cli = make_cli(rest, run=False)
    from .files import atomic_write_text

    model = cli.model.build_model()
    cli.datamodule.tokenizer = cli.model.tokenizer
    selector = configured_selector(cli.trainer, vars(ns))
    device = cli.trainer.strategy.root_device  # profile where training would run (the GPU when there is one)
    config = selector.select(model, cli.datamodule.task_dataloader(selector.profile_batch_size), device=device)
    out = Path(ns.out)
    if command == "profile":
        atomic_write_text(out, json.dumps(selector.profile.to_dict(), indent=1))
        print(
            f"scores of {len(selector.profile.token_scores)} layers over {selector.profile.num_tokens} tokens "
            f"on {device} written to {out}"
        )
        return
    config.save(out)
    print(f"{config.num_selected} experts in {len(config.experts)} layers selected; config written to {out}")


def configured_selector(trainer: L.Trainer, overrides: dict) -> ExpertSelectionCallback:
    """The config's ExpertSelectionCallback (or a default one) with the command line's explicit settings."""
    from .callbacks import ExpertSelectionCallback

    found = next((cb for cb in trainer.callbacks if isinstance(cb, ExpertSelectionCallback)), None)
    selector = found or ExpertSelectionCallback()
    score_function = overrides.get("score_function") or selector.score_function
    if score_function not in ("token", "gate"):
        score_function = "token"  # all / none / random need no profile: `profile` and `select` score by tokens
    top_p = overrides.get("top_p")
    if top_p is None:
        top_p = (
            selector.top_p if score_function == selector.score_function else (0.1 if score_function == "gate" else 0.2)
        )
    selector.score_function, selector.top_p = score_function, top_p
    if overrides.get("max_tokens") is not None:
        selector.max_tokens = overrides["max_tokens"]
    for flag in ("shared_experts", "non_expert_modules"):
        if overrides.get(flag):
            selector.flags[flag] = True
    selector.expert_config_path = None  # profile / select always profile
    return selector


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `esft` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        _tool_main(args[0], args[1:])
    else:
        make_cli(argv)


if __name__ == "__main__":
    main()
