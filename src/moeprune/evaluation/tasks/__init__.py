"""Offline lm-eval tasks over the bundled corpora (YAML + jsonl); see ``build.py``, ``build_heldout.py``,
docs/evaluation.md and docs/testbed.md."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BUNDLED_TASKS: tuple[str, ...] = ("bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont")
# Built from the test splits of the domains calibration never uses (build_heldout.py).
HELDOUT_TASKS: tuple[str, ...] = ("heldout_order", "heldout_domain", "heldout_cloze")
