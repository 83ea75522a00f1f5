"""Constants several rooms share: how much of a device's memory each kind of work may count on."""

from __future__ import annotations

__all__ = ["GENERATION_HEADROOM", "PROFILING_HEADROOM", "TRAINING_HEADROOM"]

TRAINING_HEADROOM = 0.9
"""Share of device memory a training plan may fill (``esft plan``, the check ``esft fit`` runs first): the rest is
the CUDA context, NCCL buffers and allocator fragmentation."""
PROFILING_HEADROOM = 0.85
"""Share of free GPU memory the model may take when routing profiling moves it there: the profiling forward's
activations and the allocator's slack need the rest."""
GENERATION_HEADROOM = 0.8
"""Share of free memory an unsharded copy for generation may take (FSDP2 evaluation): the KV cache, the logits,
the allocator's slack and whatever else grows on the device need the rest."""
