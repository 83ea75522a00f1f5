"""Files shipped with the package: the pretrained embedded tiny MoE and the synthetic data made for it."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).parent
EMBEDDED = "embedded"
"""The ``model`` name (``ESFTModule(model="embedded")``) of the shipped pretrained tiny MoE."""


def pretrained_path() -> Path:
    """Folder of the shipped pretrained tiny MoE (``save_pretrained`` layout; byte tokenizer, none saved)."""
    path = RESOURCES / "pretrained"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded pretrained model is missing from {path}: reinstall esft-lightning or recreate it with "
            "`python -m esft_lightning.resources.pretrain --seed 0`"
        )
    return path


def synthetic_data_path(name: str) -> Path:
    """A shipped synthetic data file, e.g. ``intent_train``, ``intent_eval``, ``general_train``, ``general_eval``."""
    path = RESOURCES / "synthetic" / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in (RESOURCES / "synthetic").glob("*.jsonl"))
        raise FileNotFoundError(f"no shipped synthetic data file {name!r}; known: {', '.join(known)}")
    return path
