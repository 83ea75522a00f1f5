"""ESFTModule pieces: router aux loss, dtype resolution, small checkpoints."""

import pytest
import torch

from esft_lightning import ESFTModule
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.selection.rules import ExpertConfig


def batch():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def test_router_aux_loss_is_added_when_asked():
    plain = ESFTModule(family="mixtral")
    with_aux = ESFTModule(family="mixtral", router_aux_loss_coef=0.5)
    plain.build_model(), with_aux.build_model()
    base, _ = plain._loss(batch(), training=True)
    total, out = with_aux._loss(batch(), training=True)
    assert with_aux.last_aux_loss is out.aux_loss  # logged as train/aux_loss
    torch.testing.assert_close(with_aux._loss(batch())[0], base)  # validation loss: no aux term
    torch.testing.assert_close(total, base + 0.5 * out.aux_loss)
    # GLM-4.5 balances by bias (no aux loss); DeepSeek-V2/V3 get theirs from models/aux_loss.py (test_aux_loss.py)
    no_aux = ESFTModule(family="glm4_moe", router_aux_loss_coef=0.5)
    no_aux.build_model()
    with pytest.raises(ValueError, match="computes no router aux loss"):
        no_aux._loss(batch(), training=True)


def test_dtype_auto_is_float32_on_cpu_and_explicit_dtype_is_used():
    assert ESFTModule(family="olmoe").build_model().dtype == torch.float32
    assert ESFTModule(family="olmoe", dtype="bfloat16").build_model().dtype == torch.bfloat16


def test_module_state_dict_holds_only_trainables_once_selected():
    module = ESFTModule(family="qwen3_moe")
    model = module.build_model()
    assert len(module.state_dict()) == len(model.state_dict())  # nothing selected yet: the full model
    apply_expert_config(model, ExpertConfig({0: [1, 2]}))
    assert sorted(module.state_dict()) == [
        "model.model.layers.0.mlp.experts.esft_down_proj",
        "model.model.layers.0.mlp.experts.esft_gate_up_proj",
    ]
    module.save_trainable_only = False
    assert "model.model.layers.0.mlp.experts.gate_up_proj" in module.state_dict()
