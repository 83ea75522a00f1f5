"""Lightning checkpoints written atomically beside their target, so a crash keeps the last good one loadable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .files import atomic_write_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the checkpoint's own folder, fsync, then rename over the target.

    Lightning's default writer stages the file in the system temp folder and moves it into place, which is
    a copy (not atomic) when that folder is on another file system, and holds the whole checkpoint in memory
    twice. Here ``last.ckpt`` is either the previous checkpoint or the new one, never a torn file, also after
    SIGKILL or a full disk; a failed write raises ``WriteError`` naming the path. Reading is Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes local files and takes no storage_options")
        atomic_write_file(Path(path), lambda f: torch.save(checkpoint, f))
