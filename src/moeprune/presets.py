"""Every default of the pipeline in one place: the paper's settings, and a fast set for the bundled testbed.

The preset is decided in one place, the model source (:attr:`moeprune.loading.ModelSource.preset`: the bundled
testbed model gets ``bundled``, every other model ``paper``, ``experiment --preset`` picks one), and an explicit
option always wins over it (each options class's ``resolved(source)``). The CLI's help texts are written from
these values (:func:`help_default`), so they cannot drift from what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from moeprune.bundled import bundled_model_path

PAPER = "paper"
BUNDLED = "bundled"
# Perplexity windows: the SparseGPT/Wanda 2048 tokens, clamped to the model's max positions where a preset
# leaves the window open (ppl_seq_len None; options.fit_window).
PPL_SEQ_LEN_CAP = 2048
RETAINS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Preset:
    """One preset's defaults, by stage. Read as attributes; ``preset["samples"]`` also works (older callers)."""

    name: str
    # calibration (profile)
    corpora: tuple[str, ...]
    samples: int
    seq_len: int
    # reconstruction (expert-sparsity): NAEE's 128 x 2048 of C4 with the loss summed per batch of 8 windows
    # in the paper preset; the bundled one keeps the cheaper global norm on fewer tokens.
    recon_samples: int
    recon_seq_len: int
    recon_loss: str
    # recovery after pruning (--recover router-kd / merge, docs/recovery.md): windows in all, tokens, epochs, Adam lr,
    # windows per step
    recover_samples: int
    recover_seq_len: int
    recover_epochs: int
    recover_lr: float
    recover_batch_size: int
    # evaluation (eval, experiment, prune --ppl): the perplexity window (None = min(2048, max positions))
    ppl_seq_len: int | None
    ppl_datasets: tuple[str, ...]
    tasks: tuple[str, ...]  # lm-eval tasks or task presets ("common": the six of Common Avg)
    # experiment grid
    retains: tuple[float, ...]
    seeds: tuple[int, ...]
    # REAP as its authors calibrate it ("REAP (code)"); the bundled testbed has no code corpus.
    reap_corpus: str | None
    reap_samples: int
    reap_seq_len: int

    def __getitem__(self, name: str) -> Any:
        if name not in _FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in _FIELDS else default


_FIELDS = frozenset(f.name for f in fields(Preset))

PRESETS: dict[str, Preset] = {
    PAPER: Preset(
        name=PAPER,
        corpora=("wikitext2", "c4"),
        samples=512,
        seq_len=1024,
        recon_samples=128,
        recon_seq_len=2048,
        recon_loss="per-batch",
        recover_samples=256,
        recover_seq_len=1024,
        recover_epochs=1,
        recover_lr=3e-3,
        recover_batch_size=8,
        ppl_seq_len=None,
        ppl_datasets=("wikitext2", "c4"),
        tasks=("common",),
        retains=RETAINS,
        seeds=(0, 1, 2, 3, 4, 42),
        reap_corpus="code=evol-codealpaca",
        reap_samples=128,
        reap_seq_len=2048,
    ),
    # The testbed model was trained on 256-token windows; perplexity on the calibration corpora and on
    # every domain calibration never uses (docs/testbed.md).
    BUNDLED: Preset(
        name=BUNDLED,
        corpora=("wiki", "web"),
        samples=128,
        seq_len=256,
        recon_samples=32,
        recon_seq_len=256,
        recon_loss="global",
        recover_samples=128,
        recover_seq_len=256,
        recover_epochs=3,
        recover_lr=3e-3,
        recover_batch_size=8,
        ppl_seq_len=256,
        ppl_datasets=("wiki", "web", "bible", "man", "glossary", "devil"),
        tasks=("heldout",),
        retains=RETAINS,
        seeds=(0, 1, 2, 3, 4, 5),
        reap_corpus=None,
        reap_samples=128,
        reap_seq_len=256,
    ),
}


def is_bundled(model: Any) -> bool:
    """Whether ``model`` names the bundled testbed: ``bundled`` or its directory (a loaded model never does)."""
    if not isinstance(model, str | Path) or not str(model):
        return False
    return str(model) == BUNDLED or Path(model).resolve() == bundled_model_path().resolve()


def preset_name(model: Any) -> str:
    return BUNDLED if is_bundled(model) else PAPER


def preset_for(model: Any) -> Preset:
    """The bundled testbed model gets the fast preset; every other model the paper's settings."""
    return PRESETS[preset_name(model)]


def help_default(name: str) -> str:
    """``default 512; bundled: 128`` for a field, for the CLI's help texts."""
    return f"default {_shown(PRESETS[PAPER][name])}; bundled: {_shown(PRESETS[BUNDLED][name])}"


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
