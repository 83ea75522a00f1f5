"""esft-lightning: Expert-Specialized Fine-Tuning of Mixture-of-Experts LLMs with PyTorch Lightning."""

import logging as _logging

from .callbacks.expert_selection import prepare_for_sharding
from .data.datamodule import ESFTDataModule
from .data.sources import Source
from .module import ESFTModule
from .pipeline import decide, restore
from .selection.spec import SelectionSpec

__all__ = ["ESFTModule", "ESFTDataModule", "Source", "SelectionSpec", "decide", "restore", "prepare_for_sharding"]
__version__ = "0.1.0"

# Per-rank messages (shard sizes, memory) go through this logger, shown at INFO like Lightning's own messages.
_log = _logging.getLogger(__name__)
if not _log.handlers:
    _log.addHandler(_logging.StreamHandler())
    _log.setLevel(_logging.INFO)
    _log.propagate = False
