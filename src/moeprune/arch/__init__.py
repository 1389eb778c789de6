"""MoE architecture support: a table of adapters (:mod:`.adapters`) and one generic view (:mod:`.view`)."""

from moeprune.arch.adapters import ARCHITECTURES, ArchSpec, spec_for
from moeprune.arch.view import MoELayer, decoder_layers, moe_layers, top_k_of

__all__ = ["ARCHITECTURES", "ArchSpec", "MoELayer", "decoder_layers", "moe_layers", "spec_for", "top_k_of"]
