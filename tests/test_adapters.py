"""Adapters: only trained tensors, atomic writes, exact reload, ESFT's released layout, merge, mismatches."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_lightning.adapters import load_adapter, save_adapter
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.selection.rules import ExpertConfig


def trained_model(family="deepseek_v2", picks=None, **flags):
    model = build_tiny_model(family)
    picks = picks or {layer.index: [5, 2] for layer in find_moe_layers(model)}
    apply_expert_config(model, ExpertConfig(picks, **flags))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for seed in range(2):
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(seed))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))


def test_adapter_holds_only_selected_experts_and_reloads_exactly(tmp_path):
    model = trained_model()
    path = save_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(path / "adapter.safetensors"))
    layer = find_moe_layers(model)[0].experts
    per_expert_bytes = (layer.gate_up_proj[0].numel() + layer.down_proj[0].numel()) * 4
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == per_expert_bytes * 2 * 2
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert (path / "adapter.safetensors").stat().st_size < per_expert_bytes * 4 + 4096 < full_bytes
    assert json.loads((path / "expert_cfg.json").read_text())["experts"] == {"1": [5, 2], "2": [5, 2]}
    fresh = build_tiny_model("deepseek_v2")
    config = load_adapter(fresh, path)
    assert config.experts == {1: [5, 2], 2: [5, 2]}
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)


def test_adapter_with_shared_experts(tmp_path):
    model = trained_model("qwen2_moe", picks={0: [1]}, shared_experts=True)
    path = save_adapter(model, tmp_path / "a")
    keys = set(load_file(str(path / "adapter.safetensors")))
    assert any("shared_expert." in k for k in keys) and "model.layers.0.mlp.experts.gate_up_proj" in keys
    fresh = build_tiny_model("qwen2_moe")
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)


def test_released_esft_layout_loads_into_fused_model(tmp_path):
    base = build_tiny_model("deepseek_v2")
    reference = build_tiny_model("deepseek_v2")
    g = torch.Generator().manual_seed(1)
    tensors, experts = {}, {1: [7, 3], 2: [0]}
    inter, hidden = 32, 64
    for layer, ids in experts.items():
        fused = reference.model.layers[layer].mlp.experts
        for e in ids:
            gate = torch.randn(inter, hidden, generator=g) * 0.05
            up = torch.randn(inter, hidden, generator=g) * 0.05
            down = torch.randn(hidden, inter, generator=g) * 0.05
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            tensors.update(
                {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up, f"{prefix}.down_proj.weight": down}
            )
            with torch.no_grad():  # the reference, computed by hand from the per-expert tensors
                fused.gate_up_proj[e] = torch.cat([gate, up])
                fused.down_proj[e] = down
    (tmp_path / "released").mkdir()
    save_file(tensors, str(tmp_path / "released" / "trainable_params.safetensors"))
    (tmp_path / "released" / "expert_cfg.json").write_text(
        json.dumps(
            {"experts": {str(k): v for k, v in experts.items()}, "shared_experts": False, "non_expert_modules": False}
        )
    )
    load_adapter(base, tmp_path / "released")
    torch.testing.assert_close(base(IDS).logits, reference(IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "nemotron_h"])  # plain, biased+transposed, gate-less
def test_merge_gives_standard_checkpoint(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from esft_lightning.data.tokenizer import byte_tokenizer

    base = build_tiny_model(family)
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    trained = build_tiny_model(family)
    layer = find_moe_layers(trained)[0]
    apply_expert_config(trained, ExpertConfig({layer.index: [3]}))
    with torch.no_grad():
        for name, param in layer.experts.named_parameters():
            if name.startswith("esft_"):
                param.mul_(-2)
    save_adapter(trained, tmp_path / "adapter")
    from esft_lightning.cli import main

    main(
        [
            "merge",
            "--base",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(merged(IDS).logits, trained(IDS).logits, atol=1e-6, rtol=0)
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_mismatched_adapters_are_rejected(tmp_path):
    path = save_adapter(trained_model(), tmp_path / "a")
    with pytest.raises(ValueError, match="trained on a deepseek_v2 model, not qwen3_moe"):
        load_adapter(build_tiny_model("qwen3_moe"), path)
    fewer = build_tiny_model("deepseek_v2", n_routed_experts=4)
    with pytest.raises(ValueError, match="out of range"):
        load_adapter(fewer, path)
    wider = build_tiny_model("deepseek_v2", moe_intermediate_size=16)
    with pytest.raises(ValueError, match="shape .* the model expects"):
        load_adapter(wider, path)
    untouched = build_tiny_model("deepseek_v2", moe_intermediate_size=16)
    assert all(torch.equal(a, b) for a, b in zip(untouched.parameters(), wider.parameters()))


def test_interrupted_write_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    import esft_lightning.adapters as adapters

    model = trained_model()
    path = save_adapter(model, tmp_path / "a")
    before = (path / "adapter.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "a")
    assert (path / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_adapter_missing_a_selected_layer_is_rejected(tmp_path):
    model = trained_model()
    path = save_adapter(model, tmp_path / "a")
    tensors = load_file(str(path / "adapter.safetensors"))
    del tensors["model.layers.2.mlp.experts.down_proj"]
    save_file(tensors, str(path / "adapter.safetensors"))
    fresh = build_tiny_model("deepseek_v2")
    with pytest.raises(ValueError, match="lack model.layers.2.mlp.experts.down_proj"):
        load_adapter(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), build_tiny_model("deepseek_v2").parameters()))


def task_adapter(path, picks, scale):
    """An adapter of the deterministic tiny qwen3_moe whose selected experts were scaled by ``scale``."""
    model = build_tiny_model("qwen3_moe")
    apply_expert_config(model, ExpertConfig(picks))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("esft_"):
                param.mul_(scale)
    save_adapter(model, path)
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_several_disjoint_adapters_merge_into_one_model(tmp_path):
    from esft_lightning.adapters import load_adapters

    layer = find_moe_layers(build_tiny_model("qwen3_moe"))[0].index
    a = task_adapter(tmp_path / "a", {layer: [1, 4]}, 2.0)
    b = task_adapter(tmp_path / "b", {layer: [6]}, -3.0)
    merged = build_tiny_model("qwen3_moe")
    configs = load_adapters(merged, [tmp_path / "a", tmp_path / "b"])
    assert [c.experts for c in configs] == [{layer: [1, 4]}, {layer: [6]}]
    key = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    fused, base = merged.state_dict()[key], build_tiny_model("qwen3_moe").state_dict()[key]
    torch.testing.assert_close(fused[[1, 4]], a[key][[1, 4]], rtol=0, atol=0)  # task A's experts
    torch.testing.assert_close(fused[6], b[key][6], rtol=0, atol=0)  # task B's expert
    others = [e for e in range(fused.shape[0]) if e not in (1, 4, 6)]
    torch.testing.assert_close(fused[others], base[others], rtol=0, atol=0)  # every other expert untouched


def test_overlapping_adapters_are_refused_by_name_unless_a_policy_is_given(tmp_path):
    from esft_lightning.adapters import load_adapters

    layer = find_moe_layers(build_tiny_model("qwen3_moe"))[0].index
    a = task_adapter(tmp_path / "a", {layer: [1, 4]}, 2.0)
    b = task_adapter(tmp_path / "b", {layer: [4, 6]}, -3.0)
    model = build_tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"layer {layer} experts \[4\] \(adapters .*a, .*b\)") as err:
        load_adapters(model, [tmp_path / "a", tmp_path / "b"])
    assert "overlap='first'" in str(err.value)
    for k, v in model.state_dict().items():  # nothing was written
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    key = f"model.layers.{layer}.mlp.experts.down_proj"
    first = build_tiny_model("qwen3_moe")
    load_adapters(first, [tmp_path / "a", tmp_path / "b"], overlap="first")
    torch.testing.assert_close(first.state_dict()[key][4], a[key][4], rtol=0, atol=0)
    torch.testing.assert_close(first.state_dict()[key][6], b[key][6], rtol=0, atol=0)
    average = build_tiny_model("qwen3_moe")
    load_adapters(average, [tmp_path / "a", tmp_path / "b"], overlap="average")
    torch.testing.assert_close(average.state_dict()[key][4], (a[key][4] + b[key][4]) / 2)


def test_esft_merge_command_takes_several_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    from esft_lightning.cli import main

    build_tiny_model("qwen3_moe").save_pretrained(tmp_path / "base")
    layer = find_moe_layers(build_tiny_model("qwen3_moe"))[0].index
    a = task_adapter(tmp_path / "a", {layer: [1]}, 2.0)
    b = task_adapter(tmp_path / "b", {layer: [1, 2]}, 5.0)
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"), "--adapter"]
    with pytest.raises(ValueError, match="adapters overlap"):
        main([*args, str(tmp_path / "b"), "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    main([*args, str(tmp_path / "b"), "--out", str(tmp_path / "merged"), "--overlap", "first"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    key = f"model.layers.{layer}.mlp.experts.gate_up_proj"
    torch.testing.assert_close(merged[key][1], a[key][1])
    torch.testing.assert_close(merged[key][2], b[key][2])
