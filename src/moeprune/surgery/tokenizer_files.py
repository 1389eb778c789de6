"""Tokenizer files in an export that transformers 4.x, transformers 5 and other readers all load.

An export copies the source's tokenizer files byte for byte where they exist (a local folder, or a hub id's
files already in the Hugging Face cache): re-saving through transformers 5 writes
``"tokenizer_class": "TokenizersBackend"``, a class transformers 4.x (and so llama.cpp's GGUF converter,
which pins it) does not have. Where moeprune writes the files itself (a tokenizer object, no source
files), that class is replaced by ``PreTrainedTokenizerFast``, which both versions load to the same ids.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# transformers-5-only class names -> the class both major versions load identically from tokenizer.json.
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Written beside the main tokenizer files by tokenizers of various families; copied when present.
SIDE_FILES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
              "chat_template.json", "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")


def source_tokenizer_files(source: str | Path, names: Sequence[str]) -> dict[str, Path]:
    """The tokenizer files ``source`` (a folder or a hub id) holds locally, by name; empty when none."""
    wanted = tuple(dict.fromkeys((*names, *SIDE_FILES)))
    folder = Path(source)
    if folder.is_dir():
        return {name: folder / name for name in wanted if (folder / name).is_file()}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return {}
    found = {}
    for name in wanted:
        try:
            cached = try_to_load_from_cache(str(source), name)
        except ValueError:  # not a valid repo id
            return {}
        if isinstance(cached, str):  # (a sentinel object marks a file known to be absent)
            found[name] = Path(cached)
    return found


def write_tokenizer(tok: Any, source: str | Path | None, out: Path, names: Sequence[str]) -> None:
    """Copy ``source``'s tokenizer files into ``out``; with none (or no source), save ``tok`` portably."""
    files = source_tokenizer_files(source, names) if source is not None else {}
    if any(name in files for name in names):
        for name, path in files.items():
            shutil.copyfile(path, out / name)  # byte for byte: what the source's readers already load
        return
    tok.save_pretrained(out)
    make_portable(out)


def make_portable(folder: Path) -> bool:
    """Replace a transformers-5-only ``tokenizer_class`` in ``folder``'s tokenizer_config.json; True if changed."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    portable = PORTABLE_CLASSES.get(config.get("tokenizer_class"))
    if portable is None:
        return False
    log.debug("tokenizer_config.json: tokenizer_class %s -> %s", config["tokenizer_class"], portable)
    config["tokenizer_class"] = portable
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return True
