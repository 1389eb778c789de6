"""Model implementations moeprune maintains for checkpoints whose hub code no longer runs on transformers 5.

:func:`register` adds them to transformers' Auto classes. transformers prefers a registered class that is
not its own over a checkpoint's ``auto_map`` remote code, with or without ``trust_remote_code``, so a
folder whose config.json says e.g. ``model_type: deepseek`` loads through the port here and its
``modeling_*.py`` is never executed (see docs/deepseek_moe.md).
"""

from __future__ import annotations

from functools import cache


@cache
def register() -> None:
    """Register every port with AutoConfig, AutoModel and AutoModelForCausalLM (idempotent, cheap after once)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from moeprune.models import deepseek_moe  # lazy: the port pulls in transformers' modeling code

    AutoConfig.register("deepseek", deepseek_moe.DeepseekConfig, exist_ok=True)
    AutoModel.register(deepseek_moe.DeepseekConfig, deepseek_moe.DeepseekModel, exist_ok=True)
    AutoModelForCausalLM.register(deepseek_moe.DeepseekConfig, deepseek_moe.DeepseekForCausalLM, exist_ok=True)
