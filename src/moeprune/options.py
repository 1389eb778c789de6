"""Typed options of the pipeline's stages: :class:`Calibration` (profiling), :class:`ReconstructionOptions`
(the expert-sparsity search) and :class:`EvalSettings` (perplexity and lm-eval tasks).

Each is a frozen dataclass with its numeric rules in ``__post_init__``, so the Python API refuses what the
CLI refuses with the same one-line message. A field the preset decides defaults to None ("the preset");
``resolved(source)`` fills every such field from the model source's preset and applies :func:`fit_window`,
*the* window rule, in one place. The verbs resolve their options at the door (``api.py``, ``experiment.py``);
nothing below them reads a preset. The pattern is shared by :class:`moeprune.recovery.options.RecoveryOptions`.
This module imports nothing heavy (no torch), so the CLI can use it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any, Protocol

from moeprune.errors import MoePruneError
from moeprune.presets import PPL_SEQ_LEN_CAP, Preset, help_default

RECON_LOSSES = ("per-batch", "global")
CHECKPOINT_EVERY = 16  # profiling: batches between checkpoints of partial sums
# --recover's choices (moeprune.recovery; here so that the CLI's parser needs no torch): plain pruning, router-only
# KD, expert merging, both.
RECOVERY_KINDS = ("none", "router-kd", "merge", "merge+router-kd")


# ----------------------------------------------------------------------------------------------- rules
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plain(value: Any) -> Any:
    """numpy scalars (alone, or in a list or tuple) as the Python numbers they are: the API's door takes
    ``np.int64(3)`` as a seed and ``np.float32(0.5)`` as a ratio, as the CLI's numbers."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def check_switches(**switches: Any) -> None:
    """The API's on/off arguments are True, False (or None: "decide"): ``overwrite="no"`` would be true."""
    for name, value in switches.items():
        if value is not None and not isinstance(plain(value), bool):
            raise MoePruneError(f"{name} must be True or False, not {value!r}.")


def check_path(value: Any, what: str) -> None:
    """An output or work path given to the API: a non-empty str or os.PathLike (5 or None was a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, str | os.PathLike) or not str(value):
        raise MoePruneError(f"{what} must be a path (a str or pathlib.Path), not {value!r}.")


def at_least_one(flag: str, got: Any) -> MoePruneError:
    """The one message for a count below 1 (``got`` as the user gave it, e.g. a list of retains)."""
    return MoePruneError(f"{flag} must be at least 1 (got {got}); omit it for the default.")


def non_negative(flag: str, got: Any) -> MoePruneError:
    return MoePruneError(f"{flag} must be 0 or more (got {got}).")


def check_count(value: Any, flag: str, *, optional: bool = False) -> None:
    """A whole number of at least 1 (None passes when ``optional``: the default)."""
    if value is None and optional:
        return
    if not _number(value) or not isinstance(value, int):  # 2.0 reached slicing as a float
        raise MoePruneError(f"{flag} must be a whole number of at least 1 (got {value!r}); omit it for the default.")
    if value < 1:
        raise at_least_one(flag, value)
    if value > MAX_COUNT:
        raise too_large(flag, value)


MAX_COUNT = 2**31 - 1  # any count (windows, tokens, batch size, epochs): beyond it torch's int64 arithmetic overflows


def too_large(flag: str, got: Any) -> MoePruneError:
    return MoePruneError(f"{flag} must be at most {MAX_COUNT} (got {got}); omit it for the default.")


MAX_SEED = 2**32 - 1  # what every generator moeprune seeds takes (numpy's is the narrowest); recovery adds 10000


def check_seed(value: Any, flag: str) -> None:
    if not _number(value) or not isinstance(value, int):
        raise MoePruneError(f"{flag} must be a whole number, 0 or more (got {value!r}).")
    if value < 0:
        raise non_negative(flag, value)
    if value > MAX_SEED:
        raise MoePruneError(f"{flag} must be at most {MAX_SEED} (2**32 - 1; got {value}).")


# ------------------------------------------------------------------------------------- flags from fields
def flag(name: str, help: str, *, preset: str | None = None, aliases: Sequence[str] = (), dest: str | None = None,
         **argparse_kwargs: Any) -> dict[str, Any]:
    """A field's command-line flag, as field metadata: its name, help (``preset``: the Preset field whose values
    the help shows), and what argparse needs (type, nargs, choices, metavar, action). The flag's default is
    always None ("not given"): the field's own default, or the preset's once resolved, applies."""
    return {"flag": {"name": name, "help": help, "preset": preset, "aliases": tuple(aliases), "dest": dest,
                     "argparse": argparse_kwargs}}


def flag_dest(f: Field) -> str:
    spec = f.metadata["flag"]
    return spec["dest"] or spec["name"].lstrip("-").replace("-", "_")


def flag_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if "flag" in f.metadata]


def add_flags(parser: Any, cls: type, title: str | None = None, *, only: Sequence[str] | None = None,
              skip: Sequence[str] = (), override: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """Add the flags of ``cls``'s fields (those carrying :func:`flag` metadata) to ``parser``, in a group titled
    ``title`` (None: the parser itself); ``only``/``skip`` pick fields, ``override`` changes a field's argparse
    settings or help for one verb (e.g. ``--retain`` takes several ratios in ``plan``)."""
    group = parser.add_argument_group(title) if title else parser
    for f in flag_fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        spec = f.metadata["flag"]
        settings = {**spec["argparse"], **(override or {}).get(f.name, {})}
        settings["type"] = ASCII_TYPES.get(settings.get("type"), settings.get("type"))  # "٣", "1_0": not numbers
        if settings["type"] is None:
            del settings["type"]
        text = settings.pop("help", spec["help"])
        if spec["preset"]:
            text += f" ({help_default(spec['preset'])})"
        elif f.default not in (MISSING, None) and not isinstance(f.default, bool) and not settings.get("required") \
                and "default" not in text:
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            text += f" (default {shown})"
        default = False if settings.get("action") == "store_true" else None  # None: not given
        group.add_argument(spec["name"], *spec["aliases"], dest=flag_dest(f), default=default, help=text, **settings)
    return group


def given_flags(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``cls``'s flags that were given on the command line, by field name."""
    values = {f.name: getattr(args, flag_dest(f), None) for f in flag_fields(cls)}
    return {name: value for name, value in values.items() if value is not None}


_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_ASCII_FLOAT = re.compile(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|nan|inf|infinity)", re.IGNORECASE)


def int_arg(text: str) -> int:
    """An integer flag: ASCII digits only (Python's ``int`` also takes Unicode digits such as "٣" and "1_0")."""
    value = str(text).strip()
    if not _ASCII_INT.fullmatch(value):
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (write a whole number in ASCII digits, e.g. 16)")
    return int(value)


def float_arg(text: str) -> float:
    """A number flag: ASCII only (Python's ``float`` also takes "٠.٥" and "1_0")."""
    value = str(text).strip()
    if not _ASCII_FLOAT.fullmatch(value):
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r} (write a number in ASCII, e.g. 0.5)")
    return float(value)


ASCII_TYPES = {int: int_arg, float: float_arg}


def eval_batch_size_arg(text: str) -> int | str:
    """``--eval-batch-size``: a positive integer, ``auto`` or ``auto:N``."""
    value = str(text).strip().lower()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if re.fullmatch(r"auto(:[1-9][0-9]*)?", value):
        return value
    raise argparse.ArgumentTypeError(
        f"eval batch size {text!r} is not a positive integer, auto or auto:N; pass e.g. 16, auto or auto:4.")


def budget_arg(text: str) -> int | str:
    """A protect budget on the command line: a whole number or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    if not _ASCII_INT.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'auto' (e.g. -B 20, -B auto)")
    return int(text)


class Source(Protocol):
    """What ``resolved`` needs of a model source (:class:`moeprune.loading.ModelSource`): its preset, known
    from its name before loading, and its positions limit."""

    @property
    def preset(self) -> Preset: ...

    @property
    def max_positions(self) -> int | None: ...


@dataclass(frozen=True)
class PresetSource:
    """A preset standing in for a model source (no model, so no positions limit): ``options.resolved(
    PresetSource(preset))`` fills the preset's values without the window rule."""

    preset: Preset
    max_positions: int | None = None


def fit_window(seq_len: int | None, limit: int | None, flag: str) -> int:
    """THE window rule: a window of ``seq_len`` tokens (given or the preset's) must fit the model's
    ``max_position_embeddings`` (``limit``), else it is refused naming the flag and the fix; None (a window
    the preset leaves open, perplexity's) is min(PPL_SEQ_LEN_CAP, limit)."""
    if seq_len is None:
        return min(PPL_SEQ_LEN_CAP, limit) if limit else PPL_SEQ_LEN_CAP
    if limit is not None and seq_len > limit:
        raise MoePruneError(
            f"{flag} {seq_len} (given or the default) exceeds the model's max_position_embeddings={limit}; "
            f"pass {flag} {limit} or less."
        )
    return int(seq_len)


def unset(value: Any, default: Any) -> Any:
    """``value`` unless it is None ("the preset"), then ``default``."""
    return default if value is None else value


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
        return cls(**{name: plain(v) for name, v in value.items()})
    raise MoePruneError(f"{what} options must be a {cls.__name__} or a dict, not {type(value).__name__}.")


# ----------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration(_Keyed):
    """The profiling calibration: ``samples`` windows of ``seq_len`` tokens per corpus, ``batch_size`` at once,
    sampled with ``seed``; partial sums checkpointed every ``checkpoint_every`` batches. None: the preset."""

    corpora: tuple[str, ...] | None = field(default=None, metadata=flag(
        "--corpus", "repeatable: wikitext2, c4, wiki, web, FILE.txt|.jsonl|.parquet, hf:ID[:CONFIG][:SPLIT][:FIELD], "
        "NAME=SPEC", preset="corpora", dest="corpora", action="append", metavar="SPEC"))
    samples: int | None = field(default=None, metadata=flag("--samples", "sequences per corpus", preset="samples",
                                                            type=int))
    seq_len: int | None = field(default=None, metadata=flag("--seq-len", "tokens per sequence", preset="seq_len",
                                                            type=int))
    batch_size: int = field(default=4, metadata=flag("--batch-size", "sequences per forward pass", type=int))
    seed: int = field(default=0, metadata=flag("--seed", "sampling seed", type=int))
    # None: every CHECKPOINT_EVERY batches (a sequential run never checkpoints)
    checkpoint_every: int | None = field(default=None, metadata=flag(
        "--checkpoint-every", "batches between checkpoints of partial sums (default 16; not with --sequential)",
        type=int))

    def __post_init__(self) -> None:
        if self.corpora is not None:
            if isinstance(self.corpora, str) or not isinstance(self.corpora, Sequence):
                raise MoePruneError(f"Calibration corpora must be a list of corpus specs, not "
                                    f"{type(self.corpora).__name__} (e.g. corpora=['wiki', 'web']).")
            object.__setattr__(self, "corpora", tuple(self.corpora))
            if not self.corpora:
                raise MoePruneError("Calibration needs at least one corpus (--corpus NAME ...).")
        for name in ("samples", "seq_len"):
            check_count(getattr(self, name), f"--{name.replace('_', '-')}", optional=True)
        check_count(self.batch_size, "--batch-size")
        check_count(self.checkpoint_every, "--checkpoint-every", optional=True)
        check_seed(self.seed, "--seed")

    @classmethod
    def coerce(cls, value: Calibration | Mapping[str, Any] | None) -> Calibration:
        return _coerce(cls, value, "calibration")

    def resolved(self, source: Source) -> Calibration:
        """Unset corpora, samples and seq_len from the source's preset; the window fits the model."""
        preset = source.preset
        return replace(
            self,
            corpora=unset(self.corpora, preset.corpora),
            samples=unset(self.samples, preset.samples),
            seq_len=fit_window(unset(self.seq_len, preset.seq_len), source.max_positions, "--seq-len"),
            checkpoint_every=unset(self.checkpoint_every, CHECKPOINT_EVERY),
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None) -> Calibration:
        """From its flags (unset: None, the preset's once resolved; with ``preset``, filled from it now)."""
        options = cls(**given_flags(cls, args))
        return options.resolved(PresetSource(preset)) if preset is not None else options


# -------------------------------------------------------------------------------------- reconstruction
@dataclass(frozen=True)
class ReconstructionOptions(_Keyed):
    """The expert-sparsity (layerwise reconstruction) search.

    ``corpus`` (default: c4, else the last profiled corpus), ``samples`` x ``seq_len`` windows, ``loss``
    (per-batch | global) and ``tokens`` (a budget: at most that many tokens, in whole windows); None means
    the model's preset (:meth:`resolved`). ``seed`` samples the windows; ``workdir`` holds the captured
    activations. How the model loads (dtype, device, tokenizer) is the model source's business
    (:class:`moeprune.loading.ModelSource`), not these options'.
    """

    corpus: str | None = field(default=None, metadata=flag(
        "--recon-corpus", "corpus to reconstruct on (default: c4 if profiled, else the last profiled corpus)"))
    samples: int | None = field(default=None, metadata=flag("--recon-samples", "sequences", preset="recon_samples",
                                                            type=int))
    seq_len: int | None = field(default=None, metadata=flag("--recon-seq-len", "tokens per sequence",
                                                            preset="recon_seq_len", type=int))
    loss: str | None = field(default=None, metadata=flag(
        "--recon-loss", "per-batch: NAEE's sum of per-batch (8-sequence) norms; global: one norm",
        preset="recon_loss", choices=RECON_LOSSES))
    tokens: int | None = field(default=None, metadata=flag(
        "--recon-tokens", "token budget: at most this many tokens, in whole sequences", type=int))
    seed: int = 0
    workdir: str | None = None

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

    def resolved(self, source: Source) -> ReconstructionOptions:
        """Unset samples, seq_len and loss from the source's preset; the window fits the model."""
        preset = source.preset
        return replace(
            self,
            samples=unset(self.samples, preset.recon_samples),
            seq_len=fit_window(unset(self.seq_len, preset.recon_seq_len), source.max_positions, "--recon-seq-len"),
            loss=unset(self.loss, preset.recon_loss),
        )

    @property
    def windows(self) -> int:
        """Windows to sample (resolved options): no more than the token budget keeps, at least one."""
        assert self.samples is not None and self.seq_len is not None, "resolve the options first"
        return min(self.samples, max(1, self.tokens // self.seq_len)) if self.tokens else self.samples

    def to_json(self) -> dict[str, Any]:
        """As experiment.json records it (no seed or workdir: they do not change a selection's meaning)."""
        out = asdict(self)
        for key in ("seed", "workdir"):
            out.pop(key)
        return out

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None) -> ReconstructionOptions:
        """From --recon-* (unset: None, the preset's once resolved; with ``preset``, filled from it now)."""
        options = cls(**given_flags(cls, args))
        return options.resolved(PresetSource(preset)) if preset is not None else options


# ---------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class EvalSettings(_Keyed):
    """What an evaluation measures: perplexity on ``ppl_datasets`` (``ppl_seq_len`` tokens per window, at most
    ``max_windows``; ``ppl_sources`` local copies of hub sets) and the lm-eval ``tasks`` (``limit`` examples
    each, ``eval_batch_size`` at once; a task preset such as ``common`` or ``none``). None: the preset's
    (:meth:`resolved`; its open perplexity window is min(2048, the model's max positions))."""

    ppl_datasets: tuple[str, ...] | None = field(default=None, metadata=flag(
        "--ppl", "perplexity datasets: wikitext2, c4, the bundled wiki web bible man glossary devil, FILE.txt",
        preset="ppl_datasets", nargs="*", metavar="DATASET"))
    ppl_seq_len: int | None = field(default=None, metadata=flag(
        "--ppl-seq-len", "perplexity window (default: min(2048, max positions); bundled: 256)", type=int))
    ppl_sources: Mapping[str, str] | None = field(default=None, metadata=flag(
        "--ppl-data", "local files replacing hub perplexity data, e.g. wikitext2=wiki.test.raw "
        "c4=c4-validation.json.gz", nargs="*", metavar="NAME=PATH"))
    max_windows: int | None = field(default=None, metadata=flag(
        "--ppl-windows", "perplexity on the first N windows of each dataset's test split (default: all)", type=int,
        metavar="N"))
    tasks: str | tuple[str, ...] | None = field(default=None, metadata=flag(
        "--tasks", "lm-eval tasks or presets common, bundled, heldout, stress; none to skip", preset="tasks",
        nargs="*"))
    limit: int | float | None = field(default=None, metadata=flag("--limit", "examples per task (default: all)",
                                                                  type=int))
    eval_batch_size: int | str = field(default=8, metadata=flag("--eval-batch-size", "lm-eval batch size: N, auto "
                                                                "or auto:N", type=eval_batch_size_arg))

    def __post_init__(self) -> None:
        if self.ppl_datasets is not None:
            if isinstance(self.ppl_datasets, str) or not isinstance(self.ppl_datasets, Sequence):
                raise MoePruneError(f"ppl_datasets must be a list of dataset names, not "
                                    f"{type(self.ppl_datasets).__name__} (e.g. ppl_datasets=['wiki']).")
            object.__setattr__(self, "ppl_datasets", tuple(self.ppl_datasets))
        if self.tasks is not None and not isinstance(self.tasks, str):
            if not isinstance(self.tasks, Sequence) or not all(isinstance(t, str) for t in self.tasks):
                raise MoePruneError(f"tasks must be a task name, 'none' or a list of task names, not {self.tasks!r} "
                                    "(e.g. tasks=['arc_easy']).")
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.ppl_sources is not None and not isinstance(self.ppl_sources, Mapping):
            raise MoePruneError(f"ppl_sources must be a dict of NAME: PATH, not {type(self.ppl_sources).__name__}.")
        check_count(self.ppl_seq_len, "--ppl-seq-len", optional=True)
        if self.ppl_seq_len is not None and self.ppl_seq_len < 2:
            raise MoePruneError(f"--ppl-seq-len must be at least 2 (got {self.ppl_seq_len}); a window scores each "
                                "token from the ones before it.")
        check_count(self.max_windows, "--ppl-windows", optional=True)
        if self.limit is not None and (not _number(self.limit) or self.limit < 1):
            raise at_least_one("--limit", self.limit)
        if _number(self.eval_batch_size):  # a word ("auto", "auto:4") is lm-eval's to parse
            check_count(self.eval_batch_size, "--eval-batch-size")

    @classmethod
    def coerce(cls, value: EvalSettings | Mapping[str, Any] | None) -> EvalSettings:
        return _coerce(cls, value, "evaluation")

    def resolved(self, source: Source) -> EvalSettings:
        """Unset datasets, window and tasks from the source's preset; the window fits the model."""
        preset = source.preset
        return replace(
            self,
            ppl_datasets=unset(self.ppl_datasets, preset.ppl_datasets),
            ppl_seq_len=fit_window(unset(self.ppl_seq_len, preset.ppl_seq_len), source.max_positions,
                                   "--ppl-seq-len"),
            tasks=unset(self.tasks, preset.tasks),
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None,
                  ppl_sources: Mapping[str, str] | None = None) -> EvalSettings:
        """From its flags (unset: None, the preset's once resolved; with ``preset``, filled from it now);
        ``ppl_sources``: the parsed --ppl-data (default: parsed here)."""
        given = given_flags(cls, args)
        given["ppl_sources"] = ppl_sources if ppl_sources is not None else parse_ppl_data(given.get("ppl_sources"))
        options = cls(**{k: v for k, v in given.items() if v is not None})
        return options.resolved(PresetSource(preset)) if preset is not None else options


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
    candidate (None: its default). ``reap_corpus`` (a corpus spec; "none": off): REAP is also ranked
    on that corpus alone, ``reap_samples`` x ``reap_seq_len``, as "reap@NAME". None: the preset's."""

    retains: tuple[float, ...] | None = field(default=None, metadata=flag(
        "--retain", "retain ratios", preset="retains", dest="retain", type=float, nargs="+"))
    methods: tuple[str, ...] | None = field(default=None, metadata=flag("--methods", "methods (default: all)",
                                                                        nargs="+"))
    seeds: tuple[int, ...] | None = field(default=None, metadata=flag("--seeds", "random-method seeds",
                                                                      preset="seeds", type=int, nargs="+"))
    protect_budget: int | str | tuple[int | str, ...] | None = field(default=None, metadata=flag(
        "--protect-budget", "TB-Coverage's protect budget: one value, 'auto', or several (e.g. 0 4 8 auto) for a "
        "sensitivity sweep", aliases=("-B",), type=budget_arg, nargs="+", metavar="B"))
    candidate: str | None = field(default=None, metadata=flag(
        "--candidate", "TB-Coverage's candidate method (default: expert-sparsity)"))
    reap_corpus: str | None = field(default=None, metadata=flag(
        "--reap-corpus", "also run REAP ranked on this corpus alone, e.g. code=evol-codealpaca or "
        "code=FILE.jsonl:instruction+output ('none' to skip)", preset="reap_corpus", metavar="SPEC"))
    reap_samples: int | None = field(default=None, metadata=flag("--reap-samples", "REAP-corpus sequences",
                                                                 preset="reap_samples", type=int))
    reap_seq_len: int | None = field(default=None, metadata=flag("--reap-seq-len", "REAP-corpus tokens per sequence",
                                                                 preset="reap_seq_len", type=int))
    recover: tuple[str, ...] = field(default=("none",), metadata=flag(
        "--recover", "recovery kinds, a grid axis: router-kd, merge, merge+router-kd (docs/recovery.md)",
        choices=RECOVERY_KINDS, nargs="+"))

    def __post_init__(self) -> None:
        for name in ("retains", "seeds", "methods", "recover"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str | bytes) or not isinstance(value, Sequence)):
                raise MoePruneError(f"GridOptions.{name} must be a list, not {type(value).__name__} "
                                    f"(e.g. {name}=[{value!r}]).")
        if self.retains is not None:
            object.__setattr__(self, "retains", tuple(self.retains))
            if not self.retains:
                raise MoePruneError("The grid needs at least one retain ratio (--retain R ...).")
            for retain in self.retains:
                check_retain(retain)
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
            for seed in self.seeds:
                check_seed(seed, "--seeds")
        object.__setattr__(self, "recover", tuple(dict.fromkeys(self.recover or ("none",))))
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        if isinstance(self.protect_budget, list | tuple):
            budgets = tuple(dict.fromkeys(self.protect_budget))
            # ``-B 20`` arrives as [20]: one value is not a sweep.
            object.__setattr__(self, "protect_budget", budgets[0] if len(budgets) == 1 else budgets or None)
        if isinstance(self.reap_corpus, str) and self.reap_corpus.lower() in OFF:
            object.__setattr__(self, "reap_corpus", "none")
        check_count(self.reap_samples, "--reap-samples", optional=True)
        check_count(self.reap_seq_len, "--reap-seq-len", optional=True)

    @property
    def budgets(self) -> list[int | str | None]:
        """The B values of the grid: one (a number, "auto" or None for the default) or a sweep."""
        return list(self.protect_budget) if isinstance(self.protect_budget, tuple) else [self.protect_budget]

    @property
    def reap(self) -> str | None:
        """The REAP corpus spec, or None when REAP on its own corpus is off (or not resolved yet)."""
        return None if self.reap_corpus is None or self.reap_corpus == "none" else self.reap_corpus

    def resolved(self, source: Source, methods: Sequence[str] | None = None) -> GridOptions:
        """Unset axes from the source's preset; ``methods``: the grid's methods (for REAP's window, checked
        only when REAP runs on its own corpus)."""
        preset = source.preset
        grid = replace(
            self,
            retains=unset(self.retains, preset.retains),
            seeds=unset(self.seeds, preset.seeds),
            reap_corpus=unset(self.reap_corpus, preset.reap_corpus or "none"),
            reap_samples=unset(self.reap_samples, preset.reap_samples),
            reap_seq_len=unset(self.reap_seq_len, preset.reap_seq_len),
        )
        used = methods if methods is not None else grid.methods
        if grid.reap and (used is None or "reap" in used):
            object.__setattr__(grid, "reap_seq_len", fit_window(grid.reap_seq_len, source.max_positions,
                                                                "--reap-seq-len"))
        return grid

    @classmethod
    def from_args(cls, args: argparse.Namespace, preset: Preset | None = None) -> GridOptions:
        """From its flags (unset: None, the preset's once resolved; with ``preset``, filled from it now)."""
        options = cls(**given_flags(cls, args))
        return options.resolved(PresetSource(preset)) if preset is not None else options


def check_retain(retain: Any) -> None:
    """A retain ratio in (0, 1], the CLI's message for both doors."""
    if not _number(retain):
        raise MoePruneError(f"Retain ratio {retain!r} must be a number in (0, 1], e.g. 0.5 to keep half.")
    if not 0.0 < retain <= 1.0:
        raise MoePruneError(f"Retain ratio {retain} is outside (0, 1]; pass e.g. --retain 0.5 to keep half.")
