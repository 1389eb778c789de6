"""Loader that lm-eval calls (``custom_dataset: !function data.load_items``) for the bundled tasks.

Reading the jsonl next to this file, instead of ``dataset_path: json`` with ``data_files``, keeps
the tasks working whatever the current directory is (``data_files`` paths are cwd-relative).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def read_items(data_file: str) -> list[dict[str, Any]]:
    with open(HERE / data_file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_items(data_file: str, **_: Any) -> datasets.DatasetDict:
    """lm-eval passes the task's metadata as keyword arguments too; they are not needed here."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_items(data_file))})
