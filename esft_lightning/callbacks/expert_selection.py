"""ExpertSelectionCallback: profile routing on the task data when fit starts, select experts, freeze the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from esft_lightning.adapters import save_adapter
from esft_lightning.distributed import is_fsdp2, save_pretrained_merged
from esft_lightning.experts import apply_expert_config, dtype_from_name, stored_expert_dtypes
from esft_lightning.files import atomic_write_text
from esft_lightning.models import find_moe_layers
from esft_lightning.placement import Placement, placed_for_profiling
from esft_lightning.plots import routing_heatmap
from esft_lightning.routing import RoutingProfile, profile_routing
from esft_lightning.selection import ExpertConfig, all_experts, no_experts, random_experts, select_experts

ScoreFunction = Literal["token", "gate", "all", "random", "none"]


class ExpertSelectionCallback(L.Callback):
    """Decides which experts train, before the optimizer is built.

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
        placement: where rank 0 profiles when the model is not on the training device yet: ``auto`` moves the
            model to the GPU when it fits and otherwise streams each layer's weights from host memory
            (``offload``); ``move`` always moves it.
        save_adapter: write the trained experts as an adapter to ``<log_dir>/adapter`` when fit ends.
        save_merged: also write the whole model, trained experts merged, as a ``save_pretrained`` directory to
            ``<log_dir>/merged`` when fit ends (under FSDP too: the shards are gathered to rank 0).
        plot: write a routing heatmap PNG to the log dir (and to the logger, if it takes images).
    """

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
        save_adapter: bool = True,
        save_merged: bool = False,
        plot: bool = True,
        placement: Placement = "auto",
    ) -> None:
        if score_function not in ("token", "gate", "all", "random", "none"):
            raise ValueError(f"score_function must be token, gate, all, random or none, got {score_function!r}")
        if top_p is None:
            top_p = 0.1 if score_function == "gate" else 0.2
        self.score_function, self.top_p, self.max_tokens = score_function, top_p, max_tokens
        self.expert_config_path, self.profile_batch_size, self.seed = expert_config, profile_batch_size, seed
        self.flags = {"shared_experts": shared_experts, "non_expert_modules": non_expert_modules}
        self.write_adapter, self.write_merged, self.plot = save_adapter, save_merged, plot
        if trainable_dtype not in (None, "auto") and not isinstance(getattr(torch, trainable_dtype, None), torch.dtype):
            raise ValueError(
                f"trainable_dtype must be auto or a torch dtype name such as float32, got {trainable_dtype!r}"
            )
        self.trainable_dtype_name, self.placement = trainable_dtype, placement
        self.profile: RoutingProfile | None = None
        self.config: ExpertConfig | None = None
        self.resume_ckpt: str | None = None  # set by `esft fit --ckpt_path`: reuse that run's selection

    @property
    def score_kind(self) -> str:
        """Which profile scores drive the selection: gate for ESFT-Gate, token otherwise (random too)."""
        return "gate" if self.score_function == "gate" else "token"

    # -- deciding ------------------------------------------------------------------------------------
    def select(
        self,
        model: torch.nn.Module,
        task_batches: Any,
        world_size: int = 1,
        device: torch.device | None = None,
        all_reduce: bool | None = None,
    ) -> ExpertConfig:
        """Profile (when the score function needs it) and select; usable without a Trainer.

        ``device``: where to profile (default: where the model is; see ``placement``). With ``world_size`` > 1
        and ``all_reduce`` each rank profiles its share of ``max_tokens`` and the sums are all-reduced.
        """
        if self.expert_config_path:
            return ExpertConfig.load(self.expert_config_path)
        num_experts = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
        meta = {"score_function": self.score_function, "model_type": model.config.model_type}
        if self.score_function == "all":
            return all_experts(num_experts, **self.flags, meta=meta)
        if self.score_function == "none":
            return no_experts(num_experts, **self.flags, meta=meta)
        budget = None if self.max_tokens is None else -(-self.max_tokens // world_size)
        device = next(model.parameters()).device if device is None else device
        with placed_for_profiling(model, device, self.placement, keep=False) as where:
            self.profile = profile_routing(model, task_batches, max_tokens=budget, device=where, all_reduce=all_reduce)
        kind = self.score_kind
        meta["num_tokens"] = self.profile.num_tokens
        config = select_experts(self.profile.scores(kind), self.top_p, **self.flags, meta=meta)
        if self.score_function == "random":
            config = random_experts(config, num_experts, seed=self.seed)
        return config

    def trainable_dtype(
        self, model: torch.nn.Module, config: ExpertConfig, saved: str | None = None
    ) -> torch.dtype | None:
        """The dtype of the trainable expert copies (``saved``: the choice recorded in a resumed checkpoint)."""
        name = self.trainable_dtype_name
        if name not in (None, "auto"):
            return dtype_from_name(name)
        if saved is not None:
            return dtype_from_name(saved)
        if name is None:
            return None
        dtype = resolve_trainable_dtype(model)
        if dtype is not None and (config.shared_experts or config.non_expert_modules):
            rank_zero_warn(
                "ESFT: shared_experts / non_expert_modules train the model's own 16-bit weights, so the selected "
                "experts train in the model's dtype too (load the model in float32 to train everything in fp32)"
            )
            return None
        return dtype

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # `esft fit --ckpt_path last` resolves the path for us; Trainer.fit/validate/test(ckpt_path=...) set
        # trainer.ckpt_path before the setup hooks run.
        ckpt = self.resume_ckpt or trainer.ckpt_path
        if stage != "fit":
            self._setup_evaluation(pl_module, _checkpoint_esft_state(ckpt))
            return
        model = pl_module.build_model()
        saved = _checkpoint_esft_state(ckpt)
        resumed = None if saved is None or saved.get("expert_config") is None else saved["expert_config"]
        if resumed is not None:
            resumed = ExpertConfig.from_dict(resumed, source=str(ckpt))
            if self.expert_config_path and ExpertConfig.load(self.expert_config_path).experts != resumed.experts:
                raise ValueError(
                    f"{self.expert_config_path} differs from the selection of the checkpoint being resumed"
                )
            config = resumed
            rank_zero_info("ESFT: resuming with the checkpoint's expert selection (no profiling)")
        else:
            config = self._decide(trainer, model)
        dtype = self.trainable_dtype(model, config, None if saved is None else saved.get("trainable_dtype"))
        summary = apply_expert_config(model, config, dtype)
        self.config = config
        self._report(trainer, pl_module, config, summary)

    def _setup_evaluation(self, pl_module: L.LightningModule, saved: dict | None) -> None:
        """validate / test: apply the explicit expert config, else the checkpoint's selection and trainable dtype,
        now (before FSDP shards the model; ESFTModule.on_load_checkpoint would run after the sharding)."""
        model = pl_module.build_model()
        if getattr(model, "esft_expert_config", None) is not None:
            return  # applied already (e.g. validate right after fit)
        saved_config = None if saved is None else saved.get("expert_config")
        if self.expert_config_path:
            config = ExpertConfig.load(self.expert_config_path)
        elif saved_config is not None:
            config = ExpertConfig.from_dict(saved_config, source="checkpoint")
        else:
            return
        recorded = None if saved is None else saved.get("trainable_dtype")
        apply_expert_config(model, config, self.trainable_dtype(model, config, recorded))

    def _decide(self, trainer: L.Trainer, model: torch.nn.Module) -> ExpertConfig:
        """Profile and select. With several processes rank 0 profiles alone, on its training device (the
        other ranks may hold only a meta-device model), and broadcasts the config to every rank."""
        needs_data = self.score_function in ("token", "gate", "random") and not self.expert_config_path
        dm = trainer.datamodule
        if needs_data and (dm is None or not hasattr(dm, "task_dataloader")):
            raise ValueError("ExpertSelectionCallback needs a datamodule with task_dataloader() to profile")
        if needs_data:
            dm.setup("fit")
        device = trainer.strategy.root_device
        if trainer.world_size <= 1:
            batches = dm.task_dataloader(self.profile_batch_size) if needs_data else None
            # Single process: the model stays on the training device afterwards (training moves it anyway).
            if device.type != "cpu" and not is_fsdp2(trainer.strategy):
                model.to(device)
            return self.select(model, batches, device=device, all_reduce=False)
        outcome: Any = None
        if trainer.is_global_zero:
            try:
                batches = dm.task_dataloader(self.profile_batch_size, shard=False) if needs_data else None
                outcome = self.select(model, batches, device=device, all_reduce=False)
            except Exception as error:  # every rank must leave the broadcast, then fail with rank 0's error
                outcome = RuntimeError(f"rank 0 failed to select experts: {type(error).__name__}: {error}")
                outcome.__cause__ = error
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if isinstance(outcome, Exception):
            raise outcome
        rank_zero_info(f"ESFT: rank 0 selected {outcome.num_selected} experts; broadcast to {trainer.world_size} ranks")
        return outcome

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, config: ExpertConfig, summary: dict) -> None:
        share = summary["trainable_params"] / max(summary["total_params"], 1)
        rank_zero_info(
            f"ESFT: {summary['selected_experts']} experts selected in {len(config.experts)} layers; "
            f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters trainable ({share:.2%})"
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {
                    "esft/selected_experts": summary["selected_experts"],
                    "esft/trainable_params": summary["trainable_params"],
                    "esft/trainable_share": share,
                },
                step=0,
            )
        if trainer.logger is None:  # Lightning would fall back to default_root_dir (the cwd): write nothing
            rank_zero_warn("ESFT: the trainer has no logger, so no log directory: expert_cfg.json not written")
            return
        log_dir = trainer.log_dir  # a collective under several processes: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        log_dir = Path(log_dir)
        config.save(log_dir / "expert_cfg.json")
        kind = self.score_kind
        if self.profile is not None:
            atomic_write_text(log_dir / "expert_scores.json", json.dumps(self.profile.to_dict(), indent=1))
            if self.plot:
                fig = routing_heatmap(
                    self.profile.scores(kind),
                    config,
                    log_dir / "routing_heatmap.png",
                    title=f"ESFT-{kind.capitalize()} scores, top_p={self.top_p}",
                )
                _log_figure(trainer, fig)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.write_adapter and trainer.logger is None:
            rank_zero_warn("ESFT: the trainer has no logger, so no log directory: adapter not written")
        elif self.write_adapter and trainer.log_dir is not None:
            path = save_adapter(pl_module.model, Path(trainer.log_dir) / "adapter")
            rank_zero_info(f"ESFT: adapter written to {path}")
        if self.write_merged and trainer.logger is not None and trainer.log_dir is not None:
            path = save_pretrained_merged(pl_module.model, Path(trainer.log_dir) / "merged")
            rank_zero_info(f"ESFT: merged model written to {path}")


def resolve_trainable_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """``trainable_dtype: auto``: fp32 trainable copies when the routed experts are stored in 16 bits."""
    sixteen_bit = stored_expert_dtypes(find_moe_layers(model)) & {torch.bfloat16, torch.float16}
    return torch.float32 if sixteen_bit else None


def _checkpoint_esft_state(ckpt_path: str | None) -> dict | None:
    """The ``esft`` entry (selection, trainable dtype) of a Lightning checkpoint file or distributed folder."""
    if not ckpt_path or not Path(ckpt_path).exists():
        return None
    path = Path(ckpt_path)
    if path.is_dir():  # Lightning's distributed checkpoints keep the non-tensor state in meta.pt
        path = path / "meta.pt"
        if not path.exists():
            return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=path.suffix != ".pt")
    return checkpoint.get("esft")


def _log_figure(trainer: L.Trainer, fig: Any) -> None:
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="esft/routing_heatmap", images=[fig])
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure("esft/routing_heatmap", fig, global_step=0)
