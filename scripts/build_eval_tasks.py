"""Rebuild the jsonl data of the offline bundled lm-eval tasks (src/moeprune/evaluation/tasks/).

Deterministic: the same bundled corpora give byte-identical files. See docs/evaluation.md.
"""

from moeprune.evaluation.tasks.build import write_all

if __name__ == "__main__":
    for name, size in write_all().items():
        print(f"{name}: {size} items")
