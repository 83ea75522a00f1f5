"""The `esft` commands and their one-line purposes (what `esft --help` lists), shared by every command's help."""

from __future__ import annotations

__all__ = ["COMMANDS", "FIT_ARGUMENTS", "describe"]

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
FIT_ARGUMENTS = (
    "takes `esft fit`'s arguments as well (--config, --model.*, --data.*, --trainer.*, callbacks); "
    "see `esft fit --help`"
)


def describe(command: str) -> str:
    """A command's ``--help`` description: its purpose, and which arguments it shares with `esft fit`."""
    purpose = COMMANDS[command][0].upper() + COMMANDS[command][1:]
    shared = "shares no arguments with `esft fit`" if command == "merge" else FIT_ARGUMENTS
    return f"{purpose}. It {shared}."
