"""Stand-in for the hub's configuration_deepseek.py in test checkpoints: moeprune must never execute it.

moeprune reads ``model_type: deepseek`` configs with its own DeepseekConfig (moeprune.models.deepseek_moe).
"""

raise RuntimeError("moeprune executed a checkpoint's configuration_deepseek.py; it must use its own DeepseekConfig")
