"""Adapters that compose by construction: `exclude` and joint (disjoint) selection, in Python, callback and CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from esft_lightning.adapters import load_adapters
from esft_lightning.callbacks import ExpertSelectionCallback
from esft_lightning.cli import main
from esft_lightning.models import build_tiny_model
from esft_lightning.pipeline import decide
from esft_lightning.routing.profile import RoutingProfile
from esft_lightning.selection.rules import (
    ExpertConfig,
    SelectionShortfall,
    all_experts,
    load_scores,
    random_experts,
    select_disjoint,
    select_experts,
)
from esft_lightning.selection.spec import SelectionSpec

from .test_cli import quick_config


def mass(scores: torch.Tensor | list[float], ids: list[int]) -> float:
    return float(sum(float(scores[e]) for e in ids))


def peaked(seed: int, layers: int = 3, experts: int = 16) -> dict[int, torch.Tensor]:
    """Token-score-like tables (each layer sums to 1), peaked on a few experts like real routing."""
    generator = torch.Generator().manual_seed(seed)
    rows = {layer: torch.rand(experts, generator=generator, dtype=torch.float64) ** 4 for layer in range(layers)}
    return {layer: row / row.sum() for layer, row in rows.items()}


# -- exclude --------------------------------------------------------------------------------------------
def test_exclude_takes_the_next_best_and_still_reaches_top_p(tmp_path):
    scores = {1: [0.35, 0.25, 0.2, 0.1, 0.1], 2: [0.05, 0.05, 0.15, 0.3, 0.45]}
    assert select_experts(scores, 0.4).experts == {1: [0, 1], 2: [4]}
    other = ExpertConfig({1: [0], 2: [4]})
    other.save(tmp_path / "other.json")
    for exclude in (other, tmp_path / "other.json", str(tmp_path / "other.json"), [tmp_path / "other.json"]):
        config = select_experts(scores, 0.4, exclude=exclude)
        assert config.experts == {1: [1, 2], 2: [3, 2]}  # the next-best, in score order, until top_p
    assert all(mass(scores[k], v) >= 0.4 for k, v in config.experts.items())
    # an adapter directory is read through its expert_cfg.json; several sources are united
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    ExpertConfig({1: [1]}).save(adapter / "expert_cfg.json")
    config = select_experts(scores, 0.4, exclude=[adapter, tmp_path / "other.json"])
    assert config.experts == {1: [2, 3, 4], 2: [3, 2]}
    assert config.meta["excluded_from"] == [str(adapter), str(tmp_path / "other.json")]


def test_exclude_on_random_scores_is_the_greedy_rule_on_what_is_left():
    for seed in range(20):
        scores = peaked(seed)
        plain = select_experts(scores, 0.2)
        config = select_experts(scores, 0.2, exclude=plain)  # a second adapter beside the first
        for layer, s in scores.items():
            chosen = config.experts[layer]
            assert not set(chosen) & set(plain.experts[layer])
            left = [
                e for e in torch.sort(s, descending=True, stable=True).indices.tolist() if e not in plain.experts[layer]
            ]
            assert chosen == left[: len(chosen)]  # a prefix of the remaining order ...
            assert mass(s, chosen) >= 0.2 > mass(s, chosen[:-1])  # ... that stops as soon as it reaches top_p


def test_exclude_shortfall_is_a_clear_error_or_a_warning():
    scores = {3: [0.5, 0.3, 0.1, 0.1]}
    with pytest.raises(SelectionShortfall, match=r"layer 3: reached a score of 0\.5, top_p wants 0\.6.*0 \(excluded\)"):
        select_experts(scores, 0.6, exclude=ExpertConfig({3: [0]}))
    with pytest.warns(UserWarning, match="layer 3"):
        config = select_experts(scores, 0.6, exclude=ExpertConfig({3: [0]}), strict=False)
    assert config.experts == {3: [1, 2, 3]} and config.meta["top_p_shortfall"] == {"3": 0.5}
    # a layer whose scores sum below top_p is no shortfall without exclusions (Eq. 8 takes every expert)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_experts({0: [0.02, 0.03]}, 0.1).experts == {0: [1, 0]}


def test_exclude_that_does_not_fit_the_scores_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"experts \[9\] of layer 1, which has 4 experts"):
        select_experts({1: [0.25] * 4}, 0.2, exclude=ExpertConfig({1: [9]}))
    with pytest.raises(ValueError, match="layer 7, which the scores do not have"):
        select_experts({1: [0.25] * 4}, 0.2, exclude=ExpertConfig({7: [0]}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without expert_cfg.json"):
        select_experts({1: [0.25] * 4}, 0.2, exclude=[tmp_path / "empty"])
    with pytest.raises(ValueError, match="shared experts"):
        select_experts({1: [0.25] * 4}, 0.2, shared_experts=True, exclude=ExpertConfig({1: [0]}, shared_experts=True))


def test_baselines_respect_exclude():
    excluded = ExpertConfig({0: [0, 1], 1: [3]})
    assert all_experts({0: 4, 1: 4}, exclude=excluded).experts == {0: [2, 3], 1: [0, 1, 2]}
    drawn = random_experts(ExpertConfig({0: [5, 6], 1: [7]}), {0: 8, 1: 8}, seed=3, exclude=excluded)
    assert not set(drawn.experts[0]) & {0, 1} and 3 not in drawn.experts[1]
    # without exclude the draw is the one it always was
    like = ExpertConfig({0: [5, 6]})
    assert random_experts(like, {0: 8}, seed=3).experts == random_experts(like, {0: 8}, seed=3, exclude=None).experts


# -- joint selection ------------------------------------------------------------------------------------
def test_joint_selection_is_disjoint_and_the_higher_score_wins():
    scores = {
        "a": {0: [0.40, 0.30, 0.10, 0.10, 0.05, 0.05]},
        "b": {0: [0.30, 0.10, 0.40, 0.10, 0.05, 0.05]},  # wants 2 then 0: 0 is contested with a
        "c": {0: [0.05, 0.05, 0.05, 0.05, 0.10, 0.70]},  # no conflict: exactly its own selection
    }
    configs = select_disjoint(scores, 0.5)
    assert configs["a"].experts == {0: [0, 1]}  # a scores expert 0 at 0.40 > b's 0.30: a keeps it
    assert select_experts(scores["b"], 0.5).experts == {0: [2, 0]}  # alone, b would take 0 ...
    assert configs["b"].experts == {0: [2, 3]}  # ... jointly it loses 0 (and 1) to a and takes its next one
    assert configs["c"].experts == select_experts(scores["c"], 0.5).experts == {0: [5]}
    assert configs["b"].meta["disjoint_with"] == ["a", "c"] and configs["b"].meta["task"] == "b"
    # the contest is decided by score, not by the order the tasks are given in
    flipped = select_disjoint({"b": scores["b"], "a": scores["a"]}, 0.5)
    assert flipped["a"].experts == configs["a"].experts and flipped["b"].experts == configs["b"].experts


@pytest.mark.parametrize("tasks", [2, 3])
def test_joint_selection_on_overlapping_random_scores(tasks):
    for seed in range(10):
        base = peaked(100 + seed, experts=32)
        # overlapping tasks: the same peaked table plus task-specific noise
        tables = {}
        for t in range(tasks):
            noise = peaked(200 + 10 * seed + t, experts=32)
            tables[f"t{t}"] = {layer: 0.6 * base[layer] + 0.4 * noise[layer] for layer in base}
        alone = {t: select_experts(s, 0.2) for t, s in tables.items()}
        assert any(set(alone["t0"].experts[k]) & set(alone["t1"].experts[k]) for k in base), "scores overlap"
        configs = select_disjoint(tables, 0.2)
        for layer in base:
            picked = [e for t in tables for e in configs[t].experts[layer]]
            assert len(picked) == len(set(picked))  # no expert serves two tasks
            for t, s in tables.items():
                assert mass(s[layer], configs[t].experts[layer]) >= 0.2  # every task still reaches top_p


def test_joint_selection_from_profiles_and_files_with_exclude(tmp_path):
    token = {0: torch.tensor([0.5, 0.2, 0.2, 0.1])}
    profile = RoutingProfile(gate_scores={0: torch.tensor([0.05, 0.3, 0.05, 0.05])}, token_scores=token, num_tokens=4)
    other = {0: {"0": 0.1, "1": 0.1, "2": 0.3, "3": 0.5}}
    (tmp_path / "other.json").write_text(json.dumps({"token_scores": other, "gate_scores": other}))
    configs = select_disjoint(
        {"p": profile, "f": tmp_path / "other.json"}, {"p": 0.5, "f": 0.3}, exclude=[ExpertConfig({0: [1]})]
    )
    assert configs["p"].experts == {0: [0]} and configs["f"].experts == {0: [3]}
    gate = select_disjoint({"p": profile, "f": tmp_path / "other.json"}, 0.1, score_function="gate")
    assert gate["p"].experts == {0: [1]} and gate["f"].experts == {0: [3]}  # gate tables: f takes 3 (0.5)
    assert load_scores(tmp_path / "other.json")[0].tolist() == [0.1, 0.1, 0.3, 0.5]
    with pytest.raises(ValueError, match="no 'gate_scores' table"):
        load_scores(_write(tmp_path / "bad.json", {"token_scores": other}), "gate")


def test_joint_selection_names_the_task_that_cannot_reach_top_p():
    scores = {"a": {2: [0.5, 0.3, 0.15, 0.05]}, "b": {2: [0.45, 0.35, 0.1, 0.1]}}
    # alone each reaches 0.7 with experts 0 and 1; jointly a holds 0 (0.5 > 0.45), b holds 1 (0.35 > 0.3)
    pattern = (
        r"task 'a', layer 2: reached a score of 0\.65, top_p wants 0\.7 \(out of reach: experts 1 \(taken by 'b'\), 3 "
        r"\(taken by 'b'\)\); task 'b', layer 2: reached a score of 0\.45, top_p wants 0\.7 \(out of reach: experts 0 "
        r"\(taken by 'a'\), 2 \(taken by 'a'\)\)"
    )
    with pytest.raises(SelectionShortfall, match=pattern):
        select_disjoint(scores, 0.7)
    with pytest.warns(UserWarning, match="task 'b', layer 2"):
        configs = select_disjoint(scores, 0.7, strict=False)
    assert configs["a"].experts == {2: [0, 2]} and configs["b"].experts == {2: [1, 3]}
    assert configs["a"].meta["top_p_shortfall"] == {"2": 0.65} and configs["b"].meta["top_p_shortfall"] == {"2": 0.45}
    assert select_disjoint(scores, 0.4)["b"].experts == {2: [1, 2]}  # at 0.4 both fit: no error
    with pytest.raises(ValueError, match="task 'b' scores 3 experts"):
        select_disjoint({"a": {0: [0.5, 0.5]}, "b": {0: [0.3, 0.3, 0.4]}}, 0.2)


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


# -- in a model: SelectionSpec / decide and the callback --------------------------------------------------
class Tiny(L.LightningModule):
    """The smallest module that trains a tiny MoE (the callback finds the model by structure)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_tiny_model("qwen3_moe", vocab_size=259, seed=0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.net(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]
        ).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def batches(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(0, 256, (24,), generator=generator)} for _ in range(8)]
    for row in rows:
        row["attention_mask"] = torch.ones(24, dtype=torch.long)
    return DataLoader(rows, batch_size=4)


def fit(tmp_path: Path, callback: ExpertSelectionCallback, seed: int) -> Path:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, callbacks=[callback], default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Tiny(), train_dataloaders=batches(seed))
    return Path(trainer.log_dir)


def test_callback_with_exclude_trains_an_adapter_that_composes(tmp_path):
    first = fit(tmp_path / "a", ExpertSelectionCallback(max_tokens=None, plot=False), seed=0)
    taken = ExpertConfig.load(first / "expert_cfg.json")
    callback = ExpertSelectionCallback(max_tokens=None, plot=False, exclude=[str(first / "adapter")])
    second = fit(tmp_path / "b", callback, seed=1)
    config = ExpertConfig.load(second / "expert_cfg.json")
    assert config.meta["excluded_from"] == [str(first / "adapter")]
    for layer, s in callback.profile.token_scores.items():
        assert not set(config.experts[layer]) & set(taken.experts[layer])
        assert mass(s, config.experts[layer]) >= 0.2  # the next-best experts still reach top_p
    assert config.experts == select_experts(callback.profile.token_scores, 0.2, exclude=taken).experts
    model = build_tiny_model("qwen3_moe", vocab_size=259, seed=0)
    load_adapters(model, [first / "adapter", second / "adapter"])  # overlap="refuse": nothing overlaps
    # an explicit config that trains an excluded expert is a contradiction, said before anything trains
    spec = SelectionSpec(expert_config=str(first / "expert_cfg.json"), exclude=[str(first / "adapter")])
    with pytest.raises(ValueError, match="selects experts that exclude forbids"):
        decide(model, None, spec)


# -- the command line -------------------------------------------------------------------------------------
def test_esft_select_exclude_and_joint(tmp_path, capsys):
    cfg = quick_config(tmp_path)
    main(["select", "--out", str(tmp_path / "a.json"), "--max_tokens", "1024", "--config", str(cfg)])
    main(["profile", "--out", str(tmp_path / "scores.json"), "--max_tokens", "1024", "--config", str(cfg)])
    args = ["--max_tokens", "1024", "--config", str(cfg)]
    main(["select", "--exclude", str(tmp_path / "a.json"), "--out", str(tmp_path / "b.json"), *args])
    first, second = ExpertConfig.load(tmp_path / "a.json"), ExpertConfig.load(tmp_path / "b.json")
    scores = load_scores(tmp_path / "scores.json")
    assert second.experts == select_experts(scores, 0.2, exclude=first).experts
    assert all(not set(second.experts[k]) & set(first.experts[k]) for k in first.experts)

    # --joint: two tasks' score files, disjoint configs, no model loaded
    other = {k: (s.flip(0) + s) / 2 for k, s in scores.items()}  # overlaps with the first task's scores
    _write(tmp_path / "other.json", {"token_scores": {str(k): v.tolist() for k, v in other.items()}})
    main(
        [
            "select",
            "--joint",
            f"x={tmp_path / 'scores.json'}",
            f"y={tmp_path / 'other.json'}",
            "--out",
            str(tmp_path / "joint"),
        ]
    )
    x, y = ExpertConfig.load(tmp_path / "joint/x.json"), ExpertConfig.load(tmp_path / "joint/y.json")
    assert x.experts == select_disjoint({"x": scores, "y": other}, 0.2)["x"].experts
    assert all(not set(x.experts[k]) & set(y.experts[k]) for k in x.experts)
    assert "no expert is selected for two of the 2 tasks" in capsys.readouterr().out
    joint = ["select", "--joint", f"x={tmp_path / 'scores.json'}", f"y={tmp_path / 'other.json'}"]
    with pytest.raises(SelectionShortfall, match="task 'y', layer"):
        main([*joint, "--top_p", "0.9", "--out", str(tmp_path / "fail")])
    assert not (tmp_path / "fail").exists()  # nothing written when the selection fails
    with pytest.warns(UserWarning, match="below top_p"):
        main(
            [
                *joint,
                "--top_p",
                "0.9",
                "--best_effort",
                "--exclude",
                str(tmp_path / "a.json"),
                "--out",
                str(tmp_path / "be"),
            ]
        )
    assert ExpertConfig.load(tmp_path / "be/y.json").meta["top_p_shortfall"]
