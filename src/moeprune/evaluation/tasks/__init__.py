"""Offline lm-eval tasks over the bundled corpora (YAML + jsonl); see ``build.py``, ``build_heldout.py``,
docs/evaluation.md and docs/testbed.md."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BUNDLED_TASKS: tuple[str, ...] = ("bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont")
# Built from the test splits of the domains calibration never uses (build_heldout.py).
# heldout_cloze shares text with the other two (its context ends inside their gold unit): run with them it
# needs zero_shot's SplitSafeHFLM (evaluation/hflm.py), which scores it as it scores alone.
HELDOUT_TASKS: tuple[str, ...] = ("heldout_order", "heldout_domain", "heldout_cloze")  # the `heldout` preset
