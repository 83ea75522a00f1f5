"""Load the MoE causal LM a run fine-tunes (a local directory, the embedded model or a random one) and its tokenizer."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.tokenizer import byte_tokenizer
from ..models import build_tiny_model, enable_activation_checkpointing, get_family
from ..resources import EMBEDDED, pretrained_path
from .quantized import read_quantization
from .sharded_loading import fill_from_files, load_persistent_buffers
from .weight_files import WeightFiles, has_safetensors

__all__ = ["MODEL_ARGS", "load_model", "load_tokenizer", "resolve_model_path", "param_dtype"]

MODEL_ARGS = (
    "model", "family", "model_config", "dtype", "trust_remote_code", "experts_implementation", "seed",
    "router_aux_loss_coef", "activation_checkpointing",
)  # fmt: skip
"""``load_model``'s arguments that ``ESFTModule`` takes under the same names (its config's ``model:`` section)."""


def resolve_model_path(model: str | None, family: str | None = None) -> str | None:
    """``embedded`` (or neither a model nor a family) -> the shipped pretrained tiny MoE's directory."""

    if model == EMBEDDED or (model is None and family is None):
        return str(pretrained_path())
    return model


def param_dtype(name: str = "auto") -> torch.dtype:
    """A dtype name, with ``auto`` resolved: bfloat16 where a CUDA GPU supports it, float32 otherwise."""
    if name != "auto":
        return getattr(torch, name)
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else torch.float32


def load_tokenizer(
    tokenizer: str | None = None, model_path: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """``tokenizer``'s directory, else the model directory's tokenizer, else the file-free byte tokenizer."""
    source = tokenizer or (model_path if model_path and _has_tokenizer(model_path) else None)
    if source:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)

    return byte_tokenizer()


def load_model(
    model: str | None = None,
    family: str | None = None,
    model_config: dict[str, Any] | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    experts_implementation: str | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    on_meta: bool = False,
    router_aux_loss_coef: float = 0.0,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """The Hugging Face MoE causal LM: ``from_pretrained(model)`` (a local directory or ``embedded``), else a
    randomly initialised ``family`` model with ``model_config`` overrides (``vocab_size``: the tokenizer's).

    ``on_meta``: build the same architecture with its parameters on the meta device, no weights read or
    allocated (FSDP2 ranks, which then read their shards from the files, ``sharded_loading``, or receive them
    from rank 0); buffers are real, persistent ones read from the directory's safetensors files.
    """

    # CPU grouped_mm can hit denormals on rarely-used expert rows (one run measured 48x slower).
    torch.set_flush_denormal(True)
    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    dtype = param_dtype(dtype) if isinstance(dtype, str) else dtype
    path = resolve_model_path(model, family)
    if path:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"model directory {path!r} does not exist (models load from local directories only)"
            )

        quantized = read_quantization(path)
        if on_meta or quantized:
            from accelerate import init_empty_weights

            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            # The project dequantizes quantized files itself (every load path reads through WeightFiles), so the
            # model is built plain: transformers never swaps in its own FP8/MXFP4 modules the experts split does
            # not know, and a saved (merged) model says what it holds.
            _drop_quantization_config(config)
            # Parameters on the meta device; buffers (rotary tables) built for real: they are small and
            # non-persistent ones are in no file.
            with init_empty_weights(include_buffers=False):
                built = AutoModelForCausalLM.from_config(
                    config, trust_remote_code=trust_remote_code, dtype=dtype, **extra
                )
            if has_safetensors(path):
                files = WeightFiles(path, built)
                if on_meta:
                    load_persistent_buffers(built, files)
                else:  # one process, quantized files: every weight read and dequantized here
                    fill_from_files(built, files, torch.device("cpu"))
                    built.eval()
        else:
            built = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code, dtype=dtype, **extra
            )
            if has_safetensors(path):
                WeightFiles(path, built)  # headers only: a stored tensor the model does not read is an error
        get_family(built)
    else:
        overrides = {**({} if vocab_size is None else {"vocab_size": vocab_size}), **(model_config or {})}
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            built = build_tiny_model(family, seed=seed, **extra, **overrides)
        built.to(dtype)
    if router_aux_loss_coef > 0:
        built.config.router_aux_loss_coef = router_aux_loss_coef
        if hasattr(built, "router_aux_loss_coef"):  # the CausalLM copies the coefficient at init
            built.router_aux_loss_coef = router_aux_loss_coef
    if activation_checkpointing:
        enable_activation_checkpointing(built)
    return built


def _drop_quantization_config(config: Any) -> None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
            delattr(cfg, "quantization_config")


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
