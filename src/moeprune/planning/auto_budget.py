"""``-B auto``: TB-Coverage's protect budget picked per retain ratio from generic data only.

For one retain ratio (K kept per layer), a TB-Coverage mask is planned for every budget of
:func:`budget_grid` (0, K/4, K/2, 3K/4, K and the paper's default, all <= K) from the same candidate, and
each is scored by the masked model's token NLL on **held-out windows of the calibration corpora**: for
every profiled corpus, the windows that follow its calibration windows in the same seeded stream of the
same (train) split (:func:`moeprune.data.sampling.held_out_windows`). Each corpus counts equally (the
mean over corpora of its mean token NLL), as TB-Coverage gives every corpus its turn. The lowest wins;
ties go to the smaller B.

Nothing here reads evaluation data: the only text read is the profile's own corpus specs through the
calibration sampler (never the perplexity sets or lm-eval tasks), and a profile whose corpus reads a
``test`` or ``validation`` split is refused. The chosen mask records the criterion and every budget's
score under ``extra["auto_budget"]`` and ``protect_budget_requested = "auto"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from moeprune.data.corpora import CorpusSpec, parse_corpus
from moeprune.data.sampling import held_out_windows
from moeprune.errors import MoePruneError
from moeprune.planning.mask import ExpertMask, record_protection

AUTO = "auto"
HELD_OUT_WINDOWS = 16  # per calibration corpus
EVALUATION_SPLITS = {"test", "validation", "valid", "dev"}
CRITERION = (
    "mean over calibration corpora of the masked model's token NLL on held-out windows (the windows after the "
    "calibration windows in the same seeded stream of the corpus's train split); lowest wins, ties to smaller B"
)


def budget_grid(kept: int, paper_budget: int) -> list[int]:
    """The budgets tried at K=``kept``: 0, K/4, K/2, 3K/4, K and the paper's default, each at most K."""
    return sorted({0, round(kept / 4), round(kept / 2), round(3 * kept / 4), kept, min(paper_budget, kept)})


def held_out_sets(profile: Any, tokenizer: Any, windows: int = HELD_OUT_WINDOWS) -> dict[str, torch.Tensor]:
    """{corpus: [windows, seq_len] token windows} that follow each profiled corpus's calibration windows."""
    sets = {}
    for name in profile.names:
        meta = profile.corpora[name].meta
        spec = CorpusSpec(**meta["corpus"]) if meta.get("corpus") else parse_corpus(name)
        if spec.split in EVALUATION_SPLITS:
            raise MoePruneError(
                f"-B auto scores budgets on held-out windows of the calibration corpora, but corpus {name!r} reads "
                f"the {spec.split!r} split, which is evaluation data. Profile on train splits, or give -B a number."
            )
        seq_len, seed = int(meta["seq_len"]), int(meta.get("seed", 0))
        sets[name] = held_out_windows(spec, tokenizer, windows, seq_len, seed, int(meta.get("samples", 0)))
    return sets


def choose(
    plan_with: Callable[[int], ExpertMask],
    kept: int,
    paper_budget: int,
    score: Callable[[ExpertMask], dict[str, float]],
    sets: dict[str, torch.Tensor],
) -> ExpertMask:
    """The TB-Coverage mask (``plan_with(B)``) of the budget with the lowest held-out NLL, with its record.

    ``score(mask)`` gives {corpus: mean token NLL} of the model under ``mask`` on ``sets`` (the caller runs the
    model: :func:`moeprune.evaluation.perplexity.held_out_nll`), so planning stays "profile in, mask out";
    ``sets`` are read here only for the record (their names and shapes)."""
    tried: dict[int, dict[str, Any]] = {}
    best: tuple[float, ExpertMask] | None = None
    for budget in budget_grid(kept, paper_budget):
        mask = plan_with(budget)
        per_corpus = score(mask)
        nll = sum(per_corpus.values()) / len(per_corpus)
        tried[budget] = {"nll": nll, "ppl": math.exp(nll), "per_corpus_nll": per_corpus}
        if best is None or nll < best[0]:  # ascending B: a tie keeps the smaller
            best = (nll, mask)
    assert best is not None
    mask = best[1]
    record_protection(mask, AUTO)
    mask.extra["auto_budget"] = {
        "chosen": mask.protect_budget,
        "criterion": CRITERION,
        "held_out": {name: list(windows.shape) for name, windows in sets.items()},
        "tried": {str(b): record for b, record in tried.items()},
    }
    mask.notes.append(
        f"B chosen automatically: B={mask.protect_budget} of {sorted(tried)} gave the lowest held-out NLL on the "
        f"calibration corpora ({', '.join(sets)})."
    )
    return mask
