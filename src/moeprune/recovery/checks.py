"""The CLI's up-front checks of ``--recover`` and its flags (run right after validation.check_args, before any
model loads): the numbers (RecoveryOptions' own checks, so the API refuses the same), train splits only,
something to merge, calibration text for apply, a window the model can take, a layout merge understands."""

from __future__ import annotations

import argparse

from moeprune.arch.adapters import routing_meta
from moeprune.errors import MoePruneError
from moeprune.planning.mask import kept_count
from moeprune.presets import preset_for
from moeprune.recovery import RecoveryOptions, check_mergeable_config, check_prunes, recovery_corpora
from moeprune.recovery.options import NONE, kinds_of
from moeprune.validation import check_corpora, check_seq_len, load_mask, model_config


def check_recovery_args(args: argparse.Namespace) -> None:
    """--recover and its settings, before any model loads (docs/recovery.md lists the cases)."""
    kinds = [k for k in kinds_of(args) if k != NONE]
    if not kinds:
        return
    preset = preset_for(args.model)
    options = [RecoveryOptions.from_args(args, preset, kind) for kind in kinds]  # one line on a bad number
    check_corpora(args.recover_corpus)
    if getattr(args, "model_free", False):
        raise MoePruneError("--recover needs the model built (it runs it); drop --model-free or --recover.")
    config = model_config(args.model, args.trust_remote_code)
    meta = routing_meta(config)
    if args.verb == "apply":
        mask = load_mask(args.mask)
        check_prunes(kinds, mask.kept_per_layer, mask.num_experts, f"the mask {args.mask}")
        recovery_corpora(options[0], mask)  # calibration text: --recover-corpus or the mask's profiled corpora
    elif isinstance(meta["num_experts"], int):
        retains = args.retain if args.retain is not None else preset.retains
        for retain in [retains] if isinstance(retains, float | int) else retains:
            kept = kept_count(retain, meta["num_experts"], meta["top_k"])
            check_prunes(kinds, kept, meta["num_experts"], f"--retain {retain}")
    check_seq_len(config, options[0].seq_len, "--recover-seq-len")
    if any(o.merge for o in options):
        check_mergeable_config(config, args.trust_remote_code)
