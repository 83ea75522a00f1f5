"""Qwen2-MoE / Qwen1.5-MoE: softmax router, one gated shared expert."""

from .base import MoEFamily

FAMILY = MoEFamily(
    tiny_config_is_complete=True,
    model_type="qwen2_moe",
    scoring="softmax",
    shared_expert_attrs=("shared_expert", "shared_expert_gate"),
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
    ),
)
