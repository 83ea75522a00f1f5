"""Observe: hook every MoE router during no-grad forwards and compute ESFT-Gate / ESFT-Token scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .models import MoELayer, find_moe_layers


@dataclass
class RoutingProfile:
    """Per-layer expert scores of a task (DESIGN section 1, paper Eq. 6-7)."""

    gate_scores: dict[int, torch.Tensor]
    """layer -> [num_experts]: mean over sequences of the per-token mean gate value g_{i,t}."""
    token_scores: dict[int, torch.Tensor]
    """layer -> [num_experts]: mean over sequences of the per-token share of top-K slots; sums to 1."""
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


class _LayerAccumulator:
    """Sums per-sequence-normalised statistics for one MoE layer from its router's outputs."""

    def __init__(self, layer: MoELayer, device: torch.device) -> None:
        self.layer = layer
        self.gate = torch.zeros(layer.num_experts, dtype=torch.float64, device=device)
        self.token = torch.zeros(layer.num_experts, dtype=torch.float64, device=device)

    def __call__(self, token_weight: torch.Tensor, logits: torch.Tensor, topk_idx: torch.Tensor) -> None:
        # token_weight[t] = 1 / (non-padding tokens of t's sequence), 0 for padding: summing weighted
        # values over tokens gives the sum over sequences of per-sequence means.
        logits = logits.float()
        picked = logits.gather(1, topk_idx)
        if self.layer.family.scoring == "sigmoid":
            affinity = picked.sigmoid()
        else:
            affinity = (picked - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
        k = topk_idx.shape[1]
        w = token_weight.unsqueeze(1).expand_as(topk_idx)
        flat_idx = topk_idx.reshape(-1)
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
) -> RoutingProfile:
    """Run ``batches`` through ``model`` and score every routed expert of every MoE layer.

    Each batch holds ``input_ids`` [B, T] and ``attention_mask`` [B, T] (0 = padding; padding tokens
    are routed by the model but excluded from every statistic). Profiling stops once ``max_tokens``
    non-padding tokens were seen (the batch that crosses it is included). The model is observed through
    forward hooks on its routers; only the decoder runs (no LM head), in eval mode. Under
    ``torch.distributed`` each rank profiles its own batches and the sums are all-reduced, so every
    rank returns the same scores (``all_reduce=False``: this process's batches only, e.g. when rank 0
    profiles alone). ``device``: where inputs go (default: the model's; set it when the model's weights are
    streamed to another device during forward).
    """
    layers = find_moe_layers(model)
    device = next(model.parameters()).device if device is None else torch.device(device)
    if all_reduce is None:
        all_reduce = dist.is_available() and dist.is_initialized()
    accumulators = {layer.index: _LayerAccumulator(layer, device) for layer in layers}
    current: dict[str, torch.Tensor] = {}

    def make_hook(acc: _LayerAccumulator) -> Callable[[nn.Module, tuple, tuple], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: tuple) -> None:
            logits, _weights, topk_idx = output[0], output[1], output[2]
            acc(current["token_weight"], logits, topk_idx)

        return hook

    handles = [layer.router.register_forward_hook(make_hook(accumulators[layer.index])) for layer in layers]
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
            weight = mask.to(torch.float64) / lengths.unsqueeze(1).to(torch.float64)
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
    gate = {i: (a.gate / num_sequences).float().cpu() for i, a in accumulators.items()}
    token = {i: (a.token / num_sequences).float().cpu() for i, a in accumulators.items()}
    return RoutingProfile(gate, token, num_tokens, num_sequences)
