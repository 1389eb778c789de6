"""Capture every MoE block's input from the dense model, once, into the work directory.

Layout::

    <workdir>/reconstruction/<key>/batch_<b>.safetensors   {"layer_<i>": [tokens of batch b, H]}, model dtype
    <workdir>/reconstruction/<key>/meta.json               written last: its presence means complete
    <workdir>/reconstruction/<key>/pending.json            while capturing: the capture's spec, to resume it

Each batch's inputs (all layers) are written as one file as soon as the batch has run, so memory
holds one batch of activations and a crashed capture resumes after its last complete batch. Those
files are the cache: every activation is written to disk once (an earlier layout also joined them
into per-layer files, writing everything twice). :meth:`WorkDir.load_layer` reads one layer's slice
of every batch file (safetensors reads lazily) and concatenates. Every file is written atomically
(temporary name, then rename). A later call with the same key and the same model and tokens finds
``meta.json`` and returns at once; the same key with other data is an error, never silently reused;
a capture in an older layout is discarded and redone.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moeprune.arch.view import moe_layers
from moeprune.errors import MoePruneError
from moeprune.io import (
    make_dirs,
    path_inside,
    read_json,
    remove_orphan_temp_files,
    save_safetensors_atomic,
    write_json_atomic,
)
from moeprune.loading import config_hash, model_name
from moeprune.profiling.runner import weights_fingerprint

CAPTURE_FORMAT = "moeprune.reconstruction-inputs/3"  # /3: weights_sha256 recorded


class WorkDir:
    """Paths of one capture: ``<root>/reconstruction/<key>/``."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.root = Path(root)
        self.key = key
        self.dir = path_inside(self.root / "reconstruction", key, what="Capture key",
                               fix="use a plain name, e.g. 'c4-64x1024-seed0'")

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    @property
    def pending_path(self) -> Path:
        return self.dir / "pending.json"  # the capture in progress (resumed only if the same)

    def part_path(self, batch: int) -> Path:
        return self.dir / f"batch_{batch:05d}.safetensors"

    def read_meta(self) -> dict[str, Any] | None:
        """The finished capture's record, or None (absent, unreadable or not of this schema: the capture is then
        made again): ``batches`` a count whose batch files all exist, ``layers`` a list of layer indices."""
        meta = _cached_json(self.meta_path)
        if meta is None or meta.get("format") != CAPTURE_FORMAT:
            return meta
        batches, layers = meta.get("batches"), meta.get("layers")
        valid = (_is_count(batches) and isinstance(layers, list) and all(_is_count(i) for i in layers)
                 and all(isinstance(meta.get(k), str) for k in ("config_hash", "tokens_sha256", "dtype"))
                 and all(self.part_path(b).is_file() for b in range(batches)))
        return meta if valid else None

    def load_layer(self, layer: int) -> torch.Tensor:
        """The captured inputs ``[T, H]`` of decoder layer ``layer``, in token-window order."""
        meta = self.read_meta()
        if meta is None or layer not in meta["layers"]:
            raise MoePruneError(f"No captured inputs for layer {layer} in {self.dir}; run the capture first.")
        pieces = []
        redo = f"delete {self.dir} (a cache of captured inputs) and run again"
        for batch in range(meta["batches"]):
            path = self.part_path(batch)
            try:
                with safe_open(path, framework="pt") as handle:
                    pieces.append(handle.get_tensor(f"layer_{layer}"))
            except (SafetensorError, OSError) as err:
                raise MoePruneError(f"Captured inputs {path} are truncated or corrupt ({err}); {redo}.") from err
        # Checked before use like every cached file: another capture's batch, a file cut short or edited.
        shapes = {tuple(piece.shape[1:]) for piece in pieces}
        rows = sum(piece.shape[0] for piece in pieces)
        if len(shapes) > 1 or any(piece.dim() != 2 for piece in pieces) or rows != meta.get("tokens", rows):
            raise MoePruneError(f"Captured inputs in {self.dir} do not hold {meta.get('tokens')} tokens of one "
                                f"hidden size for layer {layer}; {redo}.")
        inputs = torch.cat(pieces)
        if not bool(torch.isfinite(inputs).all()):
            raise MoePruneError(f"Captured inputs in {self.dir} hold NaN or infinite values for layer {layer}; {redo}.")
        return inputs


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9


def tokens_hash(token_windows: torch.Tensor) -> str:
    data = token_windows.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def within_budget(token_windows: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """The first whole windows holding at most ``max_tokens`` tokens (all of them when None).

    Calibration windows are already a seeded random sample of the corpus, so a prefix is one too.
    """
    if max_tokens is None or token_windows.numel() <= max_tokens:
        return token_windows
    seq_len = token_windows.shape[1]
    if max_tokens < seq_len:
        raise MoePruneError(
            f"A reconstruction budget of {max_tokens} tokens holds no window of {seq_len} tokens; "
            "raise --recon-tokens or lower --recon-seq-len."
        )
    return token_windows[: max_tokens // seq_len]


def capture_moe_inputs(
    model: nn.Module,
    token_windows: torch.Tensor,
    workdir: str | Path,
    key: str,
    batch_size: int = 4,
    progress: bool = True,
    corpus: str | None = None,
) -> Path:
    """Write each MoE layer's input on ``token_windows [S, L]`` under the work directory; returns its folder."""
    work = WorkDir(workdir, key)
    meta = _expected_meta(model, token_windows, corpus)
    if _already_captured(work, meta):
        return work.dir
    layers = [layer.index for layer in moe_layers(model)]
    batches = range(0, token_windows.shape[0], batch_size)
    _start(work, {**meta, "batch_size": batch_size})
    todo = [(b, s) for b, s in enumerate(batches) if not work.part_path(b).exists()]
    _run_batches(model, token_windows, batch_size, work, todo, progress)
    missing = [b for b in range(len(batches)) if not work.part_path(b).exists()]
    if missing:
        raise MoePruneError(f"The capture in {work.dir} lacks {len(missing)} batch file(s); run again to resume it.")
    write_json_atomic(work.meta_path, {**meta, "batch_size": batch_size, "batches": len(batches), "layers": layers})
    work.pending_path.unlink(missing_ok=True)
    return work.dir


def _start(work: WorkDir, pending: dict[str, Any]) -> None:
    """Resume an interrupted capture of the same data; discard one of other data under this key."""
    make_dirs(work.dir)  # never through a link below the work folder
    if work.pending_path.exists() and _cached_json(work.pending_path) != pending:
        shutil.rmtree(work.dir)
    make_dirs(work.dir)
    remove_orphan_temp_files(work.dir)  # a killed capture's half-written batch (large): only dead writers' files
    write_json_atomic(work.pending_path, pending)


def _cached_json(path: Path) -> dict[str, Any] | None:
    """A capture's own bookkeeping JSON (a cache), None when absent, unreadable or not an object."""
    if not path.exists():
        return None
    try:
        obj = read_json(path, "Capture record", "it is made again")
    except MoePruneError:
        return None
    return obj if isinstance(obj, dict) else None


def _expected_meta(model: nn.Module, token_windows: torch.Tensor, corpus: str | None) -> dict[str, Any]:
    if token_windows.dim() != 2:
        raise MoePruneError(f"Token windows must be [samples, seq_len], got shape {tuple(token_windows.shape)}.")
    return {
        "format": CAPTURE_FORMAT,
        "model": model_name(model),
        "config_hash": config_hash(model.config),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        # The weights themselves (changed in place, same config): inputs captured from others are never reused.
        "weights_sha256": weights_fingerprint(model),
        "corpus": corpus,
        "samples": int(token_windows.shape[0]),
        "seq_len": int(token_windows.shape[1]),
        "tokens": int(token_windows.numel()),
        "tokens_sha256": tokens_hash(token_windows),
    }


def _already_captured(work: WorkDir, meta: dict[str, Any]) -> bool:
    if work.dir.is_dir():
        make_dirs(work.dir)  # a link in its place is refused before anything there is read or deleted
    found = work.read_meta()
    if found is not None and found.get("format") != CAPTURE_FORMAT:
        shutil.rmtree(work.dir)  # an older layout of this cache: capture again
        return False
    if found is None:
        return False
    same = all(found.get(k) == meta[k] for k in ("config_hash", "tokens_sha256", "dtype", "weights_sha256"))
    if not same:
        raise MoePruneError(
            f"{work.dir} holds inputs captured from another model, other weights or other tokens (key "
            f"{work.key!r}); use another key or delete that folder."
        )
    return True


def _run_batches(
    model: nn.Module,
    token_windows: torch.Tensor,
    batch_size: int,
    work: WorkDir,
    todo: list[tuple[int, int]],
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    layers = moe_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.block.register_forward_pre_hook(_recorder(captured, layer.index), with_kwargs=True)
             for layer in layers]
    # The base model stops before the LM head, whose output we never need.
    runner = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch, start in tqdm(todo, desc="capture MoE inputs", disable=not progress):
                captured.clear()
                runner(input_ids=token_windows[start : start + batch_size].to(device), use_cache=False)
                _save_atomic({f"layer_{i}": t for i, t in captured.items()}, work.part_path(batch))
    finally:
        for hook in hooks:
            hook.remove()


def _recorder(captured: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured[index] = hidden.detach().reshape(-1, hidden.shape[-1]).to("cpu").contiguous()

    return hook


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors_atomic(path, tensors)
