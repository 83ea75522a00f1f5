"""The `esft` command line: one module per command, a command table, and `esft fit`'s shared configuration."""

from .dispatch import commands_help, main
from .fit_config import parse_config
from .lightning_cli import ESFTCLI, make_cli
from .plan import MemoryPlanError, plan_inputs

__all__ = ["ESFTCLI", "MemoryPlanError", "commands_help", "main", "make_cli", "parse_config", "plan_inputs"]
