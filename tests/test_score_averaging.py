"""score_averaging (sequence | pooled) through profiling, SelectionSpec, the callback, `esft profile/select`."""

from types import SimpleNamespace

import pytest
import torch

from esft_lightning.callbacks import ExpertSelectionCallback
from esft_lightning.cli.profile_select import configured_spec
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.pipeline import apply, decide, selection_entry
from esft_lightning.routing.profile import profile_routing
from esft_lightning.selection.spec import SelectionSpec


def padded_batches():
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # a 3-token sequence beside two 10-token ones: the averagings weight it differently
    return [{"input_ids": ids, "attention_mask": mask}]


def pooled_reference(model, batches):
    """Explicit counting over all non-padding tokens: token score = selections / (K x tokens), gate score = summed
    top-k weights / tokens (the tiny DeepSeek-V2's weights are its softmax affinities: scaling factor 1)."""
    layers = find_moe_layers(model)
    picked = {}
    hooks = [
        layer.router.register_forward_hook(lambda m, i, o, k=layer.index: picked.__setitem__(k, (o[1], o[2])))
        for layer in layers
    ]
    counts = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    weights = {layer.index: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].reshape(-1).bool()
            tokens += int(keep.sum())
            for layer in layers:
                top_w, top_i = picked[layer.index]
                for expert, w in zip(top_i[keep].reshape(-1).tolist(), top_w[keep].reshape(-1).tolist()):
                    counts[layer.index][expert] += 1
                    weights[layer.index][expert] += w
    for h in hooks:
        h.remove()
    token = {k: v / (layers[0].top_k * tokens) for k, v in counts.items()}
    return token, {k: v / tokens for k, v in weights.items()}


def test_pooled_profile_counts_over_all_tokens_and_differs_from_per_sequence():
    model = build_tiny_model("deepseek_v2")
    pooled = profile_routing(model, padded_batches(), progress=False, score_averaging="pooled")
    sequence = profile_routing(model, padded_batches(), progress=False)
    want, want_gate = pooled_reference(model, padded_batches())
    assert pooled.num_tokens == 23 and pooled.meta["score_averaging"] == "pooled"
    assert sequence.meta["score_averaging"] == "sequence" and pooled.to_dict()["score_averaging"] == "pooled"
    for layer, scores in want.items():
        torch.testing.assert_close(pooled.token_scores[layer].double(), scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(pooled.gate_scores[layer].double(), want_gate[layer], atol=1e-6, rtol=0)
    assert any(not torch.allclose(pooled.token_scores[k], sequence.token_scores[k]) for k in want)


def test_the_averagings_agree_when_every_sequence_has_the_same_length():
    model = build_tiny_model("qwen3_moe")
    batches = [{"input_ids": torch.randint(0, 256, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}]
    pooled = profile_routing(model, batches, progress=False, score_averaging="pooled")
    sequence = profile_routing(model, batches, progress=False, score_averaging="sequence")
    for layer in pooled.token_scores:  # a mean of equal-sized means is the pooled mean
        torch.testing.assert_close(pooled.token_scores[layer], sequence.token_scores[layer])
        torch.testing.assert_close(pooled.gate_scores[layer], sequence.gate_scores[layer])


def test_spec_callback_and_command_line_carry_the_averaging_into_config_and_checkpoint():
    with pytest.raises(ValueError, match="score_averaging must be one of sequence, pooled"):
        SelectionSpec(score_averaging="mean")
    assert SelectionSpec().score_averaging == "sequence"  # the paper's Eq. 6-7 by default
    callback = ExpertSelectionCallback(score_averaging="pooled")
    assert callback.spec.score_averaging == "pooled"
    trainer = SimpleNamespace(callbacks=[callback])
    assert configured_spec(trainer, {})[0].score_averaging == "pooled"  # the config's callback holds
    assert configured_spec(trainer, {"score_averaging": "sequence"})[0].score_averaging == "sequence"  # the flag wins
    model = build_tiny_model("deepseek_v2")
    decision = decide(model, padded_batches(), SelectionSpec(score_averaging="pooled", max_tokens=None))
    assert decision.profile.to_dict()["score_averaging"] == "pooled"  # -> expert_scores.json
    assert decision.config.to_dict()["score_averaging"] == "pooled"  # -> expert_cfg.json
    apply(model, decision.config, SelectionSpec())
    assert selection_entry(model, decision.config)["score_averaging"] == "pooled"  # -> the checkpoint
