"""Observe: hook every MoE layer (experts inputs, router logits) during no-grad forwards; ESFT-Gate / Token scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..models import MoELayer, find_moe_layers

ScoreAveraging = Literal["sequence", "pooled"]
SCORE_AVERAGINGS: tuple[str, ...] = get_args(ScoreAveraging)
"""``sequence``: mean per sequence over its non-padding tokens, then over sequences (the paper's Eq. 6-7, the
default). ``pooled``: counts over all tokens of all sequences / the layer's token total, which weights long
sequences more; it is how ESFT's released summaries (and so its released expert configs) were made."""


def check_score_averaging(score_averaging: str) -> None:
    """Raise ``ValueError`` unless ``score_averaging`` is one of ``SCORE_AVERAGINGS``."""
    if score_averaging not in SCORE_AVERAGINGS:
        raise ValueError(f"score_averaging must be one of {', '.join(SCORE_AVERAGINGS)}, got {score_averaging!r}")


@dataclass
class RoutingProfile:
    """Per-layer expert scores of a task (docs/design.md section 1, paper Eq. 6-7)."""

    gate_scores: dict[int, torch.Tensor]
    """layer -> [num_experts]: mean over sequences of the per-token mean gate value g_{i,t} (``pooled``: the mean
    over all tokens)."""
    token_scores: dict[int, torch.Tensor]
    """layer -> [num_experts]: mean over sequences of the per-token share of top-K slots (``pooled``: the share
    over all tokens); sums to 1."""
    num_tokens: int
    """Non-padding tokens profiled."""
    num_sequences: int = 0
    meta: dict = field(default_factory=dict)

    def scores(self, score_function: str) -> dict[int, torch.Tensor]:
        """The scores of ``token`` (ESFT-Token) or ``gate`` (ESFT-Gate)."""
        if score_function not in ("token", "gate"):
            raise ValueError(f"score_function must be 'token' or 'gate', got {score_function!r}")
        return self.token_scores if score_function == "token" else self.gate_scores

    def to_dict(self) -> dict:
        """ESFT's expert-score JSON layout: {"token_scores": {layer: {expert: score}}, "gate_scores": ...}."""

        def table(scores: dict[int, torch.Tensor]) -> dict:
            return {str(k): {str(i): float(v) for i, v in enumerate(s.tolist())} for k, s in scores.items()}

        return {
            "token_scores": table(self.token_scores),
            "gate_scores": table(self.gate_scores),
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            **self.meta,
        }


def affinities(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert affinities s_{i,t} from router logits [N, E]: the paper's, before top-k renormalisation/scaling."""
    logits = logits.float()
    if scoring == "sigmoid":
        return logits.sigmoid()
    if scoring == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    if scoring == "probabilities":  # the router already outputs probabilities
        return logits
    return logits.softmax(dim=-1)


SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus", "probabilities")


def picked_affinities(logits: torch.Tensor, index: torch.Tensor, scoring: str) -> torch.Tensor:
    """``affinities(logits, scoring).gather(1, index)`` without materialising every expert's affinity."""
    logits = logits.float()
    picked = logits.gather(1, index)
    if scoring == "softmax":
        return (picked - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    return affinities(picked, scoring)  # elementwise scorings commute with the gather


def _fallback_scoring(logits: torch.Tensor) -> str:
    """Without matching weights: router outputs that are already distributions are probabilities, else softmax."""
    logits = logits.float()
    is_distribution = bool((logits >= 0).all()) and bool(torch.allclose(logits.sum(-1), torch.ones(()), atol=1e-4))
    return "probabilities" if is_distribution else "softmax"


def infer_scoring(
    logits: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int | None = None
) -> str | None:
    """The scoring function whose affinities, renormalised over each token's top-k, equal the router's own weights.

    Routers weight a token's experts by their affinities, renormalised and/or scaled; the ratios between a token's
    weights therefore identify the function. None when no candidate matches (or a token has a single expert).
    """
    valid = (top_k_index >= 0) & (top_k_index < (num_experts or logits.shape[-1])) & (top_k_weights != 0)
    rows = valid.all(dim=-1) & (valid.shape[-1] > 1)
    if not bool(rows.any()):
        return None
    index, weights = top_k_index[rows], top_k_weights[rows].float()
    want = weights / weights.sum(dim=-1, keepdim=True)
    best, best_error = None, 1e-3
    for scoring in SCORINGS:
        picked = affinities(logits[rows], scoring).gather(1, index)
        got = picked / picked.sum(dim=-1, keepdim=True)
        error = float((got - want).abs().max())
        if error < best_error:
            best, best_error = scoring, error
    return best


class _LayerAccumulator:
    """Sums per-sequence-normalised statistics for one MoE layer from its experts' own inputs."""

    def __init__(self, layer: MoELayer, device: torch.device) -> None:
        self.layer = layer
        self.scoring = layer.family.scoring
        self.gate = torch.zeros(layer.num_experts, dtype=torch.float64, device=device)
        self.token = torch.zeros(layer.num_experts, dtype=torch.float64, device=device)
        self.logits: torch.Tensor | None = None

    def router_output(self, output: torch.Tensor | tuple) -> None:
        logits = output[self.layer.router_output_index] if isinstance(output, (tuple, list)) else output
        # Some routers score extra classes after the experts (e.g. a skip expert): affinities over all classes.
        if isinstance(logits, torch.Tensor) and logits.dim() >= 2 and logits.shape[-1] >= self.layer.num_experts:
            self.logits = logits.reshape(-1, logits.shape[-1])

    def __call__(self, token_weight: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        # token_weight[t] = 1 / (non-padding tokens of t's sequence), 0 for padding: summing weighted
        # values over tokens gives the sum over sequences of per-sequence means (pooled: 1, a plain sum).
        k = topk_idx.shape[-1]
        topk_idx, topk_weights = topk_idx.reshape(-1, k), topk_weights.reshape(-1, k)
        if topk_idx.shape[0] != token_weight.shape[0]:
            raise ValueError(
                f"layer {self.layer.index}: the experts received {topk_idx.shape[0]} tokens, the batch has "
                f"{token_weight.shape[0]}: cannot attribute routing to sequences"
            )
        num_experts = self.layer.num_experts
        # Placeholder ids (>= num_experts) and zero-weight slots are not routings to an expert.
        valid = (topk_idx >= 0) & (topk_idx < num_experts) & (topk_weights != 0)
        safe_idx = topk_idx.clamp(0, num_experts - 1)
        logits, self.logits = self.logits, None
        if logits is not None and logits.shape[0] == topk_idx.shape[0]:
            if self.scoring is None:
                self.scoring = infer_scoring(logits, topk_idx, topk_weights, num_experts) or _fallback_scoring(logits)
            affinity = picked_affinities(logits, safe_idx, self.scoring)
        else:  # no router logits to observe: the experts' routing weights are the affinities
            self.scoring = "routing_weights"
            affinity = topk_weights.float()
        w = token_weight.unsqueeze(1).expand_as(topk_idx) * valid
        flat_idx = safe_idx.reshape(-1)
        self.gate.index_add_(0, flat_idx, (w * affinity).reshape(-1).double())
        self.token.index_add_(0, flat_idx, (w / k).reshape(-1).double())


def _as_batch(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch, torch.ones_like(batch)
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return input_ids, torch.ones_like(input_ids) if mask is None else mask


@torch.no_grad()
def profile_routing(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_tokens: int | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    all_reduce: bool | None = None,
    score_averaging: ScoreAveraging = "sequence",
) -> RoutingProfile:
    """Run ``batches`` through ``model`` and score every routed expert of every MoE layer.

    Each batch holds ``input_ids`` [B, T] and ``attention_mask`` [B, T] (0 = padding; padding tokens
    are routed by the model but excluded from every statistic). Profiling stops once ``max_tokens``
    non-padding tokens were seen (the batch that crosses it is included). The model is observed through
    forward hooks on its routers; only the decoder runs (no LM head), in eval mode. Under
    ``torch.distributed`` each rank profiles its own batches and the sums are all-reduced, so every
    rank returns the same scores (``all_reduce=False``: this process's batches only, e.g. when rank 0
    profiles alone). ``device``: where inputs go (default: the model's; set it when the model's weights are
    streamed to another device during forward). ``score_averaging``: ``sequence`` (paper Eq. 6-7) or ``pooled``
    (ESFT's released summaries), see ``SCORE_AVERAGINGS``.
    """
    check_score_averaging(score_averaging)
    pooled = score_averaging == "pooled"
    layers = find_moe_layers(model)
    device = next(model.parameters()).device if device is None else torch.device(device)
    if all_reduce is None:
        all_reduce = dist.is_available() and dist.is_initialized()
    accumulators = {layer.index: _LayerAccumulator(layer, device) for layer in layers}
    current: dict[str, torch.Tensor] = {}

    def router_hook(acc: _LayerAccumulator) -> Callable[[nn.Module, tuple, Any], None]:
        return lambda _module, _inputs, output: acc.router_output(output)

    def experts_hook(acc: _LayerAccumulator) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            # experts(hidden_states, top_k_index, top_k_weights), positionally or by any keyword names
            hidden = args[0] if args else kwargs.get("hidden_states")
            routing = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t is not hidden]
            index = next(t for t in routing if not t.is_floating_point())
            weights = next(t for t in routing if t.is_floating_point())
            acc(current["token_weight"], index, weights)

        return hook

    handles = []
    for layer in layers:
        acc = accumulators[layer.index]
        handles.append(layer.experts.register_forward_pre_hook(experts_hook(acc), with_kwargs=True))
        if layer.router is not None:
            handles.append(layer.router.register_forward_hook(router_hook(acc)))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    was_training = model.training
    model.eval()
    num_tokens, num_sequences = 0, 0
    bar = tqdm(total=max_tokens, desc="Profiling routing", unit="tok", disable=not progress, leave=False)
    try:
        for batch in batches:
            input_ids, mask = _as_batch(batch)
            input_ids, mask = input_ids.to(device), mask.to(device)
            lengths = mask.sum(dim=1)
            keep = lengths > 0
            if not bool(keep.all()):
                input_ids, mask, lengths = input_ids[keep], mask[keep], lengths[keep]
            if input_ids.numel() == 0:
                continue
            weight = mask.to(torch.float64)
            if not pooled:
                weight = weight / lengths.unsqueeze(1).to(torch.float64)
            current["token_weight"] = weight.reshape(-1).float()
            decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
            batch_tokens = int(lengths.sum())
            num_tokens += batch_tokens
            num_sequences += int(input_ids.shape[0])
            bar.update(batch_tokens)
            if max_tokens is not None and num_tokens >= max_tokens:
                break
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)

    totals = torch.tensor([num_tokens, num_sequences], dtype=torch.float64, device=device)
    if all_reduce:
        for acc in accumulators.values():
            dist.all_reduce(acc.gate)
            dist.all_reduce(acc.token)
        dist.all_reduce(totals)
    num_tokens, num_sequences = int(totals[0]), int(totals[1])
    if num_sequences == 0:
        raise ValueError("profile_routing got no non-padding tokens: the profiling data is empty")
    divisor = num_tokens if pooled else num_sequences  # sums of per-token values, or of per-sequence means
    gate = {i: (a.gate / divisor).float().cpu() for i, a in accumulators.items()}
    token = {i: (a.token / divisor).float().cpu() for i, a in accumulators.items()}
    scoring = {i: a.scoring for i, a in accumulators.items()}
    meta = {"scoring": scoring, "score_averaging": score_averaging}
    return RoutingProfile(gate, token, num_tokens, num_sequences, meta=meta)
