"""Optimizers for trainable state that would not fit the GPU: AdamW with its moment estimates in host memory."""

from .host_offload import DEFAULT_CHUNK_BYTES, HostOffloadAdamW

__all__ = ["DEFAULT_CHUNK_BYTES", "HostOffloadAdamW"]
