"""Families esft-lightning has trained end to end (tests/test_families.py), and the transformers release checked."""

VERIFIED_WITH = "5.25.0"
"""The newest transformers release whose MoE families were all tried: each is in ``VERIFIED`` or refused."""

VERIFIED: frozenset[str] = frozenset(
    {
        *("afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe"),
        *("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "dots3_note_text"),
        *("ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "gemma4", "gemma4_text"),
        *("glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss"),
        *("granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
        *("hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling2_loop_text", "inkling2_text", "inkling_text", "jamba"),
        *("kimi_linear", "kolibri1", "kolibri1_1", "laguna", "lara_mini", "lfm2_moe", "mellum", "mimo_v2_flash"),
        *("minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl_text", "mixtral", "nemotron_h", "olmoe"),
        *("param2moe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next"),
        *("qwen4_exp", "qwen4_exp_text", "sarvam_mla", "sarvam_moe", "solar_open", "zaya"),
    }
)
"""Model types whose tiny model passes profile -> select -> apply -> AdamW step -> adapter round trip. A family of a
newer transformers that is in neither this set nor the refused ones is still tried by structure, with a warning."""
