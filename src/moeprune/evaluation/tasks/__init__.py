"""Offline lm-eval tasks over the bundled corpora (YAML + jsonl); see ``build.py``, ``build_heldout.py``,
docs/evaluation.md and docs/testbed.md."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BUNDLED_TASKS: tuple[str, ...] = ("bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont")
# Built from the test splits of the domains calibration never uses (build_heldout.py).
HELDOUT_TASKS: tuple[str, ...] = ("heldout_order", "heldout_domain")  # the `heldout` preset
# heldout_cloze scores right alone (dense 67.9%) but came out at 22.9% when run in one lm-eval call with
# the other two at full size (not at --limit 100): kept out of the preset until that is understood.
HELDOUT_BUILT: tuple[str, ...] = (*HELDOUT_TASKS, "heldout_cloze")
