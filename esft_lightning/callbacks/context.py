"""What a callback finds in the user's run, by structure: the MoE model, the profiling batches and the tokenizer.

The callbacks ask for nothing but a LightningModule holding a Hugging Face MoE causal LM somewhere, so they
compose into a researcher's own experiment as well as into ``ESFTModule`` + ``ESFTDataModule``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.datamodule import ESFTDataModule
from ..data.sources import Source
from ..data.templates import Template
from ..data.tokenizer import as_tokenizer
from ..models import find_moe_model

__all__ = ["find_tokenizer", "moe_model", "profiling_batches", "as_sources"]


def moe_model(pl_module: L.LightningModule, model_attr: str | None = None) -> nn.Module:
    """The Hugging Face MoE model inside ``pl_module`` (see ``models.find_moe_model``); an error when there is none."""
    model = find_moe_model(pl_module, model_attr)
    if model is None:
        raise ValueError(
            f"{type(pl_module).__name__} holds no Hugging Face MoE model (a transformers PreTrainedModel with fused "
            "experts) as a submodule: assign the model to an attribute in __init__ or configure_model"
        )
    return model


def as_sources(data: Sequence[Source | str | Mapping[str, Any]] | None) -> list[Source]:
    """``profile_data`` entries (paths, ``Source``s or their dicts) as ``Source``s."""
    out = []
    for i, item in enumerate(data or []):
        if isinstance(item, Source):
            out.append(item)
        elif isinstance(item, str):
            out.append(Source(item))
        elif isinstance(item, Mapping) and isinstance(item.get("path"), str):
            out.append(Source(**item))
        else:
            raise ValueError(f"profile_data[{i}] must be a path or a {{path, ...}} source, got {item!r}")
    return out


def find_tokenizer(
    trainer: L.Trainer, pl_module: L.LightningModule, explicit: str | PreTrainedTokenizerBase | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer: ``explicit`` (a tokenizer or a local directory), else the datamodule's, else the module's."""
    if explicit is not None:
        return as_tokenizer(explicit)
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (datamodule, pl_module):
        tokenizer = getattr(owner, "tokenizer", None)
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            return tokenizer
    if isinstance(datamodule, ESFTDataModule):  # it loads its tokenizer lazily
        return datamodule.resolve_tokenizer()
    raise ValueError(
        f"no tokenizer found: pass tokenizer=<directory or tokenizer> to the callback, or give the datamodule or "
        f"{type(pl_module).__name__} a `tokenizer` attribute"
    )


def profiling_batches(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    who: str,
    batch_size: int | None = None,
    shard: bool = True,
    profile_data: Sequence[Source] = (),
    seq_length: int = 1024,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    template: Template = "esft",
) -> Iterable[Mapping[str, torch.Tensor]]:
    """Task batches to profile routing on, in this order: the datamodule's ``task_dataloader()``; else
    ``profile_data`` read with ``ESFTDataModule``'s readers, rendered with ``template`` and packed to ``seq_length``;
    else the Trainer's train
    dataloader, whose batches must be dicts with ``input_ids`` (and ``attention_mask`` when padded).

    ``shard``: under torch.distributed each rank reads its share (``False``: all of it, for a rank profiling alone).
    ``who`` names the caller in errors.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "task_dataloader"):
        return datamodule.task_dataloader(batch_size, shard=shard)
    if profile_data:
        data = ESFTDataModule(
            task=list(profile_data),
            general_ratio=0.0,
            seq_length=seq_length,
            batch_size=batch_size or 4,
            val_fraction=0.0,
            template=template,
        )
        data.tokenizer = find_tokenizer(trainer, pl_module, tokenizer)
        return data.task_dataloader(batch_size, shard=shard)
    source = trainer.fit_loop._data_source  # Lightning's record of what fit(train_dataloaders=...) was given
    if not source.is_defined():
        raise ValueError(
            f"{who} has no task data to profile: give the Trainer a datamodule with task_dataloader() "
            "(ESFTDataModule), pass profile_data=[paths] to the callback, or pass train_dataloaders to trainer.fit"
        )
    return _checked(source.dataloader(), who)


def _checked(batches: Iterable[Any], who: str) -> Iterator[Mapping[str, torch.Tensor]]:
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("input_ids")):
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"{who} profiles the train dataloader's batches, but batch {index} is {found}: profiling needs dicts "
                "with 'input_ids' [B, T] (and 'attention_mask' [B, T] when padded). Pass profile_data=[paths] to "
                "the callback, or a datamodule with task_dataloader()"
            )
        yield batch
