"""`esft fit | validate | test | predict`: LightningCLI over ESFTModule / ESFTDataModule with ESFT's checks."""

from __future__ import annotations

from ..callbacks import ResumeCheck
from ..callbacks.progress import add_progress_bar
from ..data.datamodule import ESFTDataModule
from ..module import ESFTModule
from ..run_paths import derive_output_paths, resolve_ckpt_path
from .fit_config import FitArgumentsCLI
from .plan import check_memory_plan

__all__ = ["ESFTCLI", "make_cli"]


class ESFTCLI(FitArgumentsCLI):
    """LightningCLI over ESFTModule / ESFTDataModule; resumes reuse the checkpoint's expert selection; `fit` checks
    the memory plan (``--plan.*``) before anything is loaded."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        resuming_last = self.subcommand is not None and config.get("ckpt_path") == "last"
        derive_output_paths(config, resuming_last)  # every output under trainer.default_root_dir
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
