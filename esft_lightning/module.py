"""ESFTModule: a LightningModule wrapping a Hugging Face MoE causal LM for expert-specialized fine-tuning."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from .callbacks.expert_selection import prepare_for_sharding
from .data.constants import IGNORE_INDEX
from .distributed.clipping import clip_grad_norm_across_ranks
from .distributed.expert_parallel import expert_parallel_mesh, localize_experts, routed_expert_bytes
from .distributed.fsdp import data_parallel_mesh, shard_model
from .distributed.host_memory import current_host_bytes, peak_host_bytes, training_memory_bytes
from .distributed.strategy import allow_unused_experts_under_ddp, is_fsdp2
from .dtensors import local_shard, model_is_sharded
from .experts.split import is_trained_copy, trainable_summary
from .experts.state import expert_config_of
from .models.aux_loss import SequenceBalanceLoss, has_sequence_balance_loss
from .pipeline import frozen_experts_in_fp8, restore, selection_entry
from .selection.rules import ExpertConfig
from .weights.loading import MODEL_ARGS, load_model, load_tokenizer, resolve_model_path
from .weights.sharded_loading import on_meta
from .weights.weight_files import WeightFiles, has_safetensors

log = logging.getLogger(__name__)


class ESFTModule(L.LightningModule):
    """Causal-LM fine-tuning of an MoE model; which parameters train is decided by the expert selection.

    Args:
        model: local directory of a Hugging Face MoE causal LM (``from_pretrained``), or ``embedded``: the
            shipped pretrained tiny MoE (``esft_lightning.resources.pretrained_path()``). When unset, a
            randomly initialised model of ``family`` is built from ``model_config``; with neither ``model`` nor
            ``family``, the embedded model is the default.
        family: MoE family of a randomly initialised model (``deepseek_v3``, ``qwen3_moe``, ``gpt_oss``, ...).
        model_config: config overrides for the built model (hidden_size, num_hidden_layers, ...).
        tokenizer: tokenizer directory; defaults to ``model``'s, else the file-free byte tokenizer.
        trust_remote_code: allow custom modeling code from the model directory (off by default).
        dtype: parameter dtype (``float32``, ``bfloat16``) or ``auto``: bfloat16 where a CUDA GPU supports it,
            float32 on CPU.
        experts_implementation: transformers experts forward (``grouped_mm`` default, ``eager``).
        optimizer: optimizer over the trainable parameters only (default AdamW lr 1e-5, betas
            0.9/0.95, weight decay 0.1: the paper's ESFT recipe).
        lr_scheduler: optional scheduler (the paper uses a constant rate).
        router_aux_loss_coef: weight of the model's router load-balancing loss (0: off), logged unweighted as
            ``train/aux_loss``. Families that transformers gives a router loss (Mixtral, Qwen-MoE, OLMoE, ...) use
            it; DeepSeek-V2/V3, whose own modeling code trains with a sequence-level balance loss that transformers
            drops, get that loss computed here (``models.aux_loss``; the ESFT recipe: 0.001). Routers stay frozen,
            but the loss's gradient reaches the trained experts of earlier layers.
        save_trainable_only: Lightning checkpoints hold only trainable tensors (plus optimizer state).
        fsdp_bf16: under FSDP2 (ModelParallelStrategy), compute in bf16 (gradients reduced in fp32); the sharded
            parameters keep their own dtype.
        activation_checkpointing: recompute decoder-layer activations in backward (less memory).
        seed: seed of the random initialisation of a built model.
    """

    def __init__(
        self,
        model: str | None = None,
        family: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        experts_implementation: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        router_aux_loss_coef: float = 0.0,
        save_trainable_only: bool = True,
        fsdp_bf16: bool = False,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # (how the model is built: ``load_model`` reads those arguments from self.hparams)
        self.model_path = resolve_model_path(model, family)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.router_aux_loss_coef, self.save_trainable_only = router_aux_loss_coef, save_trainable_only
        self.fsdp_bf16 = fsdp_bf16
        self.tokenizer = load_tokenizer(tokenizer, self.model_path, trust_remote_code)
        self.model: nn.Module | None = None
        self.strict_loading = False  # small checkpoints hold only the trainable tensors
        self._step_started = 0.0
        self._memory_reported = False
        self.last_aux_loss: torch.Tensor | None = None  # the last training step's router aux loss, unweighted
        self.eval_loss = nn.ModuleDict()  # "val/<source>", "test/<source>" -> token-weighted MeanMetric

    # -- building --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """Build (or load) the Hugging Face model once (``models.loading.load_model``); later calls return it.

        Under FSDP2 with several ranks no rank holds the whole model: every rank builds it on the meta device,
        rank 0 profiles with each layer's weights streamed from the safetensors files, and ``configure_model``
        has every rank read its own shards from the files. Where there are no safetensors files (a random
        initialisation, ``.bin`` checkpoints) rank 0 loads the whole model and broadcasts it into the shards.
        """
        if self.model is not None:
            return self.model
        self._host_bytes_before_model = current_host_bytes()
        several = self.sharded_over_ranks
        from_files = several and has_safetensors(self.model_path)
        # Expert parallelism keeps other experts on each rank than rank 0's broadcast would fill: without files,
        # every rank builds the whole model (the same seed gives the same random weights) and keeps its part.
        each_builds = several and self.expert_parallel_size > 1 and not from_files
        if several and self.global_rank == 0:
            reason = f"no safetensors files in {self.model_path}" if self.model_path else "a random initialisation"
            how = (
                "every rank reads its own shards from the safetensors files"
                if from_files
                else f"{reason}: rank 0 builds the whole model and broadcasts it into every rank's shards"
            )
            log.info(f"ESFT FSDP loading: {how}")
        self.model = load_model(
            **{name: self.hparams[name] for name in MODEL_ARGS},
            vocab_size=len(self.tokenizer),
            on_meta=from_files or (several and self.global_rank != 0 and not each_builds),
        )
        return self.model

    @property
    def expert_parallel_size(self) -> int:
        """Ranks each MoE layer's experts are split over (``FSDP2Strategy(expert_parallel_size=N)``; 1: none)."""
        trainer = self._trainer
        return int(getattr(trainer.strategy, "expert_parallel_size", 1)) if trainer is not None else 1

    @property
    def sharded_over_ranks(self) -> bool:
        """Several FSDP2 ranks: no rank needs the whole model (it is sharded in ``configure_model``)."""
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1 and is_fsdp2(trainer.strategy)

    def setup(self, stage: str) -> None:
        allow_unused_experts_under_ddp(self.trainer.strategy)

    def configure_model(self) -> None:
        """Build the model, apply the expert selection, and under FSDP2 (ModelParallelStrategy) shard every
        decoder layer, then the rest.

        The selection (``prepare_for_sharding``: the ExpertSelectionCallback's, or a loaded checkpoint's) comes
        first, on the unsharded model, so frozen fused experts and the small trainable ones are sharded alike
        and stay parameters. With several ranks every rank then reads its shards from the files, or receives
        them from rank 0 (see ``build_model``).
        """
        model = self.build_model()
        if self._trainer is not None:  # (load_from_checkpoint calls this hook without a Trainer)
            prepare_for_sharding(model, self._trainer)
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or model_is_sharded(model):  # (configure_model runs again on a later fit)
            return
        dp_mesh = data_parallel_mesh(mesh)
        expert_mesh = None
        if self.expert_parallel_size > 1:
            expert_mesh = expert_parallel_mesh(dp_mesh.device_type, dp_mesh.size(), self.expert_parallel_size)
            localize_experts(model, expert_mesh)
            local, total = routed_expert_bytes(model)
            log.info(
                f"ESFT EP rank {self.global_rank}: routed-expert bytes {local} local of {total} "
                f"({self.expert_parallel_size} expert-parallel ranks)"
            )
        files = WeightFiles(self.model_path, model) if on_meta(model) and has_safetensors(self.model_path) else None
        rank0 = self.sharded_over_ranks and files is None and expert_mesh is None
        if rank0 and frozen_experts_in_fp8(model):
            raise ValueError(
                "frozen_experts_dtype: float8 under FSDP2 has each rank read and quantize its own experts from the "
                "model directory's safetensors files, and this model has none (a random initialisation or .bin "
                "files): save it with save_pretrained first, or keep frozen_experts_dtype: model"
            )
        read = shard_model(model, dp_mesh, self.fsdp_bf16, fill_from_rank0=rank0, files=files, expert_mesh=expert_mesh)
        local = sum(local_shard(p).numel() * p.element_size() for p in model.parameters())
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        above = peak_host_bytes() - getattr(self, "_host_bytes_before_model", 0)
        # Every rank's own numbers (rank_zero_info would show rank 0's only).
        log.info(
            f"ESFT FSDP rank {self.global_rank}: parameter bytes {local} local of {full} ({local / full:.3f}); "
            f"peak host memory above baseline {above} bytes ({above / full:.2f}x the model)"
            + (f"; {read} bytes read from the safetensors files" if files is not None else "")
        )

    @property
    def expert_config(self) -> ExpertConfig | None:
        """The expert selection applied to the model, if any."""
        return expert_config_of(self.model)

    # -- steps -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward (a transformers ``CausalLMOutput``), without a KV cache."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

    def _loss(self, batch: dict[str, torch.Tensor], training: bool = False) -> tuple[torch.Tensor, Any]:
        """Causal-LM loss; in training also the router aux loss (kept unweighted in ``last_aux_loss``) and the
        data-parallel token normalisation."""
        self.last_aux_loss: torch.Tensor | None = None
        with_aux = training and self.router_aux_loss_coef > 0
        if with_aux and has_sequence_balance_loss(self.model):  # transformers computes none for it: we do
            mask = batch.get("attention_mask")
            with SequenceBalanceLoss(self.model) as balance:  # the routing of this very forward
                loss, out = self._lm_loss(batch, training, router_logits=False)
            self.last_aux_loss = balance.loss(torch.ones_like(batch["input_ids"]) if mask is None else mask)
            return loss + self.router_aux_loss_coef * self.last_aux_loss, out
        loss, out = self._lm_loss(batch, training, router_logits=with_aux)
        if with_aux:
            if getattr(out, "aux_loss", None) is None:
                raise ValueError(
                    f"{self.model.config.model_type} computes no router aux loss; set router_aux_loss_coef: 0"
                )
            self.last_aux_loss = out.aux_loss  # (out.loss holds it weighted already: load_model sets the coef)
        return loss, out

    def _lm_loss(self, batch: dict[str, torch.Tensor], training: bool, router_logits: bool) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"output_router_logits": True} if router_logits else {}
        if training and self._trainer is not None and self.trainer.world_size > 1:
            # Data parallel averages gradients over ranks; normalising each rank's token-sum by the global
            # token count / world size makes that average the per-token mean of the global micro-batch.
            # (Under gradient accumulation each micro-batch is still normalised by its own tokens.)
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
            total = self.trainer.strategy.reduce(tokens, reduce_op="sum").clamp(min=1)  # no 0/0 on empty batches
            kwargs["num_items_in_batch"] = total / self.trainer.world_size
        out = self(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"], **kwargs)
        return out.loss, out

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch, training=True)
        size = batch["input_ids"].shape[0]
        # Under data parallel each rank's loss is its token sum / (global tokens / world): the mean over
        # ranks (sync_dist) is the global per-token loss.
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        lm_loss = loss.detach()
        if self.last_aux_loss is not None:  # the balance term is no language-model loss: not in the perplexity
            aux = self.last_aux_loss.detach()
            self.log("train/aux_loss", aux, batch_size=size, sync_dist=True)
            lm_loss = lm_loss - self.router_aux_loss_coef * aux
        # Perplexity of the global loss (exp of the rank mean), not the mean of per-rank exps.
        global_loss = self.trainer.strategy.reduce(lm_loss, reduce_op="mean")
        self.log("train/ppl", torch.exp(global_loss), batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/tokens_per_sec", tokens / elapsed, prog_bar=True, batch_size=1)
        if self.global_step == 1 and not self._memory_reported:
            # After the first optimizer step (gradients not yet cleared): what this rank holds for training.
            memory = training_memory_bytes(self.model, self.optimizers(use_pl_optimizer=False))
            if self.device.type == "cuda":  # the whole first step's peak, activations included
                memory["device_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            for logger in self.loggers:  # a one-off reading: straight to the loggers, not every n steps
                logger.log_metrics({f"memory/{k}": float(v) for k, v in memory.items()}, step=self.global_step)
            line = f"ESFT memory rank {self.global_rank}: " + ", ".join(f"{k} {v}" for k, v in memory.items())
            if self.trainer.world_size > 1:
                log.info(line)  # every rank's own shard sizes (rank_zero_info would show one)
            else:
                rank_zero_info(line)
            self._memory_reported = True

    def _eval_names(self, stage: str) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        names = getattr(dm, "test_names" if stage == "test" else "val_names", None)
        return list(names or [stage])

    def _eval_start(self, stage: str) -> None:
        for name in self._eval_names(stage):
            if f"{stage}/{name}" not in self.eval_loss:
                self.eval_loss[f"{stage}/{name}"] = MeanMetric().to(self.device)

    def _eval_step(self, stage: str, batch: dict[str, torch.Tensor], dataloader_idx: int) -> None:
        loss, _ = self._loss(batch)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self.eval_loss[f"{stage}/{self._eval_names(stage)[dataloader_idx]}"].update(loss.detach(), weight=tokens)

    def _eval_end(self, stage: str) -> None:
        # Token-weighted mean loss per source (synchronised across ranks by torchmetrics); perplexity is
        # its exponential, so no [B, T, vocab] copy of the logits is kept for a perplexity metric.
        for key, metric in self.eval_loss.items():
            if not key.startswith(f"{stage}/") or metric.update_count == 0:
                continue
            loss = metric.compute()
            self.log(f"{key}/loss", loss, add_dataloader_idx=False, batch_size=1)
            self.log(f"{key}/ppl", torch.exp(loss), add_dataloader_idx=False, batch_size=1)
            metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Per-source loss and perplexity (``test/<source>/loss``) on the datamodule's test sources."""
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) over the trainable parameters only."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: the expert selection froze everything")
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping, except under expert parallelism: there the norm spans every rank's experts."""
        if self.expert_parallel_size > 1 and gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(
                    f"gradient_clip_algorithm={gradient_clip_algorithm!r} under expert parallelism: only 'norm'"
                )
            clip_grad_norm_across_ranks([p for p in self.parameters() if p.requires_grad], gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- small checkpoints ------------------------------------------------------------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """Once experts are selected: with ``save_trainable_only`` only the trainable tensors (small checkpoints);
        otherwise the whole model under its own keys, trained rows merged, plus the small trained copies
        themselves, which resuming and evaluation load directly (FSDP loads tensor by tensor, so the copies
        cannot be re-sliced from the merged rows there). The Hugging Face model's own ``state_dict()`` keeps
        only its own keys."""
        if self.model is None or self.expert_config is None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.save_trainable_only:
            state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
            copies = {n: p for n, p in self.named_parameters() if is_trained_copy(n)}
            state.update({prefix + n: p if keep_vars else p.detach() for n, p in copies.items()})
            return state
        return {prefix + n: p if keep_vars else p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        config = self.expert_config
        checkpoint["esft"] = (
            selection_entry(self.model, config)
            if config is not None
            else {"model_type": self.model.config.model_type, "expert_config": None, "trainable_dtype": None}
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits this run; apply its expert selection if none is applied yet (``restore``).

        (``load_from_checkpoint``, and validate / test / ``Trainer.fit(ckpt_path=...)`` without an
        ExpertSelectionCallback on one process, get the checkpoint's selection here, before its tensors load. Under
        FSDP2 the model is sharded before this hook: set ``trainer.ckpt_path`` first, as ``esft`` does.)
        """
        saved = checkpoint.get("esft")
        if saved is None:
            return
        restore(self.build_model(), saved)
        trainable = sorted(n for n, p in self.named_parameters() if p.requires_grad)
        # (FSDP strategies load the module state themselves and hand this hook a checkpoint without it.)
        small = self.save_trainable_only and saved["expert_config"] is not None and "state_dict" in checkpoint
        if small and sorted(checkpoint["state_dict"]) != trainable:
            missing = sorted(set(trainable) - set(checkpoint["state_dict"]))[:5]
            raise ValueError(f"checkpoint does not match this model's trainable tensors (missing e.g. {missing})")

    def trainable_summary(self) -> dict[str, int]:
        return trainable_summary(self.model)
