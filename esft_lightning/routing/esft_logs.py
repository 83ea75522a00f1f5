"""Read ESFT's routing logs (``expert_weights_<L>.txt``) into this project's expert scores, per sequence or pooled.

deepseek-ai/ESFT profiles a task by writing, for every MoE layer L, a file ``expert_weights_<L>.txt`` with one line
per sequence: the top-K expert ids of every token (K per token, token after token), then the K matching gate
weights of every token, tab separated (so 2 x K x T fields for T tokens). ``read_esft_logs`` turns such a folder into
a ``RoutingProfile`` in either averaging (``sequence``: the paper's Eq. 6-7; ``pooled``: how ESFT's released
summaries were made), so ESFT users can compare the two and select experts from what they already profiled,
without running the model again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from .profile import RoutingProfile, ScoreAveraging, check_score_averaging

__all__ = ["ESFT_LOG_PATTERN", "LayerLog", "layer_scores", "read_esft_logs", "read_layer_log", "round_scores"]

ESFT_LOG_PATTERN = re.compile(r"^expert_weights_(\d+)\.txt$")
DEEPSEEK_V2_LITE_TOP_K = 6  # the model ESFT profiled: its released logs hold 6 experts per token

LayerLog = list[tuple[np.ndarray, np.ndarray]]
"""One layer's log: per sequence, its expert ids [T, K] (int64) and gate weights [T, K] (float64)."""


def read_layer_log(path: str | os.PathLike, top_k: int = DEEPSEEK_V2_LITE_TOP_K) -> LayerLog:
    """One ``expert_weights_<L>.txt``: per sequence (line), its expert ids [T, K] and gate weights [T, K].

    Raises ``ValueError`` naming the file and line when a line does not hold 2 x ``top_k`` fields per token or
    its fields are not ids then weights.
    """
    path = Path(path)
    sequences: LayerLog = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue  # a trailing empty line
            if len(fields) % (2 * top_k):
                raise ValueError(
                    f"{path}:{number}: {len(fields)} fields, not a multiple of 2 x top_k = {2 * top_k} "
                    "(each token's top-k expert ids, then their gate weights)"
                )
            half = len(fields) // 2
            try:
                ids = np.array(fields[:half], dtype=np.int64).reshape(-1, top_k)
                weights = np.array(fields[half:], dtype=np.float64).reshape(-1, top_k)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error} (expected integer ids, then float weights)") from None
            if (ids < 0).any():
                raise ValueError(f"{path}:{number}: negative expert id {int(ids.min())}")
            sequences.append((ids, weights))
    if not sequences:
        raise ValueError(f"{path}: no sequences (empty routing log)")
    return sequences


def layer_scores(
    sequences: LayerLog, num_experts: int, score_averaging: ScoreAveraging = "sequence"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate scores, token scores) [num_experts] of one layer's log, in float64.

    ``sequence``: each sequence's selections / (K x its tokens) and summed weights / its tokens, then the mean over
    sequences (paper Eq. 6-7). ``pooled``: selections / (K x all tokens) and summed weights / all tokens.
    """
    check_score_averaging(score_averaging)
    gate, token = np.zeros(num_experts), np.zeros(num_experts)
    if score_averaging == "pooled":
        ids = np.concatenate([i.reshape(-1) for i, _ in sequences])
        weights = np.concatenate([w.reshape(-1) for _, w in sequences])
        tokens, top_k = sum(i.shape[0] for i, _ in sequences), sequences[0][0].shape[1]
        token = np.bincount(ids, minlength=num_experts) / (top_k * tokens)
        gate = np.bincount(ids, weights=weights, minlength=num_experts) / tokens
    else:
        for ids, weights in sequences:
            tokens, top_k = ids.shape
            token += np.bincount(ids.reshape(-1), minlength=num_experts) / (top_k * tokens)
            gate += np.bincount(ids.reshape(-1), weights=weights.reshape(-1), minlength=num_experts) / tokens
        token, gate = token / len(sequences), gate / len(sequences)
    return torch.from_numpy(gate), torch.from_numpy(token)


def read_esft_logs(
    directory: str | os.PathLike,
    score_averaging: ScoreAveraging = "sequence",
    num_experts: int | None = None,
    top_k: int = DEEPSEEK_V2_LITE_TOP_K,
) -> RoutingProfile:
    """Expert scores of a folder of ESFT routing logs (``expert_weights_<L>.txt``, L = the MoE layer index).

    ``num_experts``: routed experts per layer (default: the largest id in the logs + 1; give it when an expert may
    never have been picked). ``top_k``: experts per token in the logs (DeepSeek-V2-Lite's 6). The scores are
    float64, so rounding them to ESFT's 4 decimals is exact; ``num_tokens`` / ``num_sequences`` are those of every
    layer (ESFT logs the same tokens in every layer; a folder whose layers disagree is an error).
    """
    check_score_averaging(score_averaging)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"ESFT routing logs: {directory} is not a directory")
    files = {int(m.group(1)): p for p in directory.iterdir() if (m := ESFT_LOG_PATTERN.match(p.name))}
    if not files:
        raise ValueError(f"{directory}: no expert_weights_<layer>.txt files (ESFT's routing logs)")
    logs = {layer: read_layer_log(files[layer], top_k) for layer in sorted(files)}
    found = 1 + max(int(ids.max()) for log in logs.values() for ids, _ in log)
    if num_experts is None:
        num_experts = found
    elif found > num_experts:
        raise ValueError(f"{directory}: the logs route to expert {found - 1}, but num_experts is {num_experts}")
    shapes = {layer: (sum(ids.shape[0] for ids, _ in log), len(log)) for layer, log in logs.items()}
    first = next(iter(shapes.values()))
    differing = [layer for layer, shape in shapes.items() if shape != first]
    if differing:  # the layers of one profiling run see the same sequences
        raise ValueError(
            f"{directory}: layers {differing} log other tokens/sequences than layer {min(shapes)} {first}: "
            "not one profiling run"
        )
    gate, token = {}, {}
    for layer, log in logs.items():
        g, t = layer_scores(log, num_experts, score_averaging)
        gate[layer], token[layer] = g, t
    meta = {"score_averaging": score_averaging, "source": f"ESFT routing logs {directory}", "top_k": top_k}
    return RoutingProfile(gate, token, num_tokens=first[0], num_sequences=first[1], meta=meta)


def round_scores(scores: dict[int, torch.Tensor], decimals: int = 4) -> dict[int, torch.Tensor]:
    """Scores rounded to ``decimals`` (in float64), as ESFT's summaries store them.

    ESFT selected its released configs from those rounded summaries; where rounding ties two experts (intent,
    layer 17: experts 45 and 2 both 0.0309) the released config follows the rounded values, so selecting from
    rounded scores is what reproduces it.
    """
    return {layer: torch.round(s.double(), decimals=decimals) for layer, s in scores.items()}
