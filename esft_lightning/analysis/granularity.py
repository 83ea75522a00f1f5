"""Coarser experts simulated on a fine-grained MoE (ESFT paper §6.4, App. B): co-selection, grouping, group routing.

1. ``count_cooccurrence``: per MoE layer, how often each pair of experts is co-selected in a token's top-K.
2. ``group_experts`` / ``expert_groups``: greedily put the experts whose co-occurrence rows are most similar
   (cosine) into groups of G.
3. ``grouped_routing`` / ``apply_grouped_routing``: every group routes as one unit: its affinity is the mean of its
   members' (the family's own scoring), each token picks K/G groups and all their members, weighted as the family
   weights its top-k. G = 1 installs nothing: the model is exactly itself.
4. ``select_expert_groups``: ESFT-Token / ESFT-Gate scores summed per group, top-p over groups, expanded back to
   the member experts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models import MoELayer, find_moe_layers
from ..models.routing_rule import topk_weighting
from ..routing.profile import affinities, infer_scoring
from ..selection.rules import ExpertConfig, Scores, select_experts

ExpertGroups = dict[int, list[list[int]]]
"""decoder-layer index -> groups, each a sorted list of expert ids; every expert in exactly one group."""

__all__ = [
    "ExpertGroups",
    "GroupedRouting",
    "apply_grouped_routing",
    "check_group_size",
    "cooccurrence_similarity",
    "count_cooccurrence",
    "expert_groups",
    "group_experts",
    "group_scores",
    "grouped_routing",
    "select_expert_groups",
]


def _routing_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """Where the experts' (hidden_states, top_k_index, top_k_weights) are: positional or any keyword names."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    routing = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t is not hidden]
    index = next(t for t in routing if not t.is_floating_point())
    weights = next(t for t in routing if t.is_floating_point())
    return hidden, index, weights


@torch.no_grad()
def count_cooccurrence(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    max_tokens: int | None = None,
    device: torch.device | None = None,
) -> dict[int, torch.Tensor]:
    """Per MoE layer, [E, E] counts: entry (i, j) = non-padding tokens whose top-K holds both i and j.

    The diagonal counts each expert's own selections (so two experts always chosen together have equal rows).
    Batches hold ``input_ids`` and ``attention_mask`` like ``profile_routing``'s; only the decoder runs, in eval
    mode, and counting stops once ``max_tokens`` non-padding tokens were seen.
    """
    layers = find_moe_layers(model)
    device = next(model.parameters()).device if device is None else torch.device(device)
    counts = {layer.index: torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64) for layer in layers}
    current: dict[str, torch.Tensor] = {}

    def hook(layer: MoELayer) -> Any:
        def count(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            _, index, weights = _routing_args(args, kwargs)
            num_experts = layer.num_experts
            index_NK, weights_NK = index.reshape(-1, index.shape[-1]), weights.reshape(-1, index.shape[-1])
            # Placeholder ids and zero-weight slots are no selection; padding tokens are routed but not counted.
            valid_NK = (index_NK >= 0) & (index_NK < num_experts) & (weights_NK != 0)
            valid_NK &= current["mask_N"].unsqueeze(1)
            chosen_NE = torch.zeros(index_NK.shape[0], num_experts, dtype=torch.float64, device=index.device)
            chosen_NE.scatter_(1, index_NK.clamp(0, num_experts - 1), valid_NK.double())
            counts[layer.index] += (chosen_NE.T @ chosen_NE).cpu()

        return count

    handles = [layer.experts.register_forward_pre_hook(hook(layer), with_kwargs=True) for layer in layers]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            current["mask_N"] = mask.reshape(-1).bool()
            decoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
            seen += int(mask.sum())
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("count_cooccurrence got no non-padding tokens: the data is empty")
    return counts


def cooccurrence_similarity(counts_EE: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarity of the co-occurrence rows (an expert never selected is similar to none)."""
    rows_EE = counts_EE.double()
    norms_E = rows_EE.norm(dim=1).clamp_min(1e-12)
    return (rows_EE @ rows_EE.T) / (norms_E[:, None] * norms_E[None, :])


def group_experts(counts_EE: torch.Tensor, group_size: int) -> list[list[int]]:
    """Greedy grouping of one layer's experts by co-occurrence similarity into groups of ``group_size``.

    Repeatedly: the most similar pair of ungrouped experts starts a group, which then takes the ungrouped expert
    most similar on average to its members until it has ``group_size``. Ties go to the lower ids, so the result
    is deterministic. Groups come back sorted (members ascending, groups by first member).
    """
    num_experts = counts_EE.shape[0]
    if counts_EE.shape != (num_experts, num_experts):
        raise ValueError(f"co-occurrence counts must be a square [E, E] matrix, got {tuple(counts_EE.shape)}")
    if group_size < 1 or num_experts % group_size:
        raise ValueError(f"{num_experts} experts cannot be split into groups of {group_size} (E % G must be 0)")
    if group_size == 1:
        return [[e] for e in range(num_experts)]
    sim_EE = cooccurrence_similarity(counts_EE)
    free_E = torch.ones(num_experts, dtype=torch.bool)
    groups = []
    while bool(free_E.any()):
        # -inf off the free block and on the diagonal: argmax (first maximum) is the lowest-id best free pair.
        pair_EE = sim_EE.masked_fill(~(free_E[:, None] & free_E[None, :]), float("-inf"))
        pair_EE.fill_diagonal_(float("-inf"))
        first, second = divmod(int(pair_EE.argmax()), num_experts)
        group = [first, second]
        free_E[group] = False
        while len(group) < group_size:
            affinity_E = sim_EE[:, group].mean(dim=1).masked_fill(~free_E, float("-inf"))
            best = int(affinity_E.argmax())
            group.append(best)
            free_E[best] = False
        groups.append(sorted(group))
    return sorted(groups)


def expert_groups(counts: Mapping[int, torch.Tensor], group_size: int) -> ExpertGroups:
    """``group_experts`` for every layer of ``count_cooccurrence``'s output."""
    return {int(layer): group_experts(c, group_size) for layer, c in sorted(counts.items())}


def _group_size(groups: list[list[int]], where: str) -> int:
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"{where}: groups must all have the same size, got sizes {sorted(sizes)}")
    return sizes.pop()


def _check_partition(groups: list[list[int]], num_experts: int, where: str) -> int:
    size = _group_size(groups, where)
    members = sorted(e for g in groups for e in g)
    if members != list(range(num_experts)):
        raise ValueError(f"{where}: groups must hold each of the {num_experts} experts exactly once")
    return size


def _check_top_k(layer: MoELayer, group_size: int) -> None:
    if layer.top_k % group_size:
        raise ValueError(
            f"layer {layer.index}: top-{layer.top_k} routing cannot pick whole groups of {group_size} "
            f"(K % G must be 0, so each token picks K/G groups)"
        )


def check_group_size(model: nn.Module, group_size: int) -> None:
    """A clear error unless every MoE layer's E and top-K are divisible by ``group_size``."""
    for layer in find_moe_layers(model):
        if group_size < 1 or layer.num_experts % group_size:
            raise ValueError(
                f"layer {layer.index}: {layer.num_experts} experts cannot be split into groups of {group_size} "
                "(E % G must be 0)"
            )
        _check_top_k(layer, group_size)


class _GroupRouter:
    """Replaces one layer's top-k (ids, weights) by whole groups chosen on mean member affinity."""

    def __init__(self, layer: MoELayer, groups: list[list[int]]) -> None:
        if layer.router is None:
            raise ValueError(f"layer {layer.index}: no router found, so its routing cannot be overridden")
        self.layer = layer
        self.members_QG = torch.tensor(groups, dtype=torch.long)
        self.groups_per_token = layer.top_k // self.members_QG.shape[1]
        rule = topk_weighting(layer)
        self.normalise, self.scale, self.choice_bias = rule.normalise, rule.scale, rule.choice_bias
        self.scoring = layer.family.scoring
        self.checked = False
        self.logits: torch.Tensor | None = None

    def router_output(self, _module: nn.Module, _inputs: tuple, output: Any) -> None:
        logits = output[self.layer.router_output_index] if isinstance(output, (tuple, list)) else output
        self.logits = logits.reshape(-1, logits.shape[-1])

    def _affinities(self, logits_NX: torch.Tensor) -> torch.Tensor:
        # Some routers score extra classes after the experts (a skip class): their affinities are over all.
        return affinities(logits_NX, self.scoring)[:, : self.layer.num_experts]

    def _weights(self, affinity_NE: torch.Tensor, index_NK: torch.Tensor, normalise: bool) -> torch.Tensor:
        picked_NK = affinity_NE.gather(1, index_NK)
        if normalise:
            picked_NK = picked_NK / (picked_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return picked_NK * self.scale

    def _resolve_rule(self, logits_NX: torch.Tensor, index_NK: torch.Tensor, weights_NK: torch.Tensor) -> None:
        """Check (or, without a flag, decide) the weighting rule against the router's own weights once."""
        where = f"layer {self.layer.index} ({self.layer.family.model_type})"
        num_experts = self.layer.num_experts
        valid_N = ((index_NK >= 0) & (index_NK < num_experts) & (weights_NK != 0)).all(dim=-1)
        if not bool(valid_N.any()):
            if self.scoring is None:
                raise ValueError(f"{where}: no routed token to tell the router's scoring function from")
            return  # nothing to compare this time; checked on a later forward
        if self.scoring is None:
            self.scoring = infer_scoring(logits_NX[valid_N], index_NK[valid_N], weights_NK[valid_N], num_experts)
            if self.scoring is None:
                raise ValueError(f"{where}: cannot tell the router's scoring function from its weights")
        affinity_NE = self._affinities(logits_NX[valid_N].detach())
        own_NK, want_NK = index_NK[valid_N].long(), weights_NK[valid_N].detach().float()
        # The flag first; a router that renormalises (or not) without one is matched on its output.
        for normalise in dict.fromkeys([self.normalise, True, False]):
            if normalise is None:
                continue
            got_NK = self._weights(affinity_NE, own_NK, normalise)
            if bool(torch.allclose(got_NK, want_NK, rtol=1e-3, atol=1e-5)):
                self.normalise, self.checked = normalise, True
                return
        raise ValueError(
            f"{where}: the router's weights are not its experts' {self.scoring} affinities times a constant "
            "(renormalised over the top-k or not), so grouped routing cannot weight groups as the family does"
        )

    def route(self, logits_NX: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Top K/G groups per token by mean member affinity; returns member ids [N, K] and their weights."""
        affinity_NE = self._affinities(logits_NX)
        choice_NE = affinity_NE if self.choice_bias is None else affinity_NE + self.choice_bias.to(affinity_NE)
        members_QG = self.members_QG.to(logits_NX.device)
        group_NQ = choice_NE.detach()[:, members_QG].mean(dim=-1)
        top_NP = group_NQ.topk(self.groups_per_token, dim=-1).indices
        index_NK = members_QG[top_NP].reshape(logits_NX.shape[0], -1)
        # Weights stay differentiable in the logits, so a trainable router learns under grouped routing too.
        return index_NK, self._weights(affinity_NE, index_NK, bool(self.normalise)).to(dtype)

    def experts_pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        _, index, weights = _routing_args(args, kwargs)
        logits, self.logits = self.logits, None
        index_NK = index.reshape(-1, index.shape[-1])
        if logits is None or logits.shape[0] != index_NK.shape[0]:
            raise RuntimeError(
                f"layer {self.layer.index}: the router's logits were not seen before its experts ran "
                "(grouped routing needs the router to run right before the experts, once per forward)"
            )
        if not self.checked:
            self._resolve_rule(logits, index_NK, weights.reshape(index_NK.shape))
        new_index, new_weights = self.route(logits, weights.dtype)
        new_index, new_weights = new_index.to(index.dtype).reshape(index.shape), new_weights.reshape(weights.shape)
        swap = {id(index): new_index, id(weights): new_weights}
        args = tuple(swap.get(id(a), a) for a in args)
        kwargs = {k: swap.get(id(v), v) for k, v in kwargs.items()}
        return args, kwargs


class GroupedRouting:
    """An installed grouped-routing override; ``remove()`` gives the model its own routing back."""

    def __init__(self, handles: list[Any], group_size: int) -> None:
        self.handles = handles
        self.group_size = group_size

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def apply_grouped_routing(model: nn.Module, groups: Mapping[int, list[list[int]]]) -> GroupedRouting:
    """Make every MoE layer route by ``groups`` (one entry per MoE layer); returns a handle to ``remove()``.

    Per token: group affinity = mean of its members' affinities (the family's scoring; DeepSeek-V3's choice bias
    included when choosing, as its router does); the top K/G groups are taken whole; each member is weighted by
    its own affinity, renormalised over the K chosen experts and scaled as the family's router does. The family's
    group-limited (node-limited) routing, if any, is not applied: the paper's simulation has none. Layers whose
    groups are singletons are left alone, so G = 1 is bitwise the model's own routing.
    """
    layers = find_moe_layers(model)
    missing = sorted({layer.index for layer in layers} - {int(k) for k in groups})
    if missing:
        raise ValueError(f"grouped routing needs groups for every MoE layer; none for layers {missing}")
    handles, sizes = [], set()
    for layer in layers:
        where = f"layer {layer.index}"
        layer_groups = groups[layer.index]
        size = _check_partition(layer_groups, layer.num_experts, where)
        _check_top_k(layer, size)
        sizes.add(size)
        if size == 1:
            continue  # singletons route exactly as the family does: install nothing
        router = _GroupRouter(layer, layer_groups)
        handles.append(layer.router.register_forward_hook(router.router_output))
        handles.append(layer.experts.register_forward_pre_hook(router.experts_pre_hook, with_kwargs=True))
    return GroupedRouting(handles, sizes.pop() if len(sizes) == 1 else 0)


@contextmanager
def grouped_routing(model: nn.Module, groups: Mapping[int, list[list[int]]]) -> Iterator[GroupedRouting]:
    """``apply_grouped_routing`` for the duration of a ``with`` block."""
    handle = apply_grouped_routing(model, groups)
    try:
        yield handle
    finally:
        handle.remove()


def group_scores(scores: Scores, groups: Mapping[int, list[list[int]]]) -> dict[int, torch.Tensor]:
    """Per layer, each group's score: the sum of its members' (token shares or gate values add up per group)."""
    out = {}
    for layer, values in scores.items():
        layer = int(layer)
        if layer not in groups:
            raise ValueError(f"scores name layer {layer}, which has no groups")
        if isinstance(values, Mapping):  # ESFT's score JSON: {"0": 0.01, "1": ...}
            values = [float(v) for _, v in sorted(values.items(), key=lambda kv: int(kv[0]))]
        scores_E = torch.as_tensor(values, dtype=torch.float64).flatten()
        _check_partition(groups[layer], scores_E.numel(), f"layer {layer}")
        members_QG = torch.tensor(groups[layer], dtype=torch.long)
        out[layer] = scores_E[members_QG].sum(dim=-1)
    return out


def select_expert_groups(
    scores: Scores,
    groups: Mapping[int, list[list[int]]],
    top_p: float = 0.2,
    *,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> ExpertConfig:
    """ESFT's top-p rule over groups (by summed member scores), expanded to the chosen groups' member experts.

    Per layer the experts come in group selection order, members ascending. ``meta`` gains ``group_size``.
    """
    per_group = group_scores(scores, groups)
    size = _group_size([g for layer in per_group for g in groups[layer]], "groups")
    chosen = select_experts(per_group, top_p, meta={"group_size": size, **(meta or {})})
    experts = {layer: [e for q in ids for e in groups[layer][q]] for layer, ids in chosen.experts.items()}
    return ExpertConfig(experts, shared_experts, non_expert_modules, chosen.meta)
