"""Perplexity with the protocol of the pruning papers (SparseGPT, Wanda).

The evaluation text is tokenised once, cut into non-overlapping windows of ``seq_len`` tokens
(the tail that does not fill a window is dropped), and each window is scored on its own. Inside a
window token t is predicted from tokens 0..t-1, so a window yields ``seq_len - 1`` predictions
(its first token has no context). ``ppl = exp(total NLL / predicted tokens)``. Because every
window has the same number of predictions, this equals SparseGPT's
``exp(sum(window_mean_loss * seq_len) / (windows * seq_len))``.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeprune.bundled import read_bundled_corpus
from moeprune.errors import MoePruneError
from moeprune.io import parse_json, read_bytes, read_text
from moeprune.options import EvalSettings, fit_window
from moeprune.streaming.layers import DiskLayers
from moeprune.streaming.runner import run_layer_major
from moeprune.surgery import masked

# The bundled testbed's domains: calibration corpora, held-out domains, the never-trained one.
BUNDLED_PPL_DATASETS: tuple[str, ...] = ("wiki", "web", "bible", "man", "glossary", "devil")
PPL_DATASETS: tuple[str, ...] = ("wikitext2", "c4", *BUNDLED_PPL_DATASETS)
C4_DOCUMENTS = 1100  # Wanda/SparseGPT: the first 1100 validation documents ...
C4_WINDOWS = 256  # ... and only the first 256 * seq_len tokens of them
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"
LOGIT_CHUNK = 512  # positions per fp32 log-softmax chunk: bounds memory for 150k-token vocabularies

PROTOCOLS = {
    "wikitext2": "Salesforce/wikitext wikitext-2-raw-v1 test rows joined with '\\n\\n', tokenised once",
    "c4": (
        f"allenai/c4 en validation shard 00000-of-00008, first {C4_DOCUMENTS} documents joined with ' ', "
        f"tokenised once, first {C4_WINDOWS} x seq_len tokens"
    ),
    **{
        name: f"moeprune bundled {name!r} corpus, test split, documents joined with '\\n\\n', tokenised once"
        for name in BUNDLED_PPL_DATASETS
    },
    "file": "local text file, read as is, tokenised once",
}
WINDOWING = (
    "non-overlapping windows of seq_len tokens, tail dropped; seq_len-1 predicted tokens per window; "
    "ppl = exp(sum token NLL / predicted tokens), NLL in fp32, summed in fp64"
)


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: str,
    settings: EvalSettings,
    *,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``dataset``: a name in ``PPL_DATASETS`` or a local text file path.

    ``settings`` (:class:`~moeprune.options.EvalSettings`): the window ``ppl_seq_len`` (required: resolve the
    settings for the model, or give it), at most ``max_windows`` windows, and ``ppl_sources``, which maps a dataset
    name to a local file that replaces its hub download (offline use).
    """
    seq_len, max_windows, sources = settings.ppl_seq_len, settings.max_windows, settings.ppl_sources or None
    if seq_len is None:
        raise MoePruneError("perplexity needs a window: pass EvalSettings(ppl_seq_len=...) or settings resolved for "
                            "the model (EvalSettings(...).resolved(source)).")
    _check_seq_len(model, seq_len)
    name, text, protocol = load_eval_text(dataset, sources)
    ids = tokenize(tokenizer, text)
    limit = C4_WINDOWS if name == "c4" else None
    windows = split_windows(ids, seq_len, limit if max_windows is None else _min(limit, max_windows))
    if windows.shape[0] == 0:
        raise MoePruneError(f"{dataset!r} has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}.")
    total = window_nll(model, windows, batch_size, progress, desc=f"ppl {name}")
    predicted = windows.shape[0] * (seq_len - 1)
    return {
        "dataset": name,
        "ppl": math.exp(total / predicted),
        "nll": total / predicted,
        "windows": int(windows.shape[0]),
        "tokens": predicted,
        "seq_len": seq_len,
        "text_tokens": int(ids.numel()),
        "protocol": f"{protocol}; {WINDOWING}",
    }


def _min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _check_seq_len(model: torch.nn.Module, seq_len: int) -> None:
    """The window rule (options.fit_window), for a caller that skipped the verb's resolution."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len < 2:
        raise MoePruneError(f"seq_len must be at least 2 (got {seq_len}).")
    fit_window(seq_len, limit if isinstance(limit, int) and limit > 1 else None, "--ppl-seq-len")


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1D id tensor, special tokens as the tokenizer adds them (as SparseGPT does)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[0].long()


def split_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[windows, seq_len]: consecutive non-overlapping windows; the incomplete tail is dropped."""
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def window_nll(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False, desc: str = "ppl"
) -> float:
    """Summed NLL (float64) of every window's tokens 1..seq_len-1 given the tokens before them.

    ``model`` may be a :class:`~moeprune.streaming.layers.DiskLayers`: the windows then run layer-major, every
    decoder layer read from disk once for all of them."""
    from tqdm.auto import tqdm

    if isinstance(model, DiskLayers):
        return _streamed_nll(model, windows, batch_size, progress, desc)
    device = _input_device(model)
    total = torch.zeros((), dtype=torch.float64)
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += sequence_nll(logits[:, :-1], batch[:, 1:]).cpu()
    return float(total)


def _streamed_nll(place: DiskLayers, windows: torch.Tensor, batch_size: int, progress: bool, desc: str) -> float:
    batches = [{"input_ids": b} for b in torch.split(windows, batch_size)]
    totals = torch.zeros(len(batches), dtype=torch.float64)

    def nll(b: int, logits: torch.Tensor) -> None:
        labels = batches[b]["input_ids"].to(logits.device)
        totals[b] = sequence_nll(logits[:, :-1], labels[:, 1:]).cpu()

    run_layer_major(place, batches, on_logits=nll, progress=progress, desc=f"{desc} (streamed from disk)")
    return float(totals.sum())


def held_out_nll(model: torch.nn.Module, mask: Any, sets: Mapping[str, torch.Tensor], batch_size: int = 4) -> dict:
    """{corpus: mean token NLL} of ``model`` under ``mask`` (applied in memory, restored afterwards): the
    score ``-B auto`` ranks budgets by (:func:`moeprune.planning.auto_budget.choose`)."""
    with torch.inference_mode(), masked(model, mask):
        return {
            name: window_nll(model, windows, batch_size) / (windows.shape[0] * (windows.shape[1] - 1))
            for name, windows in sets.items()
        }


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Sum of -log p(label) in float64; log-softmax in fp32, a chunk of positions at a time."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, logits.shape[1], chunk):
        part = logits[:, start : start + chunk].float()
        nll = F.cross_entropy(part.flatten(0, 1), labels[:, start : start + chunk].flatten(), reduction="none")
        total += nll.double().sum()
    return total


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


# --- evaluation texts -------------------------------------------------------------------------


def load_eval_text(dataset: str, sources: Mapping[str, str | Path] | None = None) -> tuple[str, str, str]:
    """(name, text, protocol description) for a dataset name or a local file path."""
    sources = sources or {}
    if dataset in sources:
        path = Path(sources[dataset])
        return dataset, _local_text(dataset, path), f"{PROTOCOLS.get(dataset, PROTOCOLS['file'])} (from {path})"
    if dataset == "wikitext2":
        return dataset, "\n\n".join(_hub_rows(dataset)), PROTOCOLS[dataset]
    if dataset == "c4":
        return dataset, " ".join(_hub_rows(dataset)[:C4_DOCUMENTS]), PROTOCOLS[dataset]
    if dataset in BUNDLED_PPL_DATASETS:
        return dataset, "\n\n".join(read_bundled_corpus(dataset, "test")), PROTOCOLS[dataset]
    path = Path(dataset)
    if looks_like_path(dataset):
        return path.name, read_text(path, "Perplexity file"), f"{PROTOCOLS['file']} ({path})"
    raise MoePruneError(
        f"Unknown perplexity dataset {dataset!r}: use one of {list(PPL_DATASETS)} or a path to a local text file."
    )


def looks_like_path(dataset: str) -> bool:
    """A --ppl value meant as a file: it exists (as anything: a folder or FIFO is then named as such), or it
    has a folder or a suffix (a missing file is reported as missing, not as an unknown dataset)."""
    path = Path(dataset)
    return path.exists() or path.is_symlink() or len(path.parts) > 1 or bool(path.suffix)


def check_ppl_datasets(datasets: Sequence[str] | None, sources: Mapping[str, str | Path] | None = None) -> None:
    """Every --ppl name is a known dataset, a --ppl-data name or a path (before the model loads, not after)."""
    for dataset in datasets or []:
        if dataset not in (sources or {}) and dataset not in PPL_DATASETS and not looks_like_path(dataset):
            raise MoePruneError(f"Unknown perplexity dataset {dataset!r}: use one of {list(PPL_DATASETS)} or a path "
                                "to a local text file.")


def check_local_ppl_files(datasets: Sequence[str] | None, sources: Mapping[str, str | Path] | None) -> None:
    """Every local perplexity file (a --ppl FILE, a --ppl-data NAME=PATH) reads as its loader reads it: before the
    model loads, a folder, FIFO, device, non-UTF-8 or malformed file is one line."""
    sources = sources or {}
    for name, path in sources.items():
        if name in (datasets or sources):
            _local_text(name, Path(path))
    for dataset in datasets or []:
        if dataset not in sources and dataset not in PPL_DATASETS and looks_like_path(dataset):
            read_text(Path(dataset), "Perplexity file")


def _local_text(name: str, path: Path) -> str:
    """A local copy of a hub dataset, turned into the same text the hub version gives."""
    what = f"Local file for {name!r}"
    if name == "c4" and path.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")):
        return " ".join(_json_lines_text(path, C4_DOCUMENTS, what))
    text = read_text(path, what)
    if name == "wikitext2":
        # wiki.test.raw: the hub dataset has one row per line, keeping its '\n', blank lines as ''.
        return "\n\n".join(row if row.strip() else "" for row in text.splitlines(keepends=True))
    return text


def _json_lines_text(path: Path, limit: int, what: str) -> list[str]:
    """The "text" field of the first ``limit`` records of a (gzipped) JSON-lines file, as C4 ships."""
    data = read_bytes(path, what)
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise MoePruneError(f"{what} {path} is not a readable gzip file ({err}); re-download it.") from err
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise MoePruneError(f"{what} {path} is not UTF-8 text (byte {err.start}); re-download it.") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            record = parse_json(line, f"{what} {path} line {number}", "fix or drop that line")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MoePruneError(f"{what} {path} line {number} is not an object with a string \"text\" field.")
            rows.append(record["text"])
        if len(rows) == limit:
            break
    return rows


def _hub_rows(name: str) -> list[str]:
    import datasets

    try:
        if name == "wikitext2":
            data = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
        else:
            data = datasets.load_dataset("allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
    except Exception as err:  # datasets raises ConnectionError, OSError, DatasetNotFoundError, ... offline
        example = "/path/wiki.test.raw" if name == "wikitext2" else "/path/c4-validation.00000-of-00008.json.gz"
        raise MoePruneError(
            f"Cannot reach the hub dataset for {name!r} ({err.__class__.__name__}: {err}). Pass a local copy, "
            f"e.g. --ppl-data {name}={example} (Python: sources={{'{name}': path}})."
        ) from err
    return list(data["text"])
