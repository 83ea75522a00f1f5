"""Adapters: only trained tensors, atomic writes, exact reload, ESFT's released layout, merge, mismatches."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esft_lightning.adapters import load_adapter, save_adapter
from esft_lightning.experts import apply_expert_config
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.selection import ExpertConfig


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

    from esft_lightning.tokenizer import byte_tokenizer

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
