"""`esft merge`: a base model plus one or more adapters -> a plain transformers directory (bf16 or base format)."""

from __future__ import annotations

import argparse

from ..adapters import merge_adapter
from .commands import describe

__all__ = ["merge_main"]


def merge_main(argv: list[str]) -> None:
    """Merge the adapters of ``argv``'s ``--adapter`` into ``--base`` and write ``--out``."""
    parser = argparse.ArgumentParser(prog="esft merge", description=describe("merge"))
    parser.add_argument("--base", required=True, help="base model directory (save_pretrained layout)")
    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        help="adapter directory (expert_cfg.json + safetensors); repeat it for several task adapters in one model",
    )
    parser.add_argument("--out", required=True, help="output directory for the merged model")
    parser.add_argument(
        "--overlap",
        choices=["refuse", "first", "average"],
        default="refuse",
        help="when adapters train the same expert: refuse (default), keep the first adapter's, or average",
    )
    parser.add_argument(
        "--format",
        choices=["bf16", "original"],
        default="bf16",
        help="for a quantized base (block FP8, MXFP4): bf16 weights, or the base's own format with the trained "
        "experts re-quantized in the same blocks (default: bf16)",
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    ns = parser.parse_args(argv)
    out = merge_adapter(ns.base, ns.adapter, ns.out, ns.trust_remote_code, overlap=ns.overlap, format=ns.format)
    print(f"merged model with {len(ns.adapter)} adapter(s) written to {out}")
