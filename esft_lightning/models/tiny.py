"""Tiny random configs of any transformers MoE family: its own config class, sizes shrunk generically."""

from __future__ import annotations

from typing import Any

# Config keys shrunk to small values when the family's config has them (and they are larger).
_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "d_model": 64,
    "intermediate_size": 64,
    "ffn_hidden_size": 64,
    "intermediate_size_mlp": 64,
    "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "num_attention_heads": 4,
    "n_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "o_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "qk_head_dim": 24,
    "v_head_dim": 16,
    "index_n_heads": 2,
    "index_num_heads": 2,
    "index_head_dim": 16,
    "index_topk": 16,
    "num_experts": 8,
    "n_routed_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "max_position_embeddings": 512,
    "max_seq_len": 512,
    "model_max_length": 512,
    "sliding_window": 64,
    "attention_chunk_size": 64,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "mamba_dt_rank": 8,
    "mamba_chunk_size": 32,
    "chunk_size": 32,
    "router_hidden_size": 32,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": 320,
    "num_nextn_predict_layers": 0,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "unpadded_vocab_size": 320,
    "ple_embed_dim": 64,
    "hc_lowrank": 16,
}
_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layers")
_MAX_LAYERS = 4  # hybrid families keep one layer of each distinct kind, up to this many


def _pick_layers(per_layer: dict[str, list], num_layers: int, wanted: int) -> list[int]:
    """Layer indices to keep: the first layer of each distinct kind (per-layer lists), else the first ``wanted``."""
    if not per_layer:
        return list(range(min(wanted, num_layers)))
    seen, keep = set(), []
    for i in range(num_layers):
        kind = tuple(str(values[i]) for values in per_layer.values())
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    for i in range(num_layers):  # at least `wanted` layers, so dense-first families still have an MoE layer
        if len(keep) >= wanted:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)[:_MAX_LAYERS]


def shrink_config_dict(values: dict[str, Any], num_layers: int = 2) -> dict[str, Any]:
    """A copy of a config's ``to_dict()`` with sizes, experts, layers and per-layer lists made tiny."""
    out = {k: v for k, v in values.items() if k != "per_layer_config"}  # per-layer size overrides of the full model
    for key, small in _SIZES.items():
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > small:
            out[key] = small
    for heads, kv_heads in (("num_attention_heads", "num_key_value_heads"), ("n_heads", "num_key_value_heads")):
        if values.get(heads) is not None and values.get(heads) == values.get(kv_heads):
            out[kv_heads] = out[heads]  # no grouped-query attention in the full model (e.g. latent attention)
    if values.get("head_dim") is not None and values.get("head_dim") == values.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # multi-head latent attention: rotary dims are the head dim
    if isinstance(values.get("qk_head_dim"), int) and isinstance(values.get("qk_nope_head_dim"), int):
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    count_key = next((k for k in _LAYER_COUNTS if isinstance(out.get(k), int)), None)
    original = out[count_key] if count_key else None
    lists = {k: v for k, v in out.items() if isinstance(v, list) and original and len(v) == original}
    if original is None:  # layer count given only by a per-layer list (e.g. layers_block_type)
        lengths = {len(v) for v in out.values() if isinstance(v, list) and len(v) > 1 and isinstance(v[0], str)}
        if len(lengths) == 1:
            original = lengths.pop()
            lists = {k: v for k, v in out.items() if isinstance(v, list) and len(v) == original}
    if original:
        kinds = {k: v for k, v in lists.items() if all(isinstance(x, str) for x in v)}
        keep = _pick_layers(kinds, original, num_layers)
        for key, per_layer in lists.items():
            out[key] = [per_layer[i] for i in keep]
        if count_key:
            out[count_key] = len(keep)
        if out.get("mlp_only_layers"):
            out["mlp_only_layers"] = []  # dense-first layouts keep their dense layer via first_k_dense_replace
        if isinstance(out.get("moe_layers"), list):
            out["moe_layers"] = [keep.index(i) for i in out["moe_layers"] if i in keep]
    for key, value in values.items():
        if isinstance(value, dict) and key.endswith("_config") and key != "per_layer_config":
            out[key] = shrink_config_dict(value, num_layers)
    return out
