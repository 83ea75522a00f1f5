"""Top-p selection, ESFT's published configs, and the expert-config JSON format."""

import json

import pytest
import torch

from esft_lightning.selection.rules import ExpertConfig, all_experts, random_experts, select_experts


def test_reproduces_published_esft_configs(esft_data):
    for task in ["intent", "law", "summary", "translation"]:
        scores = json.loads((esft_data / "published/expert_scores" / f"{task}.json").read_text())["token_scores"]
        published = ExpertConfig.load(esft_data / "published/expert_configs" / f"{task}.json")
        ours = select_experts({int(k): v for k, v in scores.items()}, top_p=0.2)
        assert ours.experts == published.experts, task


def test_cumulative_rule_includes_the_crossing_expert_and_stops_at_equality():
    scores = {3: torch.tensor([0.1, 0.5, 0.3, 0.1])}
    assert select_experts(scores, top_p=0.6).experts == {3: [1, 2]}  # 0.5 < 0.6, 0.8 crosses
    assert select_experts(scores, top_p=0.5).experts == {3: [1]}  # reaching p exactly stops
    assert select_experts({0: [0.25, 0.25, 0.5]}, top_p=0.7).experts == {0: [2, 0]}  # ties: lower id first


def test_json_round_trip_keeps_esft_format(tmp_path):
    config = ExpertConfig({1: [8, 26, 55], 2: [57, 19]}, shared_experts=True, meta={"top_p": 0.2})
    path = tmp_path / "expert_cfg.json"
    config.save(path)
    raw = json.loads(path.read_text())
    assert raw["experts"] == {"1": [8, 26, 55], "2": [57, 19]} and raw["shared_experts"] is True
    assert raw["non_expert_modules"] is False
    loaded = ExpertConfig.load(path)
    assert loaded.experts == config.experts and loaded.shared_experts and loaded.meta["top_p"] == 0.2
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"experts": {"one": [1]}}', "not a layer index"),
        ('{"experts": {"1": [1, -2]}}', "non-negative"),
        ('{"experts": {"1": [1, 1]}}', "twice"),
        ('{"experts": [1, 2]}', "must map layer"),
        ('{"experts": {"1": [1]}, "shared_experts": "yes"}', "shared_experts"),
        ('{"experts": {"1": [1]', "not valid JSON"),
    ],
)
def test_bad_configs_are_rejected_clearly(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(payload)
    with pytest.raises(ValueError, match=message) as err:
        ExpertConfig.load(path)
    assert str(path) in str(err.value)


def test_baselines():
    like = ExpertConfig({1: [3, 4, 5], 2: [0]})
    rand = random_experts(like, {1: 16, 2: 16}, seed=1)
    assert {k: len(v) for k, v in rand.experts.items()} == {1: 3, 2: 1}
    assert rand.experts != like.experts and random_experts(like, {1: 16, 2: 16}, seed=1).experts == rand.experts
    assert all_experts({1: 4}).experts == {1: [0, 1, 2, 3]}
    with pytest.raises(ValueError, match="top_p"):
        select_experts({0: [1.0]}, top_p=0.0)
