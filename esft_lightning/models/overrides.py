"""Families with something that cannot be discovered (a tiny-config nudge, a scoring function the router's weights do
not reveal), and bespoke families esft-lightning refuses."""

from .base import MoEFamily

TINY_FIXES = (
    # Scoring not inferable from the routing weights: PhiMoE's sparsemixer weights are not renormalised affinities;
    # Zaya routes one expert per token (nothing to compare), its softmax also covers a skip class.
    MoEFamily("phimoe", scoring="softmax"),
    MoEFamily("zaya", scoring="softmax"),
    # MoE sizes left unset (None) in the config class defaults.
    MoEFamily("dots1", tiny_config=dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)),
    MoEFamily("hunyuan_v1_moe", tiny_config=dict(num_experts=8, moe_topk=2, head_dim=16)),
    # The MoE block is off by default. The router outputs probabilities (softmax over all experts) and scales the
    # renormalised top-k weights per expert, so its scoring cannot be inferred from the weights.
    MoEFamily(
        "gemma4_text",
        scoring="probabilities",
        tiny_config=dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32),
    ),
    MoEFamily(
        "gemma4",
        scoring="probabilities",
        tiny_config=dict(
            text_config=dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32)
        ),
    ),
    # Dots3 Note: with no per-layer config its defaults pick full-size attention; its vision adapter must fit.
    MoEFamily("dots3_note_text", tiny_config=dict(per_layer_config={}, head_dim=24)),
    MoEFamily(
        "dots3_note",
        tiny_config=dict(
            text_config=dict(per_layer_config={}, head_dim=24),
            vision_config=dict(adapter_in_dim=64, adapter_out_dim=64),
            audio_config=dict(adapter_input_size=64, adapter_out_dim=64),
        ),
    ),
    # Hybrids: make sure the few tiny layers include an attention layer and an MoE layer.
    MoEFamily("jamba", tiny_config=dict(attn_layer_period=2, attn_layer_offset=0)),
    MoEFamily("granitemoehybrid", tiny_config=dict(layer_types=["mamba", "attention"])),
    MoEFamily("lfm2_moe", tiny_config=dict(layer_types=["conv", "full_attention"])),
    # Its indexed-attention layer lists name full-size layer numbers; left unset, the config derives them from the
    # tiny model's own layer_types.
    MoEFamily("kolibri1_1", tiny_config=dict(index_layers=None, kv_source_layers=None)),
    # The sparse-attention indexer has no defaults.
    MoEFamily(
        "qwen4_exp_text",
        tiny_config=dict(
            indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4
        ),
    ),
    MoEFamily(
        "qwen4_exp",
        tiny_config=dict(
            text_config=dict(
                indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4
            )
        ),
    ),
)

_DENSE_SCORES = (
    "its experts run on every token, weighted by dense [tokens x experts] scores that are zero outside the top-k, "
    "instead of receiving top-k expert ids"
)
REFUSED = (
    MoEFamily("llama4", unsupported=_DENSE_SCORES),
    MoEFamily("llama4_text", unsupported=_DENSE_SCORES),
    MoEFamily("dbrx", unsupported="experts store each projection as one 2D [experts x size, hidden] matrix"),
    MoEFamily("jetmoe", unsupported="its attention heads are experts too (mixture of attention) with its own kernels"),
    MoEFamily(
        "longcat_flash",
        unsupported=(
            "zero-computation experts are mixed into the routed expert ids, outside transformers' experts layout"
        ),
    ),
    MoEFamily("doge", unsupported="its cross-domain MoE retrieves experts from embedding tables, not expert matrices"),
)
