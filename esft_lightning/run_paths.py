"""Where a run writes: every output under `trainer.default_root_dir`, and `--ckpt_path last` as Lightning reads it."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn


class RunLogger(CSVLogger):
    """Lightning's CSVLogger with ``save_dir`` optional (`esft` fills it with ``trainer.default_root_dir``), and
    a ``metrics.csv`` that a resumed run appends to instead of deleting.

    (CSVLogger requires ``save_dir``, so a YAML that leaves it to ``default_root_dir`` would not parse; and it
    deletes an existing ``metrics.csv``, which would lose the history of a run resumed in its version folder.)
    From Python, an unset ``save_dir`` is the working directory, like Lightning's own default root.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str = "logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(os.getcwd() if save_dir is None else save_dir, name, version, prefix, flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (and its columns) and appends to it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's deletes metrics.csv here


def derive_output_paths(config: Any, resuming_last: bool) -> None:
    """Fill the unset output paths of a parsed ``fit|validate|test`` config from ``trainer.default_root_dir``.

    A logger without ``save_dir`` writes to ``default_root_dir`` (then ModelCheckpoint without ``dirpath``
    writes into the run's own ``<save_dir>/<name>/version_N/checkpoints``, and the expert config, scores
    and adapter go to the same version folder), so ``--trainer.default_root_dir X`` alone moves everything.
    With ``resuming_last`` and no explicit logger version, the logger continues the version whose
    checkpoints hold the newest ``last*.ckpt``: the one Lightning will then resume from.
    """
    trainer = config.trainer
    root = str(trainer.default_root_dir or os.getcwd())
    for logger in _logger_configs(trainer.logger):
        args = logger.init_args
        if "save_dir" in args and args.save_dir is None:
            args.save_dir = root
        if resuming_last and "version" in args and args.version is None and args.get("save_dir"):
            version = _version_with_newest_last(Path(args.save_dir) / (args.get("name") or ""))
            if version is not None:
                args.version = version


def resolve_ckpt_path(trainer: L.Trainer, ckpt: str) -> str | None:
    """The file ``trainer.fit(ckpt_path=ckpt)`` will load, or None when there is nothing to resume.

    ``last`` goes through Lightning's own resolution (every ModelCheckpoint's folder, newest ``last*.ckpt``
    by modification time), so what ExpertSelectionCallback reads is what Lightning restores.
    """
    if ckpt == "last":
        # Private, but the only way to resolve exactly as Trainer.fit will, a moment later.
        connector = trainer._checkpoint_connector
        resolved = connector._parse_ckpt_path(TrainerFn.FITTING, ckpt, model_provided=True, model_connected=True)
        return None if resolved is None else str(resolved)
    return ckpt if Path(ckpt).exists() else None


def _logger_configs(logger: Any) -> list[Any]:
    loggers = logger if isinstance(logger, list) else [logger]
    return [lg for lg in loggers if hasattr(lg, "init_args") and lg.init_args is not None]


def _version_with_newest_last(logger_root: Path) -> int | str | None:
    newest: tuple[float, str] | None = None
    for version_dir in logger_root.glob("*/checkpoints"):
        for ckpt in version_dir.iterdir():
            # ModelCheckpoint._find_last_checkpoints' test: a .ckpt whose name starts with "last"
            if not (ckpt.name.startswith("last") and ckpt.suffix == ".ckpt"):
                continue
            if newest is None or ckpt.stat().st_mtime > newest[0]:
                newest = (ckpt.stat().st_mtime, version_dir.parent.name)
    if newest is None:
        return None
    name = newest[1]
    return int(name.removeprefix("version_")) if re.fullmatch(r"version_\d+", name) else name
