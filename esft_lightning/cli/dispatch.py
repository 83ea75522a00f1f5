"""The `esft` command: every command's entry point by name (LightningCLI's fit / validate / test / predict and the
tools), and the help that lists them."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .commands import COMMANDS
from .eval import eval_main
from .lightning_cli import make_cli
from .merge import merge_main
from .plan import plan_main
from .profile_select import profile_main, select_main

__all__ = ["TOOL_MAINS", "commands_help", "main"]

TOOL_MAINS: dict[str, Callable[[list[str]], object]] = {
    "plan": plan_main,
    "profile": profile_main,
    "select": select_main,
    "merge": merge_main,
    "eval": eval_main,
}
"""The commands that are not LightningCLI subcommands, each with its ``main(argv)``."""


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
    if args[0] in TOOL_MAINS:
        TOOL_MAINS[args[0]](args[1:])
    elif not args[0].startswith("-") and args[0] not in COMMANDS:
        print(f"esft: unknown command {args[0]!r}\n\n{commands_help()}", file=sys.stderr)
        raise SystemExit(2)
    else:
        make_cli(argv)


if __name__ == "__main__":
    main()
