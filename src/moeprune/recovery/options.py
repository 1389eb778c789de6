"""The recovery stage's settings as one typed, validated object (the CLI and the Python API share it).

Every numeric or spelling check lives in :meth:`RecoveryOptions.__post_init__`, so ``api.apply(...,
recover=RecoveryOptions(samples=0))`` fails with the same line as ``moeprune apply --recover router-kd
--recover-samples 0``, before any model loads. Defaults come from the model's preset (``recover_*``
fields, see docs/recovery.md); :meth:`RecoveryOptions.from_args` reads the CLI flags over them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from moeprune.data.corpora import parse_corpus
from moeprune.errors import MoePruneError
from moeprune.options import check_seed
from moeprune.presets import RECOVERY_KINDS

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


@dataclass(frozen=True)
class RecoveryOptions:
    """What to recover and how.

    ``kind``: none | router-kd | merge | merge+router-kd. ``corpora``: calibration corpus specs (None: the
    profiled corpora the mask records), train splits only. ``samples`` windows of ``seq_len`` tokens per
    corpus, sampled with ``seed + DATA_SEED_OFFSET``; router-kd trains ``epochs`` passes of Adam(``lr``) over
    batches of ``batch_size`` windows, the data order and everything random drawn from ``seed``.
    ``teacher_top_k``: teacher log-probs kept per token when the vocabulary exceeds FULL_VOCAB_LIMIT.
    ``checkpointing``: gradient checkpointing of decoder layers (None: on for models above 200M parameters).
    """

    kind: str = NONE
    corpora: tuple[str, ...] | None = None
    samples: int = 128
    seq_len: int = 256
    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    teacher_top_k: int = DEFAULT_TEACHER_TOP_K
    merge_tokens: int = DEFAULT_MERGE_TOKENS
    checkpointing: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MoePruneError(f"Unknown recovery {self.kind!r}; choose one of: {', '.join(KINDS)}.")
        if self.corpora is not None:
            object.__setattr__(self, "corpora", tuple(self.corpora))
            if not self.corpora:
                raise MoePruneError("--recover-corpus needs at least one corpus (or omit it for the profiled ones).")
        for name in ("samples", "seq_len", "epochs", "batch_size", "teacher_top_k", "merge_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoePruneError(f"--recover-{name.replace('_', '-')} must be a whole number of at least 1 "
                                    f"(got {value!r}); omit it for the default.")
        if self.seq_len < 2:
            raise MoePruneError(f"--recover-seq-len must be at least 2 tokens (got {self.seq_len}).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MoePruneError(f"--recover-seed must be a whole number, 0 or more (got {self.seed!r}).")
        check_seed(self.seed, "--recover-seed")  # bounded: 2**64 overflowed the generators
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr) or self.lr <= 0:
            raise MoePruneError(f"--recover-lr must be a positive number (got {self.lr!r}), e.g. 3e-3.")
        if self.lr > MAX_LR:  # Adam's step overflows float32 far below 1e38; no router trains above this
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

    def to_json(self) -> dict[str, Any]:
        """The settings as recorded in masks, model cards and experiment.json (what makes a result)."""
        out = asdict(self)
        out["corpora"] = list(self.corpora) if self.corpora is not None else None
        out["data_seed"] = self.data_seed
        return out

    # ------------------------------------------------------------------------------------------- sources
    @classmethod
    def from_preset(cls, preset: Any, kind: str = NONE, **overrides: Any) -> RecoveryOptions:
        """The preset's ``recover_*`` defaults with ``overrides`` (None values are ignored)."""
        values = {
            "samples": preset["recover_samples"],
            "seq_len": preset["recover_seq_len"],
            "epochs": preset["recover_epochs"],
            "lr": preset["recover_lr"],
            "batch_size": preset["recover_batch_size"],
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(kind=kind, **values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Any, kind: str | None = None) -> RecoveryOptions:
        """From the CLI's ``--recover*`` flags over ``preset``; ``kind`` overrides ``--recover`` (a grid's axis)."""
        if kind is None:
            given = getattr(args, "recover", None) or NONE
            kind = given[0] if isinstance(given, list) else given
        corpora = getattr(args, "recover_corpus", None)
        return cls.from_preset(
            preset,
            kind,
            corpora=tuple(corpora) if corpora else None,
            samples=getattr(args, "recover_samples", None),
            seq_len=getattr(args, "recover_seq_len", None),
            epochs=getattr(args, "recover_epochs", None),
            lr=getattr(args, "recover_lr", None),
            batch_size=getattr(args, "recover_batch_size", None),
            seed=getattr(args, "recover_seed", None),
        )


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
