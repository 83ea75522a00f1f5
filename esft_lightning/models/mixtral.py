"""Mixtral: softmax router, top-2 renormalised, no shared experts."""

from .base import MoEFamily

FAMILY = MoEFamily(
    tiny_config_is_complete=True,
    shared_expert_attrs=(),
    model_type="mixtral",
    scoring="softmax",
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
)
