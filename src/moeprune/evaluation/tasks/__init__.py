"""Offline lm-eval tasks over the bundled corpora (YAML + jsonl); see ``build.py`` and docs/evaluation.md."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BUNDLED_TASKS: tuple[str, ...] = ("bundled_wiki_cont", "bundled_web_cont", "bundled_cross_cont")
