"""Every causal-LM MoE family of the installed transformers: profile -> select -> apply -> AdamW step -> adapter."""

import pytest
import torch

from esft_lightning.adapters import load_adapter, save_adapter
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.experts.state import expert_param_names
from esft_lightning.models import (
    FAMILIES,
    VERIFIED,
    UnsupportedModelError,
    build_tiny_model,
    causal_lm_moe_families,
    find_moe_layers,
    get_family,
)
from esft_lightning.routing.profile import profile_routing
from esft_lightning.selection.rules import ExpertConfig

ALL = causal_lm_moe_families()
REFUSED = [f for f in ALL if f in FAMILIES and FAMILIES[f].unsupported]
SUPPORTED = [f for f in ALL if f in VERIFIED]
NEWER = [f for f in ALL if f not in REFUSED and f not in VERIFIED]  # in a transformers newer than our checks


def test_enough_families_are_supported():
    assert len(ALL) >= 60, ALL  # the enumeration itself finds the installed transformers' MoE families
    assert len(SUPPORTED) >= 52 and "gpt_oss" in SUPPORTED, SUPPORTED
    assert not VERIFIED & {f.model_type for f in FAMILIES.values() if f.unsupported}


@pytest.mark.parametrize("family", NEWER or ["(none)"])
def test_newer_families_train_or_are_refused_with_their_reason(family, tmp_path):
    """A family that a newer transformers adds must not turn the suite red: it trains by structure, or it raises
    UnsupportedModelError saying why; anything else is reported as not yet verified, never as a failure."""
    if family == "(none)":
        pytest.skip("every MoE family of the installed transformers is verified or refused")
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            end_to_end(lambda: build_tiny_model(family).eval(), tmp_path)
    except UnsupportedModelError as err:
        assert str(err).startswith(f"{family}: ") and len(str(err)) > len(family) + 20, str(err)
        return
    except Exception as err:  # a tiny config the generic shrinking cannot make, a layout not yet handled
        pytest.xfail(f"{family} is not verified with esft-lightning: {type(err).__name__}: {err}"[:500])
    assert any(f"{family}: this MoE family was not among" in str(w.message) for w in caught)  # the user is told


def test_an_unverified_family_trains_by_structure_and_warns(monkeypatch, tmp_path):
    import esft_lightning.models as models

    monkeypatch.setattr(models, "VERIFIED", VERIFIED - {"afmoe"})  # as if a newer transformers had just added it
    models._warn_unverified.cache_clear()
    with pytest.warns(UserWarning, match="afmoe: this MoE family was not among those esft-lightning trained"):
        end_to_end(lambda: build_tiny_model("afmoe").eval(), tmp_path)
    models._warn_unverified.cache_clear()


def test_a_family_without_fused_experts_is_refused_with_its_reason():
    # ergo (transformers 5.25) keeps its experts in a module list: found as MoE by its router, refused by structure.
    if "ergo" not in ALL:
        pytest.skip("the installed transformers has no ergo family")
    with pytest.raises(UnsupportedModelError, match="ergo: routed experts are not a transformers fused experts"):
        find_moe_layers(build_tiny_model("ergo"))


@pytest.mark.parametrize("family", REFUSED)
def test_refused_families_raise_one_clear_error(family):
    with pytest.raises(UnsupportedModelError, match=f"{family}: esft-lightning cannot train .*: .+"):
        get_family(family)


def batch():
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in the second sequence
    return ids, mask


def expected_token_scores(model, ids, mask):
    """Paper Eq. 7 with loops, from what each experts module received (placeholders and zero weights skipped)."""
    layers = find_moe_layers(model)
    seen = {}
    hooks = [
        layer.experts.register_forward_pre_hook(lambda m, args, i=layer.index: seen.__setitem__(i, args[1:3]))
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    scores = {}
    for layer in layers:
        index, weights = seen[layer.index]
        k = index.shape[-1]
        index, weights = index.reshape(ids.shape[0], ids.shape[1], k), weights.reshape(ids.shape[0], ids.shape[1], k)
        total = torch.zeros(layer.num_experts, dtype=torch.float64)
        for b in range(ids.shape[0]):
            positions = [t for t in range(ids.shape[1]) if mask[b, t]]
            for t in positions:
                for e, w in zip(index[b, t].tolist(), weights[b, t].tolist()):
                    if 0 <= e < layer.num_experts and w != 0:
                        total[e] += 1.0 / k / len(positions)
        scores[layer.index] = total / ids.shape[0]
    return scores


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_family_end_to_end(family, impl, tmp_path):
    end_to_end(lambda: build_tiny_model(family, experts_implementation=impl).eval(), tmp_path)


@pytest.mark.parametrize("family", ["qwen3_5_moe", "gemma4", "dots3_note"])
def test_vision_language_models_train_their_language_model_experts(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from esft_lightning.models import tiny_config

    def build():
        torch.manual_seed(0)
        return AutoModelForImageTextToText.from_config(tiny_config(family)).eval()

    model = build()
    chosen = {id(layer.experts) for layer in find_moe_layers(model)}
    names = [n for n, m in model.named_modules() if id(m) in chosen]
    assert names and all(".language_model.layers." in n for n in names), names  # never the vision tower's experts
    end_to_end(build, tmp_path)


def end_to_end(build, tmp_path):
    """profile -> select -> apply -> one AdamW step -> adapter round trip, checking each step's promise."""
    model = build()
    ids, mask = batch()
    profile = profile_routing(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    want = expected_token_scores(model, ids, mask)
    assert profile.token_scores.keys() == want.keys()
    for index, scores in want.items():
        torch.testing.assert_close(profile.token_scores[index].double(), scores, atol=1e-6, rtol=0)
        assert float(profile.gate_scores[index].sum()) > 0

    # Two routed experts per layer: the ones the batch used most, so both receive gradients.
    picks = {i: torch.argsort(s, descending=True, stable=True)[:2].tolist() for i, s in profile.token_scores.items()}
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    summary = apply_expert_config(model, ExpertConfig(picks))
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    layers = find_moe_layers(model)
    per_layer = {
        layer.index: sum(getattr(layer.experts, n)[0].numel() for n in expert_param_names(layer.experts))
        for layer in layers
    }
    assert summary["trainable_params"] == sum(len(picks[i]) * n for i, n in per_layer.items())

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    trained = model.state_dict()
    assert trained.keys() == original.keys()
    experts_keys = {
        f"{name}.{p}": layer.index
        for name, module in model.named_modules()
        for layer in layers
        if module is layer.experts
        for p in expert_param_names(module)
    }
    for key, value in original.items():
        if key in experts_keys:
            changed = (trained[key] != value).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == sorted(picks[experts_keys[key]]), key  # selected moved, every other expert bitwise
        else:
            assert torch.equal(trained[key], value), key

    save_adapter(model, tmp_path / "adapter")
    fresh = build()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        want_logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, want_logits, atol=1e-5, rtol=0)


def test_docs_table_lists_what_the_code_supports():
    import re

    import transformers

    from .conftest import REPO

    text = (REPO / "docs" / "families.md").read_text()
    documented_version = re.search(r"with transformers (\S+):", text)[1]
    if documented_version != transformers.__version__:
        pytest.skip(f"docs/families.md was generated with transformers {documented_version}")
    rows = dict(re.findall(r"^\| `(\w+)` \| (supported|refused|unverified) \|", text, re.MULTILINE))
    stale = "docs/families.md is stale: python -m esft_lightning.analysis.families --markdown > docs/families.md"
    assert sorted(rows) == list(ALL), stale
    assert sorted(f for f, s in rows.items() if s == "supported") == SUPPORTED, stale
    assert set(REFUSED) <= {f for f, s in rows.items() if s == "refused"}, stale
    assert {f for f, s in rows.items() if s != "supported"} == set(NEWER) | set(REFUSED), stale


def test_family_descriptions_discovered_or_refused_with_the_model_type():
    assert get_family("gpt_oss").discovered and not get_family("deepseek_v3").discovered
    with pytest.raises(UnsupportedModelError, match="'llama': not a causal-LM MoE family"):
        get_family("llama")


def test_unknown_family_names_it_and_the_supported_ones():
    # Was a raw KeyError('deepseek_v9') from transformers' CONFIG_MAPPING in tiny_config (ESFTModule(family=...)).
    for build in (build_tiny_model, get_family):
        with pytest.raises(ValueError, match="'deepseek_v9': not a causal-LM MoE family") as err:
            build("deepseek_v9")
        message = str(err.value)
        assert isinstance(err.value, UnsupportedModelError)
        assert "did you mean" in message and "'deepseek_v3'" in message.split("did you mean")[1].split("?")[0]
        assert message.split("supported families: ")[1].split(" (see")[0].split(", ") == SUPPORTED  # not REFUSED


def test_module_with_unknown_family_raises_a_clear_error():
    from esft_lightning.module import ESFTModule

    with pytest.raises(UnsupportedModelError, match="'deepseek_v9'.*did you mean.*'deepseek_v3'"):
        ESFTModule(family="deepseek_v9").build_model()
    with pytest.raises(UnsupportedModelError, match="llama4: esft-lightning cannot train"):  # refused: says why
        build_tiny_model("llama4")


@pytest.mark.parametrize("family", ["gpt_oss", "nemotron_h", "qwen3_next"])
def test_new_layouts_train_one_step_in_lightning(family, tmp_path):
    from esft_lightning import ESFTModule
    from esft_lightning.callbacks import ExpertSelectionCallback

    from .test_cli import fit_one_step

    module = ESFTModule(family=family, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = fit_one_step(module, ExpertSelectionCallback(max_tokens=256, save_adapter=False, plot=False), tmp_path)
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained and all(n.rpartition(".")[2].startswith("esft_") for n in trained)
    assert trainer.global_step == 1
