"""profile_routing against an independent, loop-by-loop computation from the routers' own outputs."""

import pytest
import torch

from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.routing.profile import affinities, infer_scoring, profile_routing

from .conftest import FAMILIES


def reference_scores(model, batches):
    """Paper Eq. 6-7 with explicit loops: per sequence, mean over its non-padding tokens; then mean."""
    layers = find_moe_layers(model)
    captured = {}
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o, k=layer.index: captured.__setitem__(k, (o[0], o[2])))
        for layer in layers
    ]
    gate = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    token = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    n_seq = 0
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            model(input_ids=ids, attention_mask=mask)
            for layer in layers:
                logits, topk = captured[layer.index]
                logits = logits.double().view(ids.shape[0], ids.shape[1], -1)
                topk = topk.view(ids.shape[0], ids.shape[1], -1)
                scoring = layer.family.scoring
                affinity = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
                for b in range(ids.shape[0]):
                    positions = [t for t in range(ids.shape[1]) if mask[b, t]]
                    for t in positions:
                        for e in topk[b, t].tolist():
                            gate[layer.index][e] += affinity[b, t, e] / len(positions)
                            token[layer.index][e] += 1.0 / layer.top_k / len(positions)
            n_seq += ids.shape[0]
    for h in hooks:
        h.remove()
    return {k: v / n_seq for k, v in gate.items()}, {k: v / n_seq for k, v in token.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_independent_computation_with_padding(family):
    model = build_tiny_model(family)
    batches = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 256, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        mask[2, 2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    profile = profile_routing(model, batches, progress=False)
    gate, token = reference_scores(model, batches)
    assert profile.num_tokens == int(sum(b["attention_mask"].sum() for b in batches))
    assert profile.num_sequences == 6
    for layer in gate:
        torch.testing.assert_close(profile.gate_scores[layer].double(), gate[layer], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(profile.token_scores[layer].double(), token[layer], atol=1e-6, rtol=1e-5)
        assert abs(float(profile.token_scores[layer].sum()) - 1.0) < 1e-5


def test_padding_tokens_do_not_count():
    model = build_tiny_model("qwen3_moe")
    ids = torch.randint(0, 256, (1, 8))
    short = profile_routing(model, [{"input_ids": ids[:, :5], "attention_mask": torch.ones(1, 5)}], progress=False)
    padded_ids = torch.cat([ids[:, :5], torch.full((1, 3), 7)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    padded = profile_routing(model, [{"input_ids": padded_ids, "attention_mask": mask}], progress=False)
    for layer in short.token_scores:
        torch.testing.assert_close(short.token_scores[layer], padded.token_scores[layer])
        torch.testing.assert_close(short.gate_scores[layer], padded.gate_scores[layer])


def test_max_tokens_stops_early_and_model_left_as_found():
    model = build_tiny_model("mixtral")
    model.train()
    seen = []
    batches = ({"input_ids": torch.randint(0, 256, (2, 10)), "attention_mask": torch.ones(2, 10)} for _ in range(10))

    def counting():
        for b in batches:
            seen.append(1)
            yield b

    profile = profile_routing(model, counting(), max_tokens=35, progress=False)
    assert profile.num_tokens == 40 and len(seen) == 2
    assert model.training
    assert all(not layer.router._forward_hooks for layer in find_moe_layers(model))


AFFINITY = {  # what each router's source computes before top-k (read from transformers' modeling files)
    "gpt_oss": lambda logits: logits.softmax(-1),  # softmax over the top-k logits == renormalised full softmax
    "glm4_moe": lambda logits: logits.sigmoid(),  # bias-corrected selection, sigmoid affinities
    "deepseek_v4": lambda logits: torch.nn.functional.softplus(logits).sqrt(),  # scoring_func in the config
    "zaya": lambda logits: logits.softmax(-1),  # softmax over the experts and one skip class
    "gemma4_text": lambda probs: probs,  # the router returns probabilities
}


@pytest.mark.parametrize("family", sorted(AFFINITY))
def test_gate_scores_of_discovered_families_follow_their_routers(family):
    model = build_tiny_model(family).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    layers = find_moe_layers(model)
    logits, routing = {}, {}
    hooks = []
    for layer in layers:
        hooks.append(layer.router.register_forward_hook(lambda m, i, o, k=layer.index: logits.__setitem__(k, o[0])))
        hooks.append(
            layer.experts.register_forward_pre_hook(lambda m, a, k=layer.index: routing.__setitem__(k, a[1:3]))
        )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    profile = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    for layer in layers:
        affinity = AFFINITY[family](logits[layer.index].double().reshape(ids.numel(), -1))
        index, weights = (t.reshape(ids.numel(), -1) for t in routing[layer.index])
        want = torch.zeros(layer.num_experts, dtype=torch.float64)
        for b in range(ids.shape[0]):
            length = int(mask[b].sum())
            for t in range(length):
                row = b * ids.shape[1] + t
                for e, w in zip(index[row].tolist(), weights[row].tolist()):
                    if e < layer.num_experts and w != 0:
                        want[e] += affinity[row, e] / length / ids.shape[0]
        torch.testing.assert_close(profile.gate_scores[layer.index].double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("renormalise", [True, False])
def test_scoring_inferred_from_the_routers_own_weights(scoring, renormalise):
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    affinity = affinities(logits, scoring)
    weights, index = affinity.topk(3, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True) if renormalise else 2.5 * weights  # norm_topk / scaling
    assert infer_scoring(logits, index, weights) == scoring
    assert infer_scoring(logits, index, torch.rand(64, 3)) is None  # weights unrelated to the logits
