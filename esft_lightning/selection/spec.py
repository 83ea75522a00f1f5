"""How to choose the trained experts (``SelectionSpec``): score function, top-p, exclusions, dtypes, placement.

The callback, the CLI and ``ESFTModule`` all build one; ``pipeline.decide`` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from ..routing.placement import Placement
from ..routing.profile import ScoreAveraging, check_score_averaging

__all__ = ["PAPER_TOP_P", "SCORE_FUNCTIONS", "FrozenExpertsDtype", "ScoreFunction", "SelectionSpec"]

ScoreFunction = Literal["token", "gate", "all", "random", "none"]
FrozenExpertsDtype = Literal["model", "float8"]
SCORE_FUNCTIONS: tuple[str, ...] = get_args(ScoreFunction)
PAPER_TOP_P = {"gate": 0.1, "token": 0.2}  # the paper's p for ESFT-Gate and ESFT-Token (random copies token)


@dataclass
class SelectionSpec:
    """How to choose the trained experts, and in which dtype they train."""

    score_function: ScoreFunction = "token"
    """``token`` (ESFT-Token), ``gate`` (ESFT-Gate), ``all`` (every routed expert), ``random`` (as many per layer
    as ESFT-Token picks, drawn at random), ``none`` (routed experts frozen)."""
    top_p: float | None = None
    """Cumulative score each layer's selection must reach; None: the paper's 0.1 for gate, 0.2 otherwise."""
    max_tokens: int | None = 131072
    """Non-padding task tokens to profile (paper: 2^17); None: all."""
    expert_config: str | None = None
    """An existing ``expert_cfg.json``: applied as it is, no profiling."""
    shared_experts: bool = False
    """Also train shared experts."""
    non_expert_modules: bool = False
    """Also train attention, norms, routers, embeddings and the LM head."""
    trainable_dtype: str | None = "auto"
    """dtype of the selected experts' trainable copies; ``auto``: float32 when the experts are stored in 16 bits."""
    frozen_experts_dtype: FrozenExpertsDtype = "model"
    """How the frozen routed experts are held: ``model`` (the model's dtype) or ``float8`` (block FP8, half the
    bytes of bf16, dequantized as the forward uses them: ``fp8_experts``)."""
    seed: int = 0
    """Seed of the ``random`` baseline."""
    placement: Placement = "auto"
    """Where profiling runs when the model is not on the device yet (see ``placement.placed_for_profiling``)."""
    exclude: list[str] | None = None
    """Expert configs (``expert_cfg.json``) or adapter directories whose experts must not be selected (e.g. other
    tasks' adapters the model will hold too); the next-best experts are taken instead."""
    exclude_strict: bool = True
    """True: raise when a layer cannot reach top_p without excluded experts; False: keep the experts left, warn."""
    score_averaging: ScoreAveraging = "sequence"
    """How profiling averages over the task's tokens: ``sequence`` (per sequence, then over sequences: the paper's
    Eq. 6-7) or ``pooled`` (over all tokens at once: what ESFT's released expert configs were made from)."""

    def __post_init__(self) -> None:
        check_score_averaging(self.score_averaging)
        if self.frozen_experts_dtype not in ("model", "float8"):
            raise ValueError(f"frozen_experts_dtype must be model or float8, got {self.frozen_experts_dtype!r}")
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {', '.join(SCORE_FUNCTIONS)}, got {self.score_function!r}")
        if isinstance(self.exclude, (str, Path)):  # one path given where a list is expected
            self.exclude = [str(self.exclude)]
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.trainable_dtype not in (None, "auto") and not isinstance(
            getattr(torch, str(self.trainable_dtype), None), torch.dtype
        ):
            raise ValueError(
                f"trainable_dtype must be auto or a torch dtype name such as float32, got {self.trainable_dtype!r}"
            )

    @property
    def p(self) -> float:
        """The top-p in force: ``top_p``, or the paper's default for the score function."""
        return self.top_p if self.top_p is not None else PAPER_TOP_P.get(self.score_function, 0.2)

    @property
    def score_kind(self) -> str:
        """Which profile scores drive the selection: ``gate`` for ESFT-Gate, ``token`` otherwise (random too)."""
        return "gate" if self.score_function == "gate" else "token"

    @property
    def needs_data(self) -> bool:
        """Whether deciding profiles task data (no explicit config, and a score-based function)."""
        return self.expert_config is None and self.score_function in ("token", "gate", "random")

    @property
    def flags(self) -> dict[str, bool]:
        return {"shared_experts": self.shared_experts, "non_expert_modules": self.non_expert_modules}
