"""DeepSeek-V2/V3's sequence-level balance loss (models/aux_loss.py) against the formula, its gradient, its logging."""

import pytest
import torch

from esft_lightning import ESFTModule
from esft_lightning.callbacks import ExpertSelectionCallback
from esft_lightning.experts.split import apply_expert_config
from esft_lightning.models import build_tiny_model, find_moe_layers
from esft_lightning.models.aux_loss import SequenceBalanceLoss, has_sequence_balance_loss
from esft_lightning.selection.rules import ExpertConfig

from .test_cli import fit_one_step

# One expert group, so the routing is a plain top-k of the affinities the direct computation can redo itself.
ONE_GROUP = {"deepseek_v2": {}, "deepseek_v3": {"n_group": 1, "topk_group": 1}}


def padded_batch():
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def direct_balance_loss(model, batch, sigmoid):
    """Sum over layers of mean over sequences of sum_i f_i P_i, with explicit loops over sequences and tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    total = 0.0
    for layer, layer_logits in zip(find_moe_layers(model), logits, strict=True):
        experts, k = layer.num_experts, layer.top_k
        scores = layer_logits.double().sigmoid() if sigmoid else layer_logits.double().softmax(-1)
        picked = scores.topk(k, dim=-1).indices.view(*ids.shape, k)  # the routing (no bias, one group)
        scores = (scores / scores.sum(-1, keepdim=True)).view(*ids.shape, experts)  # V3: normalised per token
        per_sequence = []
        for b in range(ids.shape[0]):
            positions = [t for t in range(ids.shape[1]) if mask[b, t]]
            count = torch.zeros(experts, dtype=torch.float64)
            for t in positions:
                for e in picked[b, t].tolist():
                    count[e] += 1
            f = experts / (k * len(positions)) * count
            p = sum(scores[b, t] for t in positions) / len(positions)
            per_sequence.append(float((f * p).sum()))
        total += sum(per_sequence) / len(per_sequence)
    return total


@pytest.mark.parametrize("family", list(ONE_GROUP))
def test_balance_loss_equals_the_formula_and_is_added_to_the_training_loss(family):
    module = ESFTModule(family=family, model_config=ONE_GROUP[family], router_aux_loss_coef=0.01)
    model = module.build_model()
    assert has_sequence_balance_loss(model)
    batch = padded_batch()
    total, _ = module._loss(batch, training=True)
    aux = module.last_aux_loss
    want = direct_balance_loss(model, batch, sigmoid=family == "deepseek_v3")
    assert float(aux.detach()) == pytest.approx(want, rel=1e-5)
    validation, _ = module._loss(batch)  # no aux term outside training
    assert module.last_aux_loss is None
    torch.testing.assert_close(total, validation + 0.01 * aux)
    plain = ESFTModule(family=family, model_config=ONE_GROUP[family])  # 0: off by default
    plain.build_model()
    torch.testing.assert_close(plain._loss(batch, training=True)[0], validation)
    assert plain.last_aux_loss is None


def test_padding_is_left_out_of_the_balance_loss():
    model = build_tiny_model("deepseek_v2")
    batch = padded_batch()
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 4:] = 7  # other padding tokens route elsewhere, but are not counted

    def balance(b, mask):
        with SequenceBalanceLoss(model) as recorder:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return recorder.loss(mask)

    torch.testing.assert_close(balance(batch, batch["attention_mask"]), balance(other, other["attention_mask"]))
    unmasked = torch.ones_like(batch["attention_mask"])
    assert not torch.allclose(balance(batch, unmasked), balance(other, unmasked))  # they would count unmasked


def test_gradient_reaches_trained_experts_of_earlier_layers_through_frozen_routers():
    model = build_tiny_model("deepseek_v2")
    first, second = (layer.index for layer in find_moe_layers(model))
    apply_expert_config(model, ExpertConfig({first: [0, 3, 5], second: [1, 2]}))
    routers = [layer.router.weight for layer in find_moe_layers(model)]
    assert not any(w.requires_grad for w in routers)
    batch = padded_batch()
    with SequenceBalanceLoss(model) as recorder:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    recorder.loss(batch["attention_mask"]).backward()  # the balance loss alone
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    earlier = [p.grad for n, p in trained.items() if f"layers.{first}." in n]
    later = [p.grad for n, p in trained.items() if f"layers.{second}." in n]
    assert earlier and all(g is not None and float(g.abs().max()) > 0 for g in earlier)
    # the last MoE layer's router reads that layer's input, before its experts: no gradient reaches them
    assert later and all(g is None or float(g.abs().max()) == 0 for g in later)
    assert all(w.grad is None for w in routers)


def test_float64_model_trains_a_step_with_the_balance_loss_logged(tmp_path):
    # grouped_mm has no float64 kernel: the esft experts forward must take the per-expert loop
    config = tmp_path / "expert_cfg.json"
    ExpertConfig({1: [0, 2]}).save(config)  # explicit (no profiling); layer 2 keeps its experts fused and frozen
    module = ESFTModule(
        family="deepseek_v2",
        dtype="float64",
        router_aux_loss_coef=0.001,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    callback = ExpertSelectionCallback(expert_config=str(config), save_adapter=False, plot=False)
    trainer = fit_one_step(module, callback, tmp_path)
    assert trainer.global_step == 1 and float(trainer.callback_metrics["train/aux_loss"]) > 0
    trained = [p for p in module.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float64 for p in trained)
    experts = find_moe_layers(module.model)[0].experts  # the copies started as the fused rows; a step moved them
    assert not torch.equal(experts.esft_gate_up_proj, experts.gate_up_proj[experts.esft_expert_ids])
