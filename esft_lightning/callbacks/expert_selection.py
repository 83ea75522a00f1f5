"""ExpertSelectionCallback: profile routing when fit starts, select experts, freeze the rest; in any LightningModule."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..adapters import save_adapter
from ..data.sources import Source
from ..data.templates import Template
from ..distributed.fsdp import save_pretrained_merged
from ..distributed.strategy import allow_unused_experts_under_ddp, is_fsdp2
from ..experts.split import trainable_summary
from ..experts.state import expert_config_of
from ..files import atomic_write_text
from ..models import find_moe_model
from ..pipeline import Decision, apply, decide, read_checkpoint_selection, restore, selection_entry
from ..routing.placement import Placement
from ..routing.profile import RoutingProfile, ScoreAveraging
from ..selection.heatmap import routing_heatmap
from ..selection.rules import ExpertConfig
from ..selection.spec import FrozenExpertsDtype, ScoreFunction, SelectionSpec
from .context import as_sources, moe_model, profiling_batches


class ExpertSelectionCallback(L.Callback):
    """Decides which experts train, before the optimizer is built.

    Works with any LightningModule that holds a Hugging Face MoE causal LM (found by structure; ``model_attr``
    when it holds several), built in ``__init__`` or in ``configure_model``. A ``configure_model`` that shards the
    model itself (``fully_shard``) calls ``esft_lightning.prepare_for_sharding(model, self.trainer)`` first.

    Args:
        score_function: ``token`` (ESFT-Token), ``gate`` (ESFT-Gate), or a baseline: ``all`` (every
            routed expert: full fine-tuning of the experts), ``random`` (as many experts per layer as
            ESFT-Token picks, drawn at random: the paper's ablation), ``none`` (routed experts frozen).
        top_p: cumulative score each layer's selection must reach; default the paper's 0.2 for token (and
            random), 0.1 for gate.
        max_tokens: non-padding task tokens to profile (paper: 2^17).
        expert_config: an existing ``expert_cfg.json``: applied as is, no profiling.
        shared_experts: also train shared experts.
        non_expert_modules: also train attention, norms, routers, embeddings and the LM head.
        profile_batch_size: batch size for profiling (default: the datamodule's).
        seed: seed of the ``random`` baseline.
        trainable_dtype: dtype of the selected experts' trainable copies (and so of their gradients and AdamW
            state). ``auto`` (default): ``float32`` when the routed experts are stored in 16 bits (bf16 would
            round most lr 1e-5 updates away), else the experts' own dtype. An explicit dtype always wins.
        frozen_experts_dtype: ``model`` (default) holds the frozen routed experts in the model's dtype; ``float8``
            in block FP8 (128 x 128 blocks, float32 scales): about half the bytes of bf16, each expert dequantized
            as the forward uses it. One process and FSDP2; not yet with expert parallelism.
        placement: where rank 0 profiles when the model is not on the training device yet: ``auto`` moves the
            model to the GPU when it fits and otherwise streams each layer's weights from host memory
            (``offload``); ``move`` always moves it.
        save_adapter: write the trained experts as an adapter to ``<log_dir>/adapter`` when fit ends.
        save_merged: also write the whole model, trained experts merged, as a ``save_pretrained`` directory to
            ``<log_dir>/merged`` when fit ends (under FSDP too: the shards are gathered to rank 0).
        plot: write a routing heatmap PNG to the log dir (and to the logger, if it takes images).
        model_attr: the attribute (dotted path) of the LightningModule holding the model to fine-tune, when it
            holds more than one MoE model.
        profile_data: task data to profile when the datamodule has no ``task_dataloader()``: paths or sources,
            read like ``ESFTDataModule``'s. Without it, the Trainer's train dataloader is profiled.
        profile_seq_length: sequence length ``profile_data`` is packed to.
        profile_template: how ``profile_data`` chats are rendered: ``esft`` (ESFT's format) or ``model`` (the
            tokenizer's chat template, as a chat model is trained on it).
        tokenizer: tokenizer (or its directory) for ``profile_data``; default the datamodule's, else the module's.
        exclude: expert configs (``expert_cfg.json``) or adapter directories whose experts must not be selected,
            e.g. the adapters of other tasks that will share the model: the next-best experts are taken instead, so
            the adapters compose (``esft merge`` needs no ``--overlap``). Also applies to ``all`` and ``random``;
            an explicit ``expert_config`` that trains an excluded expert is an error.
        exclude_strict: when a layer cannot reach ``top_p`` without excluded experts: raise (default, naming the
            layer and the score reached) or, if false, keep the experts left and warn.
        score_averaging: how profiling averages the scores over the task's tokens: ``sequence`` (default: per
            sequence, then over sequences, the paper's Eq. 6-7) or ``pooled`` (over all tokens at once, which is
            what ESFT's released expert configs were made from). Recorded in ``expert_scores.json``,
            ``expert_cfg.json`` and the checkpoint.
    """

    @classmethod
    def of(cls, trainer: L.Trainer) -> ExpertSelectionCallback | None:
        """The Trainer's ``ExpertSelectionCallback``, None when it has none."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, cls)), None)

    def __init__(
        self,
        score_function: ScoreFunction = "token",
        top_p: float | None = None,
        max_tokens: int | None = 131072,
        expert_config: str | None = None,
        shared_experts: bool = False,
        non_expert_modules: bool = False,
        profile_batch_size: int | None = None,
        seed: int = 0,
        trainable_dtype: str | None = "auto",
        frozen_experts_dtype: FrozenExpertsDtype = "model",
        save_adapter: bool = True,
        save_merged: bool = False,
        plot: bool = True,
        placement: Placement = "auto",
        model_attr: str | None = None,
        profile_data: list[Source | str] | None = None,
        profile_seq_length: int = 1024,
        profile_template: Template = "esft",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        exclude: list[str] | None = None,
        exclude_strict: bool = True,
        score_averaging: ScoreAveraging = "sequence",
    ) -> None:
        self.spec = SelectionSpec(
            score_function=score_function,
            top_p=top_p,
            max_tokens=max_tokens,
            expert_config=expert_config,
            shared_experts=shared_experts,
            non_expert_modules=non_expert_modules,
            trainable_dtype=trainable_dtype,
            frozen_experts_dtype=frozen_experts_dtype,
            seed=seed,
            placement=placement,
            exclude=exclude,
            exclude_strict=exclude_strict,
            score_averaging=score_averaging,
        )
        self.profile_batch_size, self.model_attr, self.profile_template = (
            profile_batch_size,
            model_attr,
            profile_template,
        )
        self.profile_data, self.profile_seq_length, self.tokenizer = (
            as_sources(profile_data),
            profile_seq_length,
            tokenizer,
        )
        self.write_adapter, self.write_merged, self.plot = save_adapter, save_merged, plot
        self.profile: RoutingProfile | None = None
        self.config: ExpertConfig | None = None

    @property
    def top_p(self) -> float:
        """The top-p in force (the paper's default for the score function when none was given)."""
        return self.spec.p

    # -- applying, before the optimizer (and any sharding) sees the parameters ------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        allow_unused_experts_under_ddp(trainer.strategy)
        model = find_moe_model(pl_module, self.model_attr)
        if model is not None:
            self.prepare(trainer, pl_module, model)
            return
        if not _overrides_configure_model(pl_module):
            moe_model(pl_module, self.model_attr)  # raises: no model now, and none will be built
        # The model is built in configure_model, which runs after every setup hook and before the optimizer:
        # apply the selection right after it (a configure_model that shards calls prepare_for_sharding first).
        _after_configure_model(
            pl_module, lambda: self.prepare(trainer, pl_module, moe_model(pl_module, self.model_attr))
        )

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> None:
        """Apply the selection to ``model`` now: the checkpoint's (``trainer.ckpt_path``) or the explicit config's,
        else (in fit) profile and select. A model that already has a selection keeps it (``restore`` checks it
        against the checkpoint's and the explicit config's), so calling this again does nothing."""
        saved = read_checkpoint_selection(trainer.ckpt_path)  # a resumed run keeps its selection
        had_selection = expert_config_of(model) is not None
        config = self.config = restore(model, saved, self.spec)
        if had_selection or trainer.state.fn != "fit":
            return  # selected already (e.g. by prepare_for_sharding), or validate / test: nothing to decide
        if config is not None and saved is not None and saved.get("expert_config") is not None:
            rank_zero_info("ESFT: resuming with the checkpoint's expert selection (no profiling)")
        if config is None:
            decision = self._decide(trainer, pl_module, model)
            self.profile, config = decision.profile, decision.config
            apply(model, config, self.spec)
        self.config = config
        self._report(trainer, config, trainable_summary(model))

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, model: nn.Module) -> Decision:
        """Profile and select. With several processes rank 0 profiles alone, on its training device (the
        other ranks may hold only a meta-device model), and broadcasts the decision to every rank."""
        device = trainer.strategy.root_device

        def batches(shard: bool) -> Any:
            if not self.spec.needs_data:
                return None
            return profiling_batches(
                trainer,
                pl_module,
                "ExpertSelectionCallback",
                self.profile_batch_size,
                shard,
                self.profile_data,
                self.profile_seq_length,
                self.tokenizer,
                self.profile_template,
            )

        if trainer.world_size <= 1:
            # Single process: the model stays on the training device afterwards (training moves it anyway).
            if device.type != "cpu" and not is_fsdp2(trainer.strategy):
                model.to(device)
            return decide(model, batches(True), self.spec, device=device, all_reduce=False)
        outcome: Any = None
        if trainer.is_global_zero:
            try:
                outcome = decide(model, batches(False), self.spec, device=device, all_reduce=False)
            except Exception as error:  # every rank must leave the broadcast, then fail with rank 0's error
                outcome = RuntimeError(f"rank 0 failed to select experts: {type(error).__name__}: {error}")
                outcome.__cause__ = error
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if isinstance(outcome, Exception):
            raise outcome
        rank_zero_info(
            f"ESFT: rank 0 selected {outcome.config.num_selected} experts; broadcast to {trainer.world_size} ranks"
        )
        return outcome

    # -- checkpoints: the selection travels with them, whatever the LightningModule --------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        model = find_moe_model(pl_module, self.model_attr)
        config = expert_config_of(model)
        if config is not None:  # (ESFTModule writes the same entry itself)
            checkpoint.setdefault("esft", selection_entry(model, config))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        model = find_moe_model(pl_module, self.model_attr)
        if model is not None and checkpoint.get("esft") is not None:
            restore(model, checkpoint["esft"], self.spec)  # the checkpoint's selection, or an error naming the mismatch

    # -- reporting ---------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, config: ExpertConfig, summary: dict) -> None:
        share = summary["trainable_params"] / max(summary["total_params"], 1)
        rank_zero_info(
            f"ESFT: {summary['selected_experts']} experts selected in {len(config.experts)} layers; "
            f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters trainable ({share:.2%})"
        )
        if trainer.logger is None:  # Lightning would fall back to default_root_dir (the cwd): write nothing
            rank_zero_warn("ESFT: the trainer has no logger, so no log directory: expert_cfg.json not written")
            return
        trainer.logger.log_metrics(
            {
                "esft/selected_experts": summary["selected_experts"],
                "esft/trainable_params": summary["trainable_params"],
                "esft/trainable_share": share,
            },
            step=0,
        )
        log_dir = trainer.log_dir  # a collective under several processes: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        log_dir = Path(log_dir)
        config.save(log_dir / "expert_cfg.json")
        if self.profile is not None:
            atomic_write_text(log_dir / "expert_scores.json", json.dumps(self.profile.to_dict(), indent=1))
            if self.plot:
                kind = self.spec.score_kind
                fig = routing_heatmap(
                    self.profile.scores(kind),
                    config,
                    log_dir / "routing_heatmap.png",
                    title=f"ESFT-{kind.capitalize()} scores, top_p={self.top_p}",
                )
                _log_figure(trainer, fig)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = moe_model(pl_module, self.model_attr)
        if self.write_adapter and trainer.logger is None:
            rank_zero_warn("ESFT: the trainer has no logger, so no log directory: adapter not written")
        elif self.write_adapter and trainer.log_dir is not None:
            path = save_adapter(model, Path(trainer.log_dir) / "adapter")
            rank_zero_info(f"ESFT: adapter written to {path}")
        if self.write_merged and trainer.logger is not None and trainer.log_dir is not None:
            path = save_pretrained_merged(model, Path(trainer.log_dir) / "merged")
            rank_zero_info(f"ESFT: merged model written to {path}")


def prepare_for_sharding(model: nn.Module, trainer: L.Trainer) -> nn.Module:
    """Apply the expert selection to ``model`` now; call it in your ``configure_model`` before ``fully_shard``.

    Selecting experts replaces parameters (small trainable copies join the frozen fused tensors), so under FSDP2
    it must happen before the model is sharded. Uses the Trainer's ``ExpertSelectionCallback`` (profiling on rank
    0 and broadcasting in fit); without one, applies the selection of ``trainer.ckpt_path``, if any. (Lightning
    sets ``trainer.ckpt_path`` from ``fit/validate/test(ckpt_path=...)`` only after ``configure_model``: set
    ``trainer.ckpt_path = path`` before the call, as ``esft`` does, for the checkpoint's selection to apply here.)
    Returns ``model``.
    """
    callback = ExpertSelectionCallback.of(trainer)
    if callback is not None:
        callback.prepare(trainer, trainer.lightning_module, model)
    else:
        restore(model, read_checkpoint_selection(trainer.ckpt_path))
    return model


def _overrides_configure_model(pl_module: L.LightningModule) -> bool:
    return type(pl_module).configure_model is not L.LightningModule.configure_model


def _after_configure_model(pl_module: L.LightningModule, then: Callable[[], None]) -> None:
    """Run ``then`` right after the module's next ``configure_model`` (inside the strategy's init contexts)."""
    pl_module.__dict__.pop("configure_model", None)  # a wrapper left by a run that failed before configure_model
    original = pl_module.configure_model

    @functools.wraps(original)
    def configure_model() -> None:
        try:
            original()
        finally:
            pl_module.__dict__.pop("configure_model", None)  # back to the class's method: a later fit wraps afresh
        then()

    pl_module.configure_model = configure_model


def _log_figure(trainer: L.Trainer, fig: Any) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="esft/routing_heatmap", images=[fig])
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure("esft/routing_heatmap", fig, global_step=0)
