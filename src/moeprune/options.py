"""Typed options of the pipeline's stages: :class:`Calibration` (profiling), :class:`ReconstructionOptions`
(the expert-sparsity search) and :class:`EvalSettings` (perplexity and lm-eval tasks).

Each is a frozen dataclass with its numeric rules in ``__post_init__``, so the Python API refuses what the
CLI refuses with the same one-line message (written once, here: the CLI preflight calls the same helpers),
and one ``from_args(args, preset)`` that is the only place "an explicit flag wins, else the preset" is
written. The pattern follows :class:`moeprune.recovery.options.RecoveryOptions`. This module imports
nothing heavy (no torch), so the CLI's preflight can use it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from moeprune.errors import MoePruneError
from moeprune.presets import Preset, preset_for

RECON_LOSSES = ("per-batch", "global")


# ----------------------------------------------------------------------------------------------- rules
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def at_least_one(flag: str, got: Any) -> MoePruneError:
    """The one message for a count below 1 (``got`` as the user gave it, e.g. a list of retains)."""
    return MoePruneError(f"{flag} must be at least 1 (got {got}); omit it for the default.")


def non_negative(flag: str, got: Any) -> MoePruneError:
    return MoePruneError(f"{flag} must be 0 or more (got {got}).")


def check_count(value: Any, flag: str, *, optional: bool = False) -> None:
    """A whole number of at least 1 (None passes when ``optional``: the default)."""
    if value is None and optional:
        return
    if not _number(value) or value != int(value):
        raise MoePruneError(f"{flag} must be a whole number of at least 1 (got {value!r}); omit it for the default.")
    if value < 1:
        raise at_least_one(flag, value)


def check_seed(value: Any, flag: str) -> None:
    if not _number(value) or value != int(value):
        raise MoePruneError(f"{flag} must be a whole number, 0 or more (got {value!r}).")
    if value < 0:
        raise non_negative(flag, value)


def flag_or(args: argparse.Namespace, name: str, default: Any) -> Any:
    """The flag's value when given, else ``default`` ("is None", not "or": 0 is an error, never the default).
    getattr: a verb's parser may not define every flag."""
    value = getattr(args, name, None)
    return default if value is None else value


class _Keyed:
    """``options["samples"]`` reads a field, as the dicts these replace were read (and as Preset allows)."""

    def __getitem__(self, name: str) -> Any:
        if name not in {f.name for f in fields(self)}:  # type: ignore[arg-type]
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


def _preset(args: argparse.Namespace, preset: Preset | None) -> Preset:
    return preset if preset is not None else preset_for(getattr(args, "model", None) or "")


def _coerce(cls: type, value: Any, what: str) -> Any:
    """An instance of ``cls`` from itself, None (the defaults) or a dict of its fields (the old API)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise MoePruneError(f"Unknown {what} option(s) {unknown}; known: {', '.join(sorted(known))}.")
        return cls(**value)
    raise MoePruneError(f"{what} options must be a {cls.__name__} or a dict, not {type(value).__name__}.")


# ----------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration(_Keyed):
    """The profiling calibration: ``samples`` windows of ``seq_len`` tokens per corpus, ``batch_size`` at once."""

    corpora: tuple[str, ...] = ("wikitext2", "c4")
    samples: int = 512
    seq_len: int = 1024
    batch_size: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "corpora", tuple(self.corpora))
        if not self.corpora:
            raise MoePruneError("Calibration needs at least one corpus (--corpus NAME ...).")
        for name in ("samples", "seq_len", "batch_size"):
            check_count(getattr(self, name), f"--{name.replace('_', '-')}")

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> Calibration:
        """The preset's calibration with ``overrides`` (None values are ignored)."""
        values: dict[str, Any] = {"corpora": preset.corpora, "samples": preset.samples, "seq_len": preset.seq_len}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None) -> Calibration:
        """From --corpus/--samples/--seq-len/--batch-size over ``preset`` (default: the model's)."""
        return cls.from_preset(
            _preset(args, preset),
            corpora=getattr(args, "corpora", None) or None,
            samples=getattr(args, "samples", None),
            seq_len=getattr(args, "seq_len", None),
            batch_size=getattr(args, "batch_size", None),
        )


# -------------------------------------------------------------------------------------- reconstruction
@dataclass(frozen=True)
class ReconstructionOptions(_Keyed):
    """The expert-sparsity (layerwise reconstruction) search.

    ``corpus`` (default: c4, else the last profiled corpus), ``samples`` x ``seq_len`` windows, ``loss``
    (per-batch | global) and ``tokens`` (a budget: at most that many tokens, in whole windows); None means
    the model's preset (:meth:`resolved`). ``seed`` samples the windows; ``workdir`` holds the captured
    activations; ``tokenizer``, ``dtype``, ``device``, ``trust_remote_code`` load the model and tokenizer.
    """

    corpus: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    loss: str | None = None
    tokens: int | None = None
    seed: int = 0
    workdir: str | None = None
    tokenizer: Any = None
    dtype: str = "auto"
    device: str | None = None
    trust_remote_code: bool = False
    stream: bool | None = None  # the model streamed from disk (None: when it does not fit, see ModelSource)

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "tokens"):
            check_count(getattr(self, name), f"--recon-{name.replace('_', '-')}", optional=True)
        if self.loss is not None and self.loss not in RECON_LOSSES:
            raise MoePruneError(f"--recon-loss {self.loss!r} is unknown; choose one of: {', '.join(RECON_LOSSES)}.")
        check_seed(self.seed, "reconstruction seed")

    @classmethod
    def coerce(cls, value: ReconstructionOptions | Mapping[str, Any] | None) -> ReconstructionOptions:
        """Itself, the defaults for None, or built from a dict of its fields (what the API took before)."""
        return _coerce(cls, value, "reconstruction")

    def resolved(self, preset: Preset) -> ReconstructionOptions:
        """Unset samples, seq_len and loss from ``preset``."""
        return replace(
            self,
            samples=self.samples or preset.recon_samples,
            seq_len=self.seq_len or preset.recon_seq_len,
            loss=self.loss or preset.recon_loss,
        )

    @property
    def windows(self) -> int:
        """Windows to sample (resolved options): no more than the token budget keeps, at least one."""
        assert self.samples is not None and self.seq_len is not None, "resolve the options first"
        return min(self.samples, max(1, self.tokens // self.seq_len)) if self.tokens else self.samples

    def to_json(self) -> dict[str, Any]:
        """As experiment.json records it (no device: a rerun on another device reuses the cells; no tokenizer:
        an object)."""
        out = asdict(self)
        for key in ("device", "tokenizer", "seed", "workdir", "stream"):
            out.pop(key)
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None) -> ReconstructionOptions:
        """From --recon-* (and the model flags) over ``preset`` (default: the model's)."""
        preset = _preset(args, preset)
        return cls(
            corpus=getattr(args, "recon_corpus", None),
            samples=flag_or(args, "recon_samples", preset.recon_samples),
            seq_len=flag_or(args, "recon_seq_len", preset.recon_seq_len),
            loss=getattr(args, "recon_loss", None) or preset.recon_loss,
            tokens=getattr(args, "recon_tokens", None),
            tokenizer=getattr(args, "tokenizer", None),
            dtype=getattr(args, "dtype", None) or "auto",
            device=getattr(args, "device", None),
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
            stream=getattr(args, "stream", None),
        )


# ---------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class EvalSettings(_Keyed):
    """What an evaluation measures: perplexity on ``ppl_datasets`` (``ppl_seq_len`` tokens per window, None:
    the model's context capped, at most ``max_windows``; ``ppl_sources`` local copies of hub sets) and the
    lm-eval ``tasks`` (``limit`` examples each, ``eval_batch_size`` at once)."""

    ppl_datasets: tuple[str, ...] = ("wikitext2", "c4")
    ppl_seq_len: int | None = None
    ppl_sources: Mapping[str, str] | None = None
    max_windows: int | None = None
    tasks: str | tuple[str, ...] | None = None
    limit: int | float | None = None
    eval_batch_size: int | str = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "ppl_datasets", tuple(self.ppl_datasets or ()))
        if self.tasks is not None and not isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(self.tasks))
        check_count(self.ppl_seq_len, "--ppl-seq-len", optional=True)
        check_count(self.max_windows, "--ppl-windows", optional=True)
        if self.limit is not None and (not _number(self.limit) or self.limit < 1):
            raise at_least_one("--limit", self.limit)
        if _number(self.eval_batch_size):  # a word ("auto", "auto:4") is lm-eval's to parse
            check_count(self.eval_batch_size, "--eval-batch-size")

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> EvalSettings:
        values: dict[str, Any] = {
            "ppl_datasets": preset.ppl_datasets,
            "ppl_seq_len": preset.eval_ppl_seq_len,
            "tasks": None if preset.tasks is None else tuple(preset.tasks),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None,
                  ppl_sources: Mapping[str, str] | None = None) -> EvalSettings:
        """From --ppl/--ppl-seq-len/--ppl-windows/--tasks/--limit/--eval-batch-size over ``preset``;
        ``ppl_sources``: the parsed --ppl-data."""
        return cls.from_preset(
            _preset(args, preset),
            ppl_datasets=getattr(args, "ppl", None),
            ppl_seq_len=getattr(args, "ppl_seq_len", None),
            max_windows=getattr(args, "ppl_windows", None),
            ppl_sources=ppl_sources,
            tasks=getattr(args, "tasks", None),
            limit=getattr(args, "limit", None),
            eval_batch_size=getattr(args, "eval_batch_size", None),
        )


def listed(values: Sequence[Any] | None) -> list[Any] | None:
    return None if values is None else list(values)


def parse_ppl_data(items: Sequence[str] | None) -> dict[str, str] | None:
    """``--ppl-data NAME=PATH ...`` (local copies of hub perplexity sets) as a dict."""
    if not items:
        return None
    bad = [item for item in items if "=" not in item]
    if bad:
        raise MoePruneError(f"--ppl-data takes NAME=PATH (e.g. wikitext2=/data/wiki.test.raw); got {bad}.")
    return dict(item.split("=", 1) for item in items)


# ---------------------------------------------------------------------------------------------- grid
OFF = ("none", "off", "")


@dataclass(frozen=True)
class GridOptions(_Keyed):
    """The experiment grid's axes: ``retains`` x ``methods`` (None: every registered method; random once per
    seed of ``seeds``) x ``recover`` (recovery kinds, ``none`` = plain pruning). ``protect_budget``: one B (a
    number or "auto", None: the paper's) or several for a sensitivity sweep; ``candidate``: TB-Coverage's
    candidate (None: its default). ``reap_corpus`` (a corpus spec, None or "none": off): REAP is also ranked
    on that corpus alone, ``reap_samples`` x ``reap_seq_len``, as "reap@NAME"."""

    retains: tuple[float, ...] = (0.25, 0.5, 0.75)
    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 42)
    protect_budget: int | str | tuple[int | str, ...] | None = None
    candidate: str | None = None
    reap_corpus: str | None = None
    reap_samples: int = 128
    reap_seq_len: int = 2048
    recover: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "retains", tuple(self.retains))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "recover", tuple(dict.fromkeys(self.recover or ("none",))))
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        if isinstance(self.protect_budget, list | tuple):
            budgets = tuple(dict.fromkeys(self.protect_budget))
            # ``-B 20`` arrives as [20]: one value is not a sweep.
            object.__setattr__(self, "protect_budget", budgets[0] if len(budgets) == 1 else budgets or None)
        if isinstance(self.reap_corpus, str) and self.reap_corpus.lower() in OFF:
            object.__setattr__(self, "reap_corpus", None)
        if not self.retains:
            raise MoePruneError("The grid needs at least one retain ratio (--retain R ...).")
        for seed in self.seeds:
            check_seed(seed, "--seeds")
        check_count(self.reap_samples, "--reap-samples")
        check_count(self.reap_seq_len, "--reap-seq-len")

    @property
    def budgets(self) -> list[int | str | None]:
        """The B values of the grid: one (a number, "auto" or None for the default) or a sweep."""
        return list(self.protect_budget) if isinstance(self.protect_budget, tuple) else [self.protect_budget]

    @classmethod
    def from_preset(cls, preset: Preset, **overrides: Any) -> GridOptions:
        values: dict[str, Any] = {
            "retains": preset.retains,
            "seeds": preset.seeds,
            "reap_corpus": preset.reap_corpus,
            "reap_samples": preset.reap_samples,
            "reap_seq_len": preset.reap_seq_len,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None) -> GridOptions:
        """From --retain/--methods/--seeds/-B/--candidate/--reap-*/--recover over ``preset``."""
        return cls.from_preset(
            _preset(args, preset),
            retains=getattr(args, "retain", None),
            methods=getattr(args, "methods", None),
            seeds=getattr(args, "seeds", None),
            protect_budget=getattr(args, "protect_budget", None),
            candidate=getattr(args, "candidate", None),
            reap_corpus=getattr(args, "reap_corpus", None),
            reap_samples=getattr(args, "reap_samples", None),
            reap_seq_len=getattr(args, "reap_seq_len", None),
            recover=getattr(args, "recover", None),
        )
