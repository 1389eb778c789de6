"""The recovery stage's settings as one typed, validated object (the CLI and the Python API share it).

Every numeric or spelling check lives in :meth:`RecoveryOptions.__post_init__`, so ``api.apply(...,
recover=RecoveryOptions(samples=0))`` fails with the same line as ``moeprune apply --recover router-kd
--recover-samples 0``, before any model loads. A field left None is the model's preset (``recover_*`` fields,
see docs/recovery.md), filled by :meth:`RecoveryOptions.resolved` (with the window rule) at the verb's door, so
``RecoveryOptions(kind="router-kd")`` in Python and ``--recover router-kd`` recover a model alike.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moeprune.data.corpora import parse_corpus
from moeprune.errors import MoePruneError
from moeprune.options import (
    RECOVERY_KINDS,
    PresetSource,
    Source,
    check_count,
    check_seed,
    fit_window,
    flag,
    given_flags,
    unset,
)

KINDS = RECOVERY_KINDS
NONE, ROUTER_KD, MERGE, MERGE_ROUTER_KD = KINDS
# Calibration text for recovery comes from train splits only: these names are evaluation splits.
EVALUATION_SPLITS = frozenset({"test", "validation", "valid", "val", "eval", "dev"})
# Recovery samples its windows with seed + this offset, so that with the same --seed it does not reuse the
# profiling windows verbatim (same train split, another document order and window cut).
DATA_SEED_OFFSET = 10_000
# Teacher targets: full log-probabilities up to this vocabulary size; above it the top-k plus a "rest" bucket.
FULL_VOCAB_LIMIT = 32_768
# ... and only while the full targets (windows x tokens x vocabulary, fp32) stay below this on the CPU: Mixtral's
# 32,000 entries over the paper preset's 256 x 1024 tokens would be 33.5 GB.
FULL_TARGET_BYTES = 2 << 30
DEFAULT_TEACHER_TOP_K = 64
MAX_LR = 1.0  # --recover-lr above this only diverges (1e38 overflowed inside Adam: a traceback)
DEFAULT_MERGE_TOKENS = 4096  # tokens per layer merge compares expert outputs on (merge_delta's max_tokens)
PRESET_FIELDS = ("samples", "seq_len", "epochs", "lr", "batch_size")  # None = the preset's recover_* value


@dataclass(frozen=True)
class RecoveryOptions:
    """What to recover and how.

    ``kind``: none | router-kd | merge | merge+router-kd. ``corpora``: calibration corpus specs (None: the
    profiled corpora the mask records), train splits only. ``samples`` windows of ``seq_len`` tokens per
    corpus, sampled with ``seed + DATA_SEED_OFFSET``; router-kd trains ``epochs`` passes of Adam(``lr``) over
    batches of ``batch_size`` windows, the data order and everything random drawn from ``seed``.
    ``teacher_top_k``: teacher log-probs kept per token when the vocabulary exceeds FULL_VOCAB_LIMIT.
    ``checkpointing``: gradient checkpointing of decoder layers (None: on for models above 200M parameters).
    ``samples``, ``seq_len``, ``epochs``, ``lr``, ``batch_size`` left None are the model's preset
    (:meth:`resolved`); the stages take resolved options only.
    """

    kind: str = field(default=NONE, metadata=flag(
        "--recover", "router-kd: train only the routers to match the dense model (KL); merge: fold each dropped "
        "expert into its most similar kept one; merge+router-kd: both", choices=KINDS))
    corpora: tuple[str, ...] | None = field(default=None, metadata=flag(
        "--recover-corpus", "repeatable: recovery calibration corpus, train split only (default: the profiled "
        "corpora)", action="append", metavar="SPEC"))
    samples: int | None = field(default=None, metadata=flag(
        "--recover-samples", "calibration windows in all, split over the corpora", preset="recover_samples", type=int))
    seq_len: int | None = field(default=None, metadata=flag("--recover-seq-len", "tokens per window",
                                                            preset="recover_seq_len", type=int))
    epochs: int | None = field(default=None, metadata=flag("--recover-epochs", "router-kd passes over the windows",
                                                           preset="recover_epochs", type=int))
    lr: float | None = field(default=None, metadata=flag("--recover-lr", "router-kd Adam learning rate",
                                                         preset="recover_lr", type=float))
    batch_size: int | None = field(default=None, metadata=flag("--recover-batch-size", "windows per router-kd step",
                                                               preset="recover_batch_size", type=int))
    seed: int = field(default=0, metadata=flag(
        "--recover-seed", "recovery seed: data order and window sampling (windows are sampled with seed + 10000, not "
        "the profiling windows)", type=int))
    teacher_top_k: int = DEFAULT_TEACHER_TOP_K
    merge_tokens: int = DEFAULT_MERGE_TOKENS
    checkpointing: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise MoePruneError(f"Unknown recovery {self.kind!r}; choose one of: {', '.join(KINDS)}.")
        if self.corpora is not None:
            if isinstance(self.corpora, str) or not isinstance(self.corpora, Sequence):
                raise MoePruneError(f"RecoveryOptions.corpora must be a list of corpus specs, not "
                                    f"{type(self.corpora).__name__} (e.g. corpora=['wiki']).")
            object.__setattr__(self, "corpora", tuple(self.corpora))
            if not self.corpora:
                raise MoePruneError("--recover-corpus needs at least one corpus (or omit it for the profiled ones).")
        for name in ("samples", "seq_len", "epochs", "batch_size", "teacher_top_k", "merge_tokens"):
            value = getattr(self, name)
            if value is None and name in PRESET_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoePruneError(f"--recover-{name.replace('_', '-')} must be a whole number of at least 1 "
                                    f"(got {value!r}); omit it for the default.")
            check_count(value, f"--recover-{name.replace('_', '-')}")  # and at most MAX_COUNT
        if self.seq_len is not None and self.seq_len < 2:
            raise MoePruneError(f"--recover-seq-len must be at least 2 tokens (got {self.seq_len}).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MoePruneError(f"--recover-seed must be a whole number, 0 or more (got {self.seed!r}).")
        check_seed(self.seed, "--recover-seed")  # bounded: 2**64 overflowed the generators
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float)
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise MoePruneError(f"--recover-lr must be a positive number (got {self.lr!r}), e.g. 3e-3.")
        if self.lr is not None and self.lr > MAX_LR:  # Adam overflowed (a traceback) at 1e38
            raise MoePruneError(f"--recover-lr must be at most {MAX_LR:g} (got {self.lr!r}), e.g. 3e-3.")
        for spec in self.corpora or ():
            check_train_split(spec)

    # ------------------------------------------------------------------------------------------- kinds
    @property
    def active(self) -> bool:
        return self.kind != NONE

    @property
    def router_kd(self) -> bool:
        return self.kind in (ROUTER_KD, MERGE_ROUTER_KD)

    @property
    def merge(self) -> bool:
        return self.kind in (MERGE, MERGE_ROUTER_KD)

    @property
    def data_seed(self) -> int:
        return self.seed + DATA_SEED_OFFSET

    def with_kind(self, kind: str) -> RecoveryOptions:
        return replace(self, kind=kind)

    def check_used_by(self, kinds: Sequence[str]) -> None:
        """Settings given (not the preset's) that none of ``kinds`` uses are refused, at the door, before resolving:
        router-kd's epochs and learning rate with merge alone."""
        if not any(k in (ROUTER_KD, MERGE_ROUTER_KD) for k in kinds):
            ignored = [flag for flag, value in (("--recover-epochs", self.epochs), ("--recover-lr", self.lr))
                       if value is not None]
            if ignored:
                raise MoePruneError(f"{' and '.join(ignored)} only apply to router-kd training (--recover "
                                    f"router-kd or merge+router-kd); drop {'it' if len(ignored) == 1 else 'them'} "
                                    f"for --recover {', '.join(kinds) or NONE}.")

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in PRESET_FIELDS)

    def resolved(self, source: Source) -> RecoveryOptions:
        """Unset ``recover_*`` settings from the source's preset; the window fits the model."""
        preset = source.preset
        return replace(
            self,
            samples=unset(self.samples, preset.recover_samples),
            seq_len=fit_window(unset(self.seq_len, preset.recover_seq_len), source.max_positions, "--recover-seq-len"),
            epochs=unset(self.epochs, preset.recover_epochs),
            lr=unset(self.lr, preset.recover_lr),
            batch_size=unset(self.batch_size, preset.recover_batch_size),
        )

    def require_resolved(self) -> RecoveryOptions:
        """The stages take resolved options only (they never read a preset)."""
        needed = PRESET_FIELDS if self.router_kd or self.kind == NONE else ("samples", "seq_len", "batch_size")
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise MoePruneError(f"RecoveryOptions {missing} are unset (the preset's); resolve them first with "
                                "options.resolved(ModelSource.of(model)), as moeprune.api does.")
        return self

    def to_json(self) -> dict[str, Any]:
        """The settings as recorded in masks, model cards and experiment.json (what makes a result)."""
        out = asdict(self)
        out["corpora"] = list(self.corpora) if self.corpora is not None else None
        out["data_seed"] = self.data_seed
        return out

    # ------------------------------------------------------------------------------------------- sources
    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Any = None, kind: str | None = None) -> RecoveryOptions:
        """From the CLI's ``--recover*`` flags (unset: None, the preset's once resolved; with ``preset``, filled
        from it now); ``kind`` overrides ``--recover`` (a grid's axis)."""
        given = given_flags(cls, args)
        if kind is None:
            kind = given.get("kind") or NONE
            kind = kind[0] if isinstance(kind, list) else kind
        given["kind"] = kind
        options = cls(**given)
        return options.resolved(PresetSource(preset)) if preset is not None else options


def kinds_of(args: argparse.Namespace) -> list[str]:
    """The recoveries asked for on the command line (``--recover`` takes several in ``experiment``)."""
    given = getattr(args, "recover", None) or [NONE]
    kinds = given if isinstance(given, list) else [given]
    return list(dict.fromkeys(kinds))


def check_train_split(spec: str) -> None:
    """Recovery never calibrates on an evaluation split (``wiki:test``, ``hf:ID:CONFIG:validation``, ...)."""
    parsed = parse_corpus(spec)
    if parsed.split.lower() in EVALUATION_SPLITS:
        raise MoePruneError(
            f"Recovery corpus {spec!r} reads the {parsed.split!r} split, an evaluation split; recovery calibrates on "
            "train splits only (e.g. wiki, not wiki:test)."
        )


def check_prunes(kinds: Sequence[str], kept: int, num_experts: int, where: str) -> None:
    """merge needs dropped experts to fold: refuse it for a mask (or retain ratio) keeping all N experts."""
    merging = [k for k in kinds if k in (MERGE, MERGE_ROUTER_KD)]
    if merging and kept >= num_experts:
        raise MoePruneError(
            f"--recover {merging[0]} merges dropped experts into kept ones, but {where} keeps all {num_experts} "
            "experts, so there is nothing to merge; use a lower --retain or --recover router-kd/none."
        )
