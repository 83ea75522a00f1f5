"""ESFTDataModule: task mixtures plus general-data mixing, packed or padded, with per-source validation."""

from __future__ import annotations

import math
import os
import warnings
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from .constants import IGNORE_INDEX, DataError
from .packing import ResumableSampler, SequenceDataset, gradient_accumulation, mixture_counts, pack_sequences
from .sources import Source, tokenize_source
from .templates import Template
from .tokenizer import as_tokenizer, byte_tokenizer
from .windows import Mixed, Windows

# torchdata 0.11 calls a torch API that torch 2.13 deprecated, once per loader iterator: noise for users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

__all__ = ["ESFTDataModule"]


class ESFTDataModule(L.LightningDataModule):
    """Task sources mixed by weight, plus general data at ``general_ratio`` : 1 to the task data.

    Every source is tokenized once per node into a memory-mapped token store (cached; see ``tokenize_source``),
    split into train / validation with ``seed``, and packed to ``seq_length`` as offsets into the store: host
    memory holds a few integers per sequence, not the tokens. An epoch draws ``num_train_sequences`` sequences
    (default: all task sequences plus their general share), split among sources by their weights,
    deterministically from ``seed``, as indices into those sequences.
    Validation has one dataloader per source, so loss is logged per task and for general data; so has
    testing (``esft test``), on the ``test`` sources when given, else on the validation sequences.

    ``batch_size`` is the micro-batch of one rank. ``global_batch_size`` (optional) is the batch of one
    optimizer step over all ranks: gradient accumulation is derived from it (global = micro-batch x
    data-parallel ranks x accumulation), so one config means the same on 1 or 8 GPUs; so does
    ``val_every_n_steps`` (validation every n optimizer steps, whatever the accumulation).
    ``template``: ``esft`` (ESFT's own chat format) or ``model`` (the tokenizer's chat template, trained on
    the tokens inside its ``{% generation %}`` blocks). ``tokenizer``: a tokenizer object or its directory;
    by default the LightningModule's ``tokenizer``, else the byte tokenizer.
    """

    def __init__(
        self,
        task: list[Source],
        general: list[Source] | None = None,
        general_ratio: float = 1.0,
        seq_length: int = 512,
        batch_size: int = 4,
        packing: Literal["pack", "pad"] = "pack",
        random_concat_ratio: float = 0.0,
        val_fraction: float = 0.05,
        max_val_sequences: int = 64,
        num_train_sequences: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        cache_dir: str | None = None,
        template: Template = "esft",
        global_batch_size: int | None = None,
        val_every_n_steps: int | None = None,
        test: list[Source] | None = None,
    ) -> None:
        super().__init__()
        if not task:
            raise ValueError("ESFTDataModule needs at least one task source")
        for key, value, ok, expected in (
            ("general_ratio", general_ratio, general_ratio >= 0, ">= 0"),
            ("seq_length", seq_length, seq_length >= 2, "an integer >= 2"),
            ("batch_size", batch_size, batch_size >= 1, "an integer >= 1"),
            ("val_fraction", val_fraction, 0 <= val_fraction < 1, "in [0, 1)"),
            ("random_concat_ratio", random_concat_ratio, 0 <= random_concat_ratio <= 1, "in [0, 1]"),
            ("max_val_sequences", max_val_sequences, max_val_sequences >= 0, ">= 0"),
            ("num_workers", num_workers, num_workers >= 0, ">= 0"),
        ):
            if not ok:
                raise ValueError(f"data.{key} must be {expected}, got {value!r}")
        if num_train_sequences is not None and num_train_sequences < 1:
            raise ValueError(f"data.num_train_sequences must be >= 1 (or null: all), got {num_train_sequences!r}")
        if template not in ("esft", "model"):
            raise ValueError(f"data.template must be 'esft' or 'model', got {template!r}")
        for group, sources in (("task", task), ("general", general or [])):
            for i, source in enumerate(sources):
                if not (isinstance(source.weight, (int, float)) and source.weight >= 0):
                    raise ValueError(f"data.{group}[{i}].weight must be a number >= 0, got {source.weight!r}")
            if sources and sum(s.weight for s in sources) <= 0 and (group == "task" or general_ratio > 0):
                raise ValueError(
                    f"data.{group} weights must sum to a positive number, got {[s.weight for s in sources]}"
                )
        self.task, self.general = list(task), list(general or [])
        self.general_ratio, self.seq_length, self.batch_size = general_ratio, seq_length, batch_size
        self.packing, self.random_concat_ratio = packing, random_concat_ratio
        self.val_fraction, self.max_val_sequences = val_fraction, max_val_sequences
        self.num_train_sequences, self.seed, self.num_workers = num_train_sequences, seed, num_workers
        self.cache_dir, self.template = cache_dir, template
        # A directory is loaded when first needed (setup); a tokenizer object is used as given.
        self.tokenizer_path = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
        self.global_batch_size, self.test = global_batch_size, list(test or [])
        if val_every_n_steps is not None and val_every_n_steps < 1:
            raise ValueError(f"data.val_every_n_steps must be >= 1 (or null), got {val_every_n_steps!r}")
        self.val_every_n_steps = val_every_n_steps
        self.tokenizer = None if self.tokenizer_path or tokenizer is None else as_tokenizer(tokenizer)
        # Per source label: the sequences as offsets into its memory-mapped token store (`Windows`).
        self.train_sequences: dict[str, Windows] = {}
        self.val_sequences: dict[str, Windows] = {}
        self.profile_sequences: dict[str, Windows] = {}
        self.train_dataset: SequenceDataset | None = None

    @property
    def sources(self) -> list[Source]:
        return self.task + (self.general if self.general_ratio > 0 else [])

    @property
    def val_names(self) -> list[str]:
        return [s.label for s in self.sources]

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: the one given, else ``tokenizer_path``'s, else the LightningModule's, else byte-level."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_path:
            self.tokenizer = as_tokenizer(self.tokenizer_path)
        elif self.trainer is not None and getattr(self.trainer.lightning_module, "tokenizer", None) is not None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        else:
            self.tokenizer = byte_tokenizer()
        return self.tokenizer

    @property
    def test_names(self) -> list[str]:
        return [s.label for s in self.test] if self.test else self.val_names

    def setup(self, stage: str | None = None) -> None:
        if self.global_batch_size is not None and self.trainer is not None:
            trainer = self.trainer
            trainer.accumulate_grad_batches = gradient_accumulation(
                self.global_batch_size, self.batch_size, trainer.world_size, trainer.accumulate_grad_batches
            )
        if self.val_every_n_steps is not None and self.trainer is not None:
            # Lightning counts validation intervals in one rank's micro-batches; this counts optimizer steps.
            self.trainer.val_check_interval = self.val_every_n_steps * self.trainer.accumulate_grad_batches
        if self.train_sequences:
            return
        tokenizer = self.resolve_tokenizer()
        names = [s.label for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data sources need distinct names (set `name`), got {names}")
        for k, source in enumerate(self.sources):
            rng = np.random.default_rng([self.seed, k])
            ds = tokenize_source(source.path, tokenizer, self.cache_dir, self.template, source.columns)
            order = rng.permutation(len(ds))
            if source.val_path:
                val_ds = tokenize_source(source.val_path, tokenizer, self.cache_dir, self.template, source.columns)
                val_idx, train_idx = None, order
            else:
                holds_out = len(ds) > 1 and self.val_fraction > 0  # val_fraction 0: every sample trains
                n_val = min(len(ds) - 1, max(1, math.ceil(self.val_fraction * len(ds)))) if holds_out else 0
                val_ds, val_idx, train_idx = ds, order[:n_val], order[n_val:]
            if len(train_idx) == 0:
                raise ValueError(f"data source {source.path}: no training samples left after the validation split")
            train, truncated = pack_sequences(
                ds, train_idx, self.seq_length, self.packing, rng, self.random_concat_ratio
            )
            val, _ = pack_sequences(
                val_ds, np.arange(len(val_ds)) if val_idx is None else val_idx, self.seq_length, self.packing, rng, 0.0
            )
            if truncated:
                warnings.warn(
                    f"{source.path}: {truncated} samples longer than seq_length={self.seq_length} were truncated",
                    stacklevel=2,
                )
            # A packed chunk can hold only prompt tokens: nothing to learn, and a batch of such chunks has a
            # mean loss of 0/0 = NaN. Training and validation skip them; routing profiling reads every chunk.
            self.profile_sequences[source.label] = train
            train, val = train.select(train.has_target()), val.select(val.has_target())
            if not len(train):
                raise DataError(f"data source {source.path}: no training sequence with a trained token after packing")
            self.train_sequences[source.label] = train
            self.val_sequences[source.label] = val.head(self.max_val_sequences)
        self.train_dataset = SequenceDataset(self._draw_mixture())

    def _draw_mixture(self) -> Mixed:
        task_total = sum(len(self.train_sequences[s.label]) for s in self.task)
        ratio = self.general_ratio if self.general else 0.0
        total = self.num_train_sequences or int(round(task_total * (1 + ratio)))
        weights = [s.weight / sum(t.weight for t in self.task) for s in self.task]
        if ratio > 0:
            gw = sum(g.weight for g in self.general)
            weights = [w / (1 + ratio) for w in weights] + [ratio / (1 + ratio) * g.weight / gw for g in self.general]
        rng = np.random.default_rng([self.seed, 1 << 20])
        pools = [self.train_sequences[source.label] for source in self.sources]
        parts, picked = [], []
        for k, (pool, count) in enumerate(zip(pools, mixture_counts(weights, total))):
            # Without replacement while the pool lasts, then a fresh permutation (epochs of the source).
            rounds = [rng.permutation(len(pool)) for _ in range(math.ceil(count / len(pool)))]
            picks = np.concatenate(rounds)[:count] if rounds else np.zeros(0, dtype=np.int64)
            parts.append(np.full(len(picks), k, dtype=np.int32))
            picked.append(picks)
        # Which source and which of its sequences: an index per drawn sequence, the tokens stay in the stores.
        order = rng.permutation(sum(len(p) for p in picked))
        return Mixed(pools, np.concatenate(parts)[order], np.concatenate(picked)[order])

    def _loader(
        self, dataset: Dataset, shuffle: bool, batch_size: int | None = None, shard: bool | None = None
    ) -> DataLoader:
        if shard is None:  # shard across ranks unless the user turned Lightning's distributed sampling off
            connector = getattr(self.trainer, "_accelerator_connector", None)
            shard = getattr(connector, "use_distributed_sampler", True)
        # StatefulDataLoader checkpoints the position of the batches handed to the training loop, not of
        # those its workers prefetched, so a resumed run continues exactly where the killed one stopped.
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            sampler=ResumableSampler(len(dataset), self.seed, shuffle, shard),
            collate_fn=self.collate,
            # Its own generator: making an iterator then draws no number from the global RNG, so a resumed run's
            # random stream matches the uninterrupted run's wherever it resumes.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(SequenceDataset(self.val_sequences[n]), shuffle=False) for n in self.val_names]

    def test_dataloader(self) -> list[DataLoader]:
        if not self.test:
            return self.val_dataloader()
        tokenizer = self.resolve_tokenizer()
        loaders = []
        for source in self.test:
            ds = tokenize_source(source.path, tokenizer, self.cache_dir, self.template, source.columns)
            rng = np.random.default_rng([self.seed, 1 << 21])
            sequences, _ = pack_sequences(ds, np.arange(len(ds)), self.seq_length, self.packing, rng, 0.0)
            sequences = sequences.select(sequences.has_target())
            if not len(sequences):
                raise DataError(f"{source.path}: no test sequence with a trained (assistant) token")
            loaders.append(self._loader(SequenceDataset(sequences), shuffle=False))
        return loaders

    def task_dataloader(self, batch_size: int | None = None, shard: bool = True) -> DataLoader:
        """Task-only training sequences (no general data), in a fixed order: what routing profiling reads.

        ``shard``: under torch.distributed each rank reads its share (``False``: every sequence, for a
        rank that profiles alone)."""
        if not self.train_sequences:
            self.setup("fit")
        seqs = Mixed.chain([self.profile_sequences[s.label] for s in self.task])
        return self._loader(SequenceDataset(seqs), shuffle=False, batch_size=batch_size, shard=shard)

    def general_dataloader(self, batch_size: int | None = None, shard: bool = True) -> DataLoader:
        """The general-data training sequences (no task data) in a fixed order, like ``task_dataloader``: what
        routing drift is measured on."""
        if not self.train_sequences:
            self.setup("fit")
        general = [s for s in self.general if s.label in self.train_sequences]
        if not general:
            raise ValueError("no general data to profile: set data.general (with data.general_ratio > 0)")
        sequences = Mixed.chain([self.train_sequences[s.label] for s in general])  # by index, not copied
        return self._loader(SequenceDataset(sequences), shuffle=False, batch_size=batch_size, shard=shard)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad to the longest sequence of the batch: pad id, label -100, attention mask 0."""
        length = max(len(x["input_ids"]) for x in items)
        pad_id = self.resolve_tokenizer().pad_token_id or 0
        batch = {
            "input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
        }
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = (
                x["input_ids"],
                x["labels"],
                1,
            )
        return batch
