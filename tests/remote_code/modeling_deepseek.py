"""Stand-in for the hub's modeling_deepseek.py in test checkpoints: moeprune must never execute it.

The real file (written for transformers 4.36) fails on transformers 5 at its first import
(``transformers.modeling_attn_mask_utils``); moeprune loads ``model_type: deepseek`` through its own port
(moeprune.models.deepseek_moe). Importing this file fails loudly, so a test that ran it would fail.
"""

raise RuntimeError("moeprune executed a checkpoint's modeling_deepseek.py; model_type deepseek loads through its port")
