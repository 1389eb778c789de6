"""The short README.md model card written next to every pruned checkpoint."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moeprune import __version__
from moeprune.io import is_plain_name
from moeprune.io import markdown_safe as md
from moeprune.planning.mask import ExpertMask


@dataclass
class CardInfo:
    source: str
    out_dir: str
    mask: ExpertMask
    params_before: int
    params_after: int
    format: str = ""  # the weights' format as written (moeprune.quant.describe); empty: not stated
    bytes_before: int | None = None  # tensor bytes of the source and of the export, from the safetensors headers
    bytes_after: int | None = None
    flags: tuple[str, ...] = ()  # apply flags to reproduce beyond the recovery's (e.g. --dequantize)


# What an export records about how it was made: taken from this export's own work, never from the input mask (a
# mask copied from a router-kd export would otherwise make a plain apply claim a recovery that never ran).
EXPORT_RECORDS = ("recovery", "export")


def exported_mask(mask: ExpertMask, recovery_record: dict[str, Any] | None = None) -> ExpertMask:
    """The mask as an export writes it (mask.json and the card): the input's ``extra`` without what only an
    export may say (``recovery``), plus this export's own recovery record when one ran."""
    extra = {k: v for k, v in mask.extra.items() if k not in EXPORT_RECORDS}
    if recovery_record and recovery_record.get("kind", "none") != "none":
        extra["recovery"] = recovery_record
    return replace(mask, extra=extra)


def render_model_card(info: CardInfo) -> str:
    """The card; every value from the mask or the command line is escaped (``md``: one line, no markdown or
    HTML), the front matter's value is a quoted YAML string, and the Reproduce line is shell-quoted."""
    mask = info.mask
    k, n = mask.kept_per_layer, mask.num_experts
    saved = 1 - info.params_after / info.params_before if info.params_before else 0.0
    budget = "none" if mask.protect_budget is None else str(mask.protect_budget)
    lines = [
        "---",
        f"base_model: {json.dumps(str(info.source))}",
        "tags: [moeprune, moe, expert-pruning]",
        "---",
        "",
        f"# {md(Path(info.out_dir).name)}",
        "",
        f"{md(info.source)} with routed experts pruned by moeprune {__version__}: "
        f"every MoE layer keeps **K={k} of N={n}** experts (retain {mask.retain:g}).",
        "",
        "| | |",
        "|---|---|",
        f"| Method | {md(mask.variant)}"
        + (f" (candidate {md(mask.candidate)}{'' if mask.candidate_used is not False else ', unused: B >= K'})"
           if mask.candidate else "")
        + " |",
        f"| Retain ratio | {mask.retain:g} |",
        f"| Experts kept per layer | {k} of {n} |",
        f"| Protected budget B | {md(budget)} |",
        f"| Seed | {md(mask.seed)} |",
        f"| Parameters | {info.params_before:,} -> {info.params_after:,} ({saved:.1%} fewer) |",
        *([f"| Weights format | {md(info.format)} |"] if info.format else []),
        *([f"| Weight bytes | {_bytes_line(info.bytes_before, info.bytes_after)} |"]
          if info.bytes_before and info.bytes_after is not None else []),
        "",
        "Kept experts are renumbered 0..K-1 in their original order; `mask.json` maps them back.",
        "",
        "| Decoder layer | Kept original expert ids | Protected |",
        "|---|---|---|",
    ]
    for layer in sorted(mask.layers):
        protected = sorted(mask.layers[layer].protected)
        lines.append(f"| {layer} | {_ids(mask.kept(layer))} | {_ids(protected) if protected else '-'} |")
    recovery = mask.extra.get("recovery") or {}
    lines += _recovery_lines(recovery)
    lines += [
        "",
        "Reproduce:",
        "",
        *_code_block(reproduce_command(info.source, info.out_dir, [*info.flags, *_recover_flags(recovery).split()])),
        "",
    ]
    return "\n".join(lines)


def reproduce_command(source: str, out_dir: str, extra: list[str] | None = None) -> str:
    """The apply command line, shell-quoted; a path starting with "-" gets "./" so it is not read as a flag."""
    def arg(path: str) -> str:
        return f"./{path}" if str(path).startswith("-") else str(path)

    return shlex.join(["moeprune", "apply", arg(source), "mask.json", "--out", arg(out_dir), *(extra or [])])


def _code_block(text: str) -> list[str]:
    """A fenced block that ``text`` cannot close: the fence is longer than any run of backticks in it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return [fence + "bash", text, fence]


def _recovery_lines(record: dict) -> list[str]:
    """What recovery did after pruning (docs/recovery.md), with its settings and KL before/after."""
    if not record or record.get("kind", "none") == "none":
        return []
    settings = record.get("settings", {})
    corpora = ", ".join(f"{name} ({shape[0]} x {shape[1]})" for name, shape in record.get("corpora", {}).items())
    # The record is this export's own (exported_mask drops any the input mask carried), made now or read back from a
    # cache checked by Recovery.load: its kind and corpus names are plain names.
    kind = record["kind"] if is_plain_name(record["kind"]) else md(record["kind"])
    lines = ["", f"Recovery: **{kind}** on {corpora} (train splits; seed {settings.get('seed')})."]
    kd = record.get("router_kd")
    if kd:
        lines.append(
            f"Router KD: {settings.get('epochs')} epochs, Adam lr {settings.get('lr')}, "
            f"batch {settings.get('batch_size')}; "
            f"only routing tensors trained ({kd['trained']['tensors']}). KL(dense || pruned) per token: "
            + ", ".join(f"{c} {kd['kl_before'][c]:.4f} -> {kd['kl_after'][c]:.4f}" for c in kd["kl_before"])
            + "."
        )
    if record.get("merge"):
        lines.append("Merge: each dropped expert folded into its most similar kept expert (assignment in mask.json).")
    return lines


def _recover_flags(record: dict) -> str:
    if not record or record.get("kind", "none") == "none":
        return ""
    s = record.get("settings", {})
    flags = f" --recover {record['kind']}"
    if s.get("corpora"):
        flags += "".join(f" --recover-corpus {c}" for c in s["corpora"])
    return flags + (f" --recover-samples {s.get('samples')} --recover-seq-len {s.get('seq_len')} --recover-epochs "
                    f"{s.get('epochs')} --recover-lr {s.get('lr')} --recover-batch-size {s.get('batch_size')} "
                    f"--recover-seed {s.get('seed')}")


def _bytes_line(before: int, after: int) -> str:
    return f"{before:,} -> {after:,} ({1 - after / before:.1%} fewer)"


def _ids(ids: list[int]) -> str:
    return " ".join(str(e) for e in ids)
