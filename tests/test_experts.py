"""apply_expert_config: exact trainables, small optimizer state, frozen bits, same outputs, state_dict."""

import pytest
import torch

from esft_lightning.experts.split import apply_expert_config, remove_expert_split
from esft_lightning.experts.state import expert_param_names
from esft_lightning.models import build_tiny_model, enable_activation_checkpointing, find_moe_layers
from esft_lightning.selection.rules import ExpertConfig

from .conftest import FAMILIES

IMPLS = ["grouped_mm", "eager"]


def selection(model, picks=(3, 0, 5)):
    return ExpertConfig({layer.index: list(picks) for layer in find_moe_layers(model)})


def batch(seed=0):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    return ids


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_unchanged_and_trainables_exact(family, impl):
    model = build_tiny_model(family, experts_implementation=impl)
    ids = batch()
    with torch.no_grad():
        before = model(ids).logits
    config = selection(model)
    summary = apply_expert_config(model, config)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    layers = find_moe_layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"model.layers.{layer.index}.mlp.experts.esft_{proj}"
        for layer in layers
        for proj in ("gate_up_proj", "down_proj")
    }
    assert trainable == expected
    per_expert = layers[0].experts.gate_up_proj[0].numel() + layers[0].experts.down_proj[0].numel()
    assert summary["trainable_params"] == per_expert * 3 * len(layers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "esft_" not in n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "olmoe"])
def test_gradients_equal_full_finetuning_rows(family, impl):
    full = build_tiny_model(family, experts_implementation=impl)
    esft = build_tiny_model(family, experts_implementation=impl)
    ids = batch(1)
    full(ids, labels=ids).loss.backward()
    config = selection(esft, picks=(6, 2))
    apply_expert_config(esft, config)
    esft(ids, labels=ids).loss.backward()
    for a, b in zip(find_moe_layers(full), find_moe_layers(esft)):
        for proj in ("gate_up_proj", "down_proj"):
            want = getattr(a.experts, proj).grad[[6, 2]]
            torch.testing.assert_close(getattr(b.experts, "esft_" + proj).grad, want, atol=1e-6, rtol=1e-4)
            assert getattr(b.experts, proj).grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw_state_sized_to_selection_and_frozen_bits_unchanged(impl):
    model = build_tiny_model("deepseek_v3", experts_implementation=impl)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = selection(model, picks=(1, 4))
    apply_expert_config(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        ids = batch(step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state_numel = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state_numel == 2 * sum(p.numel() for p in params)
    after = model.state_dict()
    assert after.keys() == original.keys()
    assert all(after[k].shape == original[k].shape for k in after)
    for key in original:
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            changed = (after[key] != original[key]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == [1, 4], key  # selected experts trained, every other expert bitwise frozen
        else:
            assert torch.equal(after[key], original[key]), key
    # The fused parameters themselves are never written: only the small trainable copies move.
    for layer in find_moe_layers(model):
        key = f"model.layers.{layer.index}.mlp.experts.gate_up_proj"
        assert torch.equal(layer.experts.gate_up_proj.detach(), original[key])


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_state_dict_round_trip_into_fresh_model(family):
    trained = build_tiny_model(family)
    apply_expert_config(trained, selection(trained, picks=(2,)))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "esft_" in name:
                param.add_(0.5)
    fresh = build_tiny_model(family, seed=3)
    fresh.load_state_dict(trained.state_dict())
    ids = batch()
    torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)
    # and a split model accepts a full state dict: the trainable copies follow the fused rows
    other = build_tiny_model(family, seed=5)
    apply_expert_config(other, selection(other, picks=(2,)))
    other.load_state_dict(trained.state_dict())
    torch.testing.assert_close(other(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)


def test_flags_shared_and_non_expert_modules():
    model = build_tiny_model("deepseek_v2")
    apply_expert_config(model, ExpertConfig({1: [0]}, shared_experts=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("shared_experts" in n for n in names) and not any("self_attn" in n for n in names)
    assert "model.layers.2.mlp.experts.esft_gate_up_proj" not in names  # layer 2 not listed
    apply_expert_config(model, ExpertConfig({1: [0]}, non_expert_modules=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("self_attn" in n for n in names) and "lm_head.weight" in names
    assert not any("shared_experts" in n for n in names)
    assert not any(n.endswith("experts.gate_up_proj") for n in names)


def test_reapply_and_remove_fold_trained_values():
    model = build_tiny_model("mixtral")
    apply_expert_config(model, ExpertConfig({0: [1]}))
    with torch.no_grad():
        model.model.layers[0].mlp.experts.esft_gate_up_proj.fill_(0.25)
    apply_expert_config(model, ExpertConfig({0: [2], 1: [0]}))  # re-apply folds the first selection in
    experts = model.model.layers[0].mlp.experts
    assert torch.all(experts.gate_up_proj[1] == 0.25) and experts.esft_expert_ids.tolist() == [2]
    remove_expert_split(model)
    assert not hasattr(experts, "esft_gate_up_proj") and "forward" not in vars(experts)


def test_all_experts_trains_fused_tensors_directly():
    model = build_tiny_model("olmoe")
    layers = find_moe_layers(model)
    apply_expert_config(model, ExpertConfig({layer.index: list(range(layer.num_experts)) for layer in layers}))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        f"model.layers.{layer.index}.mlp.experts.{p}" for layer in layers for p in ("gate_up_proj", "down_proj")
    }


@pytest.mark.parametrize(
    "experts, message",
    [
        ({0: [1]}, "layer 0, which is not an MoE layer"),
        ({1: [16]}, "out of range"),
        ({7: [0]}, "MoE layers: \\[1, 2\\]"),
    ],
)
def test_bad_config_rejected(experts, message):
    model = build_tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match=message):
        apply_expert_config(model, ExpertConfig(experts))
    assert all(p.requires_grad for p in model.parameters())  # nothing was touched


def test_unknown_architecture_lists_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    with pytest.raises(ValueError, match="Unsupported MoE architecture 'llama'.*deepseek_v3"):
        apply_expert_config(model, ExpertConfig({0: [0]}))


def test_model_without_moe_layers_is_rejected():
    model = build_tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(ValueError, match="has no MoE layers"):
        apply_expert_config(model, ExpertConfig({0: [0]}))


@pytest.mark.parametrize("impl", IMPLS)
def test_activation_checkpointing_gives_the_same_gradients(impl):
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model("deepseek_v3", experts_implementation=impl)
        apply_expert_config(model, selection(model, picks=(2, 7)))
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.is_gradient_checkpointing
        model.train()
        ids = batch(4)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fp32_trainable_copies_of_a_bf16_model_keep_small_updates():
    changed = {}
    for dtype in (None, torch.float32):
        model = build_tiny_model("qwen3_moe").to(torch.bfloat16)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        apply_expert_config(model, selection(model, picks=(1,)), trainable_dtype=dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == (dtype or torch.bfloat16) for p in params)
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        ids = batch()
        model(ids, labels=ids).loss.backward()
        opt.step()
        start = [original[f"model.layers.{i}.mlp.experts.gate_up_proj"][1] for i in (0, 1)]
        trained = [model.model.layers[i].mlp.experts.esft_gate_up_proj[0].detach() for i in (0, 1)]
        changed[dtype] = float(sum((t.float() != s.float()).float().mean() for t, s in zip(trained, start)) / 2)
        sd = model.state_dict()
        assert all(sd[k].dtype == original[k].dtype and sd[k].shape == original[k].shape for k in original)
    assert changed[torch.float32] > 0.99  # every weight of the selected expert moved by ~lr
    assert changed[None] < 0.5  # in bf16 most of those 1e-5 updates round away


def test_trainable_dtype_with_whole_layers_and_with_shared_experts():
    model = build_tiny_model("qwen2_moe").to(torch.bfloat16)
    every = ExpertConfig({layer.index: list(range(16)) for layer in find_moe_layers(model)})
    apply_expert_config(model, every, trainable_dtype=torch.float32)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("esft_" in n and d == torch.float32 for n, d in trainable.items())
    with pytest.raises(ValueError, match="applies to routed experts only"):
        apply_expert_config(model, ExpertConfig({0: [1]}, shared_experts=True), trainable_dtype=torch.float32)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)  # left as it was


LAYOUTS = ["gpt_oss", "nemotron_h", "aria_text"]  # biased + transposed + interleaved, gate-less, transposed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", LAYOUTS)
def test_every_layout_gradients_equal_full_finetuning_rows(family, impl):
    full = build_tiny_model(family, experts_implementation=impl)
    esft = build_tiny_model(family, experts_implementation=impl)
    ids = batch(1)
    full(ids, labels=ids).loss.backward()
    picks = [5, 1]
    apply_expert_config(esft, ExpertConfig({layer.index: picks for layer in find_moe_layers(esft)}))
    assert esft.config._experts_implementation == "esft"
    esft(ids, labels=ids).loss.backward()
    for a, b in zip(find_moe_layers(full), find_moe_layers(esft)):
        for name in expert_param_names(a.experts):
            want = getattr(a.experts, name).grad[picks]
            torch.testing.assert_close(getattr(b.experts, "esft_" + name).grad, want, atol=1e-6, rtol=1e-4)
            assert getattr(b.experts, name).grad is None
    remove_expert_split(esft)
    assert esft.config._experts_implementation == impl  # the model's own implementation is back


def test_state_dict_merges_trained_rows_on_cpu_into_a_copy():
    model = build_tiny_model("gpt_oss")
    apply_expert_config(model, ExpertConfig({0: [3, 6]}))
    experts = find_moe_layers(model)[0].experts
    with torch.no_grad():
        for name in expert_param_names(experts):
            getattr(experts, "esft_" + name).add_(1.0)
    state = model.state_dict()
    for name in expert_param_names(experts):
        merged = state[f"model.layers.0.mlp.experts.{name}"]
        fused, trained = getattr(experts, name), getattr(experts, "esft_" + name)
        assert merged.device.type == "cpu"
        assert merged.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()  # the parameter untouched
        assert torch.equal(merged[[3, 6]], trained.detach()) and not torch.equal(fused[[3, 6]], trained.detach())
        keep = [e for e in range(experts.num_experts) if e not in (3, 6)]
        assert torch.equal(merged[keep], fused.detach()[keep])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_dict_of_a_cuda_model_merges_on_cpu_without_a_second_device_copy():
    model = build_tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=256).cuda()
    apply_expert_config(model, selection(model, picks=(2, 9)))
    fused_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    state = model.state_dict()
    assert torch.cuda.max_memory_allocated() - start < fused_bytes / 4
    trained = model.model.layers[0].mlp.experts.esft_gate_up_proj.detach().cpu()
    merged = state["model.layers.0.mlp.experts.gate_up_proj"]
    assert merged.device.type == "cpu" and torch.equal(merged[[2, 9]], trained)


@pytest.mark.parametrize("impl", IMPLS)
def test_placeholder_expert_ids_contribute_nothing(impl):
    model = build_tiny_model("qwen3_moe", experts_implementation=impl)
    layer = find_moe_layers(model)[0]
    apply_expert_config(model, ExpertConfig({layer.index: [2, 7]}))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g)
    index = torch.randint(0, layer.num_experts, (6, 4), generator=g)
    index[:, 0] = torch.tensor([2, 7, 2, 0, 7, 1])  # selected experts are routed to
    index[0, 1], index[3, 2] = layer.num_experts, layer.num_experts + 5  # expert-parallel style placeholders
    index[2, 3] = -1  # padding-style placeholder: must not become expert 0
    weights = torch.rand(6, 4, generator=g)
    placeholder = (index >= layer.num_experts) | (index < 0)
    with torch.no_grad():
        got = layer.experts(x, index, weights)
        want = layer.experts(x, index.masked_fill(placeholder, 0), weights.masked_fill(placeholder, 0.0))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_trainables_of_a_bf16_biased_transposed_model(impl):
    model = build_tiny_model("gpt_oss", experts_implementation=impl).to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_expert_config(model, selection(model, picks=(2, 6)), trainable_dtype=torch.float32)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * len(find_moe_layers(model))  # gate_up, down and both biases per layer
    assert all(p.dtype == torch.float32 for p in trainable.values())
    ids = batch()
    model(ids, labels=ids).loss.backward()
    torch.optim.AdamW(trainable.values(), lr=1e-5, weight_decay=0.1).step()
    state = model.state_dict()
    assert all(state[k].dtype == torch.bfloat16 and state[k].shape == v.shape for k, v in original.items())
    moved = (
        state["model.layers.0.mlp.experts.gate_up_proj_bias"]
        != original["model.layers.0.mlp.experts.gate_up_proj_bias"]
    )
    assert moved.any(dim=1).nonzero().flatten().tolist() in ([2, 6], [2], [6])  # only selected biases can move


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # hub layout per expert (converted on save); fused
def test_save_pretrained_with_a_selection_applied_reloads_with_stock_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(family)
    apply_expert_config(model, selection(model, picks=(1, 6)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "esft_" in name:
                param.mul_(-3)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config._experts_implementation != "esft"
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_the_split_owns_only_its_declared_names_and_leaves_none_behind(family):
    """An experts module carries the trainable copies, the three declared buffers and one state object, nothing
    else of ESFT's; removing the split leaves the module exactly as it was (no stray attribute)."""
    from esft_lightning.experts.state import SLOT_BUFFERS, STATE_ATTR, TRAINED_PREFIX, expert_config_of, experts_state

    model = build_tiny_model(family)
    before = {id(m): set(vars(m)) for m in model.modules()}
    buffers_before = {id(m): set(m._buffers) for m in model.modules()}
    config = selection(model)
    apply_expert_config(model, config)
    assert expert_config_of(model) is config
    for layer in find_moe_layers(model):
        experts = layer.experts
        added = set(vars(experts)) - before[id(experts)]
        assert added == {STATE_ATTR}, added
        assert set(experts._buffers) - buffers_before[id(experts)] == set(SLOT_BUFFERS)
        assert experts_state(experts).split is not None
        names = expert_param_names(experts)
        assert {n for n, _ in experts.named_parameters(recurse=False) if n.startswith(TRAINED_PREFIX)} == {
            TRAINED_PREFIX + n for n in names
        }
    remove_expert_split(model)
    assert expert_config_of(model) is None
    for module in model.modules():
        assert set(vars(module)) == before[id(module)], type(module).__name__
        assert set(module._buffers) == buffers_before[id(module)]
