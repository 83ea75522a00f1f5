"""Model weights in files: loading a model, reading safetensors rows (dequantizing FP8 / MXFP4), writing formats."""

from .loading import load_model, load_tokenizer, resolve_model_path
from .quantized import QuantizationScheme, read_quantization
from .weight_files import UnusedWeightsError, WeightFiles, has_safetensors

__all__ = [
    "QuantizationScheme",
    "UnusedWeightsError",
    "WeightFiles",
    "has_safetensors",
    "load_model",
    "load_tokenizer",
    "read_quantization",
    "resolve_model_path",
]
