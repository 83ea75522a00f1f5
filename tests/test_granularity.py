"""Expert granularity (paper §6.4): grouping by co-occurrence, groups routing as one unit, group-level selection."""

from __future__ import annotations

import contextlib

import pytest
import torch

from esft_lightning.analysis import (
    apply_grouped_routing,
    check_group_size,
    count_cooccurrence,
    expert_groups,
    group_experts,
    group_scores,
    grouped_routing,
    select_expert_groups,
)
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.routing.profile import affinities, profile_routing

# Sigmoid routing with a choice bias and group-limited top-k (DeepSeek-V3), softmax with top-k renormalisation
# (Qwen3-MoE), softmax without (OLMoE), and a router that renormalises with no flag saying so (Mixtral).
FAMILIES = ["deepseek_v3", "qwen3_moe", "olmoe"]


def batches(n: int = 2, seq: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (3, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, seq // 2 :] = 0  # some padding, excluded from the counts
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build_tiny_model(request.param).eval()


def planted_counts(blocks: list[list[int]], num_experts: int, tokens: int = 400, seed: int = 0) -> torch.Tensor:
    """Co-occurrence counts of tokens that always select whole ``blocks`` (two blocks per token)."""
    rng = torch.Generator().manual_seed(seed)
    counts = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for _ in range(tokens):
        picked = torch.randperm(len(blocks), generator=rng)[:2].tolist()
        chosen = torch.zeros(num_experts, dtype=torch.float64)
        chosen[[e for b in picked for e in blocks[b]]] = 1
        counts += torch.outer(chosen, chosen)
    return counts


@pytest.mark.parametrize(
    "blocks",
    [
        [[0, 5], [1, 6], [2, 7], [3, 4], [8, 11], [9, 10]],
        [[0, 2, 5, 7], [1, 3, 4, 6], [8, 9, 10, 11]],
    ],
)
def test_grouping_puts_co_selected_experts_together(blocks):
    counts = planted_counts(blocks, 12)
    groups = group_experts(counts, len(blocks[0]))
    assert groups == sorted(sorted(b) for b in blocks)
    assert group_experts(counts.clone(), len(blocks[0])) == groups  # deterministic


def test_grouping_is_deterministic_and_partitions():
    counts = torch.rand(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 100
    counts = counts + counts.T
    for size in (1, 2, 4, 8, 16):
        groups = group_experts(counts, size)
        assert all(len(g) == size for g in groups)
        assert sorted(e for g in groups for e in g) == list(range(16))
        assert groups == group_experts(counts, size)
    # No information at all (never-selected experts): ties go to the lowest ids.
    assert group_experts(torch.zeros(8, 8), 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_experts(counts, 1) == [[e] for e in range(16)]


def test_divisibility_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_experts(torch.ones(16, 16), 3)
    model = build_tiny_model("qwen3_moe")  # 16 experts, top-4
    check_group_size(model, 4)
    with pytest.raises(ValueError, match="K % G"):
        check_group_size(model, 8)  # 16 % 8 == 0 but a token cannot pick half a group of 8 with K = 4
    with pytest.raises(ValueError, match="E % G"):
        check_group_size(model, 3)
    layers = find_moe_layers(model)
    eights = {layer.index: [list(range(8)), list(range(8, 16))] for layer in layers}
    with pytest.raises(ValueError, match="K % G"):
        apply_grouped_routing(model, eights)
    with pytest.raises(ValueError, match="every MoE layer"):
        apply_grouped_routing(model, {layers[0].index: [[e] for e in range(16)]})
    bad = {layer.index: [[0, 1], [1, 2], *[[e, e + 1] for e in range(4, 16, 2)]] for layer in layers}
    with pytest.raises(ValueError, match="exactly once"):
        apply_grouped_routing(model, bad)


def test_counts_are_top_k_pairs(family_model):
    name, model = family_model
    data = batches()
    counts = count_cooccurrence(model, data)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    for layer in find_moe_layers(model):
        c = counts[layer.index]
        assert torch.equal(c, c.T)
        assert int(c.diagonal().sum()) == tokens * layer.top_k  # every counted token selected K experts
        assert int(c.sum()) == tokens * layer.top_k**2


def routed_ids(model, data, groups=None):
    """The (ids, weights) every experts module receives, per layer, with grouped routing if ``groups``."""
    seen = {}
    layers = find_moe_layers(model)

    def hook(index):
        def record(_m, args, kwargs):
            routing = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
            ids = next(t for t in routing if not t.is_floating_point())
            weights = next(t for t in routing if t.is_floating_point())
            seen.setdefault(index, []).append((ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, ids.shape[-1])))

        return record

    logits = {}
    router_hooks = [
        layer.router.register_forward_hook(lambda m, i, o, k=layer.index: logits.setdefault(k, []).append(o[0]))
        for layer in layers
    ]
    with grouped_routing(model, groups) if groups else contextlib.nullcontext():
        # Registered after the override: sees what the experts really receive.
        handles = [layer.experts.register_forward_pre_hook(hook(layer.index), with_kwargs=True) for layer in layers]
        with torch.no_grad():
            for b in data:
                model(**b)
    for h in [*handles, *router_hooks]:
        h.remove()
    return {
        k: (torch.cat([i for i, _ in v]), torch.cat([w for _, w in v]), torch.cat(logits[k])) for k, v in seen.items()
    }


@pytest.mark.parametrize("size", [2, 4])
def test_groups_route_as_one_unit(family_model, size):
    name, model = family_model
    data = batches()
    groups = expert_groups(count_cooccurrence(model, data), size)
    routed = routed_ids(model, data, groups)
    for layer in find_moe_layers(model):
        ids_NK, weights_NK, logits_NE = routed[layer.index]
        layer_groups = [frozenset(g) for g in groups[layer.index]]
        group_of = {e: g for g in layer_groups for e in g}
        members = torch.tensor(groups[layer.index])
        scoring = layer.family.scoring
        affinity_NE = affinities(logits_NE, scoring)
        bias = getattr(layer.router, "e_score_correction_bias", None)
        choice_NE = affinity_NE + (0 if bias is None else bias)
        group_NQ = choice_NE[:, members].mean(-1)  # independent: mean member affinity per group
        for t in range(ids_NK.shape[0]):
            ids = set(ids_NK[t].tolist())
            assert len(ids) == layer.top_k
            chosen = {group_of[e] for e in ids}
            assert len(chosen) == layer.top_k // size and set().union(*chosen) == ids  # whole groups, K/G of them
            # ... and they are the K/G groups with the highest mean affinity
            best = group_NQ[t].topk(layer.top_k // size).indices.tolist()
            assert chosen == {layer_groups[q] for q in best}
        # Each member weighted by its own affinity, as the family weights its top-k (renormalised or not).
        picked_NK = affinity_NE.gather(1, ids_NK)
        if getattr(layer.router, "norm_topk_prob", False):
            picked_NK = picked_NK / picked_NK.sum(-1, keepdim=True)
        scale = getattr(layer.router, "routed_scaling_factor", 1.0)
        torch.testing.assert_close(weights_NK.float(), picked_NK * scale, rtol=1e-4, atol=1e-6)


def test_mixtral_renormalises_without_a_flag():
    model = build_tiny_model("mixtral").eval()  # top-2 of 8, always renormalised, no norm_topk_prob
    data = batches()
    groups = expert_groups(count_cooccurrence(model, data), 2)
    for index, (ids_NK, weights_NK, _) in routed_ids(model, data, groups).items():
        assert all(row in groups[index] for row in map(sorted, ids_NK.tolist()))  # one whole group per token
        torch.testing.assert_close(weights_NK.sum(-1), torch.ones(ids_NK.shape[0]))


def test_group_size_one_is_the_identity(family_model):
    name, model = family_model
    data = batches()
    groups = expert_groups(count_cooccurrence(model, data), 1)
    with torch.no_grad():
        want = [model(**b).logits for b in data]
        with grouped_routing(model, groups):
            got = [model(**b).logits for b in data]
        coarse = expert_groups(count_cooccurrence(model, data), 2)
        with grouped_routing(model, coarse):
            changed = [model(**b).logits for b in data]
        after = [model(**b).logits for b in data]
    for w, g, a in zip(want, got, after):
        assert torch.equal(w, g)  # bitwise
        assert torch.equal(w, a)  # removing an override restores the model's own routing
    assert not all(torch.equal(w, c) for w, c in zip(want, changed))


@pytest.mark.parametrize("kind, top_p", [("token", 0.2), ("gate", 0.1), ("token", 0.6)])
def test_group_selection_takes_whole_groups_and_meets_top_p(family_model, kind, top_p):
    name, model = family_model
    data = batches()
    groups = expert_groups(count_cooccurrence(model, data), 2)
    with grouped_routing(model, groups):
        profile = profile_routing(model, data, progress=False)
    scores = profile.scores(kind)
    config = select_expert_groups(scores, groups, top_p, meta={"score_function": kind})
    assert config.meta["group_size"] == 2 and config.meta["top_p"] == top_p
    per_group = group_scores(scores, groups)
    for layer, ids in config.experts.items():
        layer_groups = groups[layer]
        chosen = [q for q, g in enumerate(layer_groups) if set(g) <= set(ids)]
        assert sorted(e for q in chosen for e in layer_groups[q]) == sorted(ids)  # whole groups only
        total = float(per_group[layer][chosen].sum())
        smallest = min(float(per_group[layer][q]) for q in chosen)
        assert total >= top_p - 1e-9 and total - smallest < top_p  # the group that crosses top-p is the last
        # Under grouped routing the members of a group share its token score.
        if kind == "token":
            for g in layer_groups:
                assert torch.allclose(scores[layer][g], scores[layer][g[0]].expand(len(g)))
    tiny = select_expert_groups({0: [0.5, 0.1, 0.3, 0.1]}, {0: [[0, 1], [2, 3]]}, top_p=0.5)
    assert tiny.experts == {0: [0, 1]}


def test_esft_trains_under_grouped_routing():
    """The override survives apply_expert_config (the esft experts implementation) and lets a router learn."""
    model = build_tiny_model("qwen3_moe")
    data = batches()
    groups = expert_groups(count_cooccurrence(model, data), 4)
    with grouped_routing(model, groups):
        profile = profile_routing(model, data, progress=False)
        config = select_expert_groups(profile.token_scores, groups, 0.2)
        apply_expert_config(model, config)
        model.train()
        batch = {**data[0], "labels": data[0]["input_ids"]}
        model(**batch).loss.backward()
        assert any(p.grad is not None for n, p in model.named_parameters() if "esft_" in n)
    routed = routed_ids(model.eval(), data, groups)
    for layer in find_moe_layers(model):
        group_of = {e: i for i, g in enumerate(groups[layer.index]) for e in g}
        assert all(len({group_of[e] for e in row}) == 1 for row in routed[layer.index][0].tolist())

    fft = build_tiny_model("deepseek_v3")
    with grouped_routing(fft, expert_groups(count_cooccurrence(fft, data), 2)):
        fft(**{**data[0], "labels": data[0]["input_ids"]}).loss.backward()
    for layer in find_moe_layers(fft):
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_counts_add_up_over_batches():
    model = build_tiny_model("qwen3_moe").eval()
    one = count_cooccurrence(model, batches(1, seed=1))
    two = count_cooccurrence(model, batches(1, seed=2))
    both = count_cooccurrence(model, [*batches(1, seed=1), *batches(1, seed=2)])
    for k in both:
        assert torch.equal(both[k], one[k] + two[k])


def test_granularity_rows_structure(tmp_path):
    """The runner end to end on a tiny model, one step per run: one row per (G, method, seed) with its costs."""
    from esft_lightning.analysis import granularity_rows, summarise_granularity
    from esft_lightning.data import synthetic

    model = build_tiny_model("qwen3_moe", vocab_size=259)
    model.save_pretrained(tmp_path / "model")
    task = synthetic.write_jsonl(tmp_path / "task.jsonl", synthetic.chat_records("cipher", 24))
    general = synthetic.write_jsonl(
        tmp_path / "general.jsonl", synthetic.mixed_records(sorted(synthetic.GENERAL_DOMAINS), 24)
    )
    task_eval = synthetic.write_jsonl(tmp_path / "task_eval.jsonl", synthetic.eval_records("cipher", 2))
    rows = granularity_rows(
        tmp_path / "model",
        task,
        general,
        task_eval,
        task_eval,
        group_sizes=(1, 2),
        methods=("esft_token", "fft"),
        steps=1,
        seq_length=64,
        batch_size=2,
        profile_tokens=256,
        max_new_tokens=2,
        cache_dir=tmp_path / "cache",
    )
    assert [(r["group_size"], r["method"]) for r in rows] == [
        (1, "esft_token"),
        (1, "fft"),
        (2, "esft_token"),
        (2, "fft"),
    ]
    layers = find_moe_layers(model)
    for r in rows:
        assert {"group_size", "method", "task_em", "general_em", "trained_experts", "trained_params"} <= set(r)
        if r["method"] == "fft":
            assert r["trained_experts"] == sum(layer.num_experts for layer in layers)
            assert r["trained_params"] == sum(p.numel() for p in model.parameters())
        else:
            assert r["trained_experts"] % r["group_size"] == 0 and 0 < r["trained_params"] < rows[1]["trained_params"]
    summary = summarise_granularity(rows)
    assert [(s["group_size"], s["method"]) for s in summary] == [(r["group_size"], r["method"]) for r in rows]
    with pytest.raises(ValueError, match="K % G"):
        granularity_rows(tmp_path / "model", task, general, task_eval, task_eval, group_sizes=(8,), steps=1)
