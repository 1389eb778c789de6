"""Apply a mask: in-memory masking, physical slicing of experts and routers, checkpoint export."""

from moeprune.surgery.export import export_pruned, verify_checkpoint
from moeprune.surgery.options import ExportOptions
from moeprune.surgery.slicing import apply_mask, count_parameters, masked, slice_moe_layer

__all__ = [
    "ExportOptions", "apply_mask", "count_parameters", "export_pruned", "masked", "slice_moe_layer",
    "verify_checkpoint",
]
