"""DeepSeek-V2 / V2-Lite MoE (the ESFT paper's model): softmax router, shared experts."""

from .base import MoEFamily

FAMILY = MoEFamily(
    tiny_config_is_complete=True,
    model_type="deepseek_v2",
    scoring="softmax",
    shared_expert_attrs=("shared_experts",),
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        n_shared_experts=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=512,
    ),
)
