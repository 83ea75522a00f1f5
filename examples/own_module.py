"""ESFT in your own experiment: a plain LightningModule + DataLoader, with esft-lightning's callbacks added.

Nothing here is esft-lightning's but the callbacks (and, for FSDP2, one call in configure_model). The module holds
a stock transformers MoE causal LM under any attribute name, trains it in its own training_step and builds its own
optimizer over the parameters that require gradients: after ExpertSelectionCallback that is exactly the selected
experts. Copy it and swap in your model, data and loss.

    python examples/own_module.py                                  # one process, CPU, about 20 s
    python examples/own_module.py --devices 2 --strategy ddp       # two processes
    python examples/own_module.py --devices 2 --strategy fsdp      # FSDP2: your configure_model shards
    python examples/own_module.py --build_in configure_model       # the model built in configure_model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from esft_lightning import prepare_for_sharding
from esft_lightning.callbacks import ExpertSelectionCallback, RoutingDriftCallback, TaskEvalCallback
from esft_lightning.data.tokenizer import byte_tokenizer
from esft_lightning.resources import pretrained_path, synthetic_data_path


class MyExperiment(L.LightningModule):
    """A researcher's module: the MoE model is ``self.lm``; ESFT's callbacks find it by structure."""

    def __init__(self, model_dir: str, lr: float = 5e-3, build_in: str = "init") -> None:
        super().__init__()
        self.model_dir, self.lr, self.build_in = model_dir, lr, build_in
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir).train() if build_in == "init" else None
        self.tokenizer = byte_tokenizer()  # the embedded model's tokenizer (TaskEvalCallback finds it here)

    def configure_model(self) -> None:
        if self.lm is None:  # Lightning calls this hook once per fit/validate/test: build once
            self.lm = AutoModelForCausalLM.from_pretrained(self.model_dir).train()
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            prepare_for_sharding(self.lm, self.trainer)  # select experts first: it changes the parameters
            mesh = self.device_mesh["data_parallel"]
            for layer in self.lm.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.lm, mesh=mesh)
            self._sharded = True

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.1)


def cipher_batches(batch_size: int = 8, max_records: int = 256) -> DataLoader:
    """The shipped cipher task as plain ``input_ids`` / ``attention_mask`` dicts, padded per batch."""
    tokenizer = byte_tokenizer()
    texts = []
    with synthetic_data_path("cipher_train").open() as f:
        for line in list(f)[:max_records]:
            user, reply = json.loads(line)["messages"]
            texts.append(f"User: {user['content']}\n\nAssistant: {reply['content']}{tokenizer.eos_token}")

    def collate(chunk: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(chunk, padding=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    return DataLoader(texts, batch_size=batch_size, shuffle=True, collate_fn=collate)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own_module", help="log directory root")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto")
    parser.add_argument("--build_in", choices=["init", "configure_model"], default="init")
    parser.add_argument("--eval", action="store_true", help="also TaskEvalCallback and RoutingDriftCallback")
    args = parser.parse_args(argv)
    L.seed_everything(0)
    fsdp = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    strategy = {"auto": "auto", "ddp": "ddp", "fsdp": fsdp}
    callbacks: list[L.Callback] = [ExpertSelectionCallback(max_tokens=8192, save_merged=True)]
    if args.eval:
        cipher = str(synthetic_data_path("cipher_eval"))
        callbacks += [
            TaskEvalCallback([{"path": cipher, "name": "cipher"}], max_new_tokens=16, max_samples=8),
            RoutingDriftCallback(max_tokens=2048),
        ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy[args.strategy],
        max_steps=args.steps,
        callbacks=callbacks,
        default_root_dir=args.out,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    module = MyExperiment(str(pretrained_path()), build_in=args.build_in)
    trainer.fit(module, train_dataloaders=cipher_batches())
    log_dir = trainer.log_dir  # a collective under several processes: every rank asks
    optimizer = trainer.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in module.named_parameters()}
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    report = {  # what this rank's optimizer holds (local shards under FSDP2)
        "rank": trainer.global_rank,
        "log_dir": log_dir,
        "optimizer_params": sorted(names[id(p)] for p in params),
        "optimizer_param_bytes": sum(_local(p).numel() * p.element_size() for p in params),
        "optimizer_state_bytes": sum(_local(t).numel() * t.element_size() for t in state),
    }
    print("OWN_MODULE_REPORT " + json.dumps(report), flush=True)
    if trainer.is_global_zero:
        Path(log_dir, "own_module_report.json").write_text(json.dumps(report, indent=1))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


if __name__ == "__main__":
    main()
