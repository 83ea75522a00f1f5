"""Qwen3-MoE: softmax router with top-k renormalisation, no shared experts."""

from .base import MoEFamily

FAMILY = MoEFamily(
    tiny_config_is_complete=True,
    shared_expert_attrs=(),
    model_type="qwen3_moe",
    scoring="softmax",
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
    ),
)
