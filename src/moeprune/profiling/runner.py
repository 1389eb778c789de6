"""Profile a dense MoE model on each corpus: one instrumented forward pass over the calibration windows.

Resumable at two levels: a finished corpus (``<corpus>.safetensors`` + ``.json``) is skipped when its
metadata matches the request, and within a corpus the sums so far are checkpointed to
``<corpus>.partial.safetensors`` every ``checkpoint_every`` batches, so a killed run restarts from
the last checkpoint. Under ``torchrun`` (torch.distributed initialised) each rank takes every
world-size-th batch and the sums are all-reduced at every checkpoint; only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import moeprune
from moeprune.arch.adapters import routing_groups
from moeprune.arch.view import moe_layers, top_k_of
from moeprune.data.corpora import CorpusSpec, corpus_fingerprint
from moeprune.data.sampling import calibration_windows
from moeprune.errors import MoePruneError
from moeprune.io import (
    check_own_folder,
    checkpoint_fingerprint,
    foreign_entry,
    make_dirs,
    output_lock,
    output_root,
    remove_orphan_temp_files,
)
from moeprune.loading import config_hash, model_name, resolve_model_path
from moeprune.options import Calibration, fit_window
from moeprune.profiling.instrument import StatsRecorder
from moeprune.profiling.sequential import Share, profile_windows_layer_major, profile_windows_sequential
from moeprune.profiling.stats import ExpertStats, Profile, check_one_model, finished_corpora
from moeprune.streaming.layers import DiskLayers

# Metadata that must match for a saved corpus profile (or checkpoint) to be reused: everything that changes
# the windows (the tokenizer and a local corpus file's content included). The batch size does not: a
# checkpoint records the windows done, so a run resumed with another --batch-size continues at the next one.
# The dtype the model ran in too: a bf16 profile is not "already profiled" for a float32 run (issue 27).
IDENTITY_KEYS = ("config_hash", "weights_sha256", "tokenizer_sha256", "corpus", "corpus_sha256", "samples_requested",
                 "seq_len", "seed", "dtype")


SEQUENTIAL_ONE_PROCESS = "Layer-sequential profiling runs in one process; drop --sequential or torchrun."


def is_distributed() -> bool:
    """Whether this process is one rank of several (torchrun)."""
    return _rank_world()[1] > 1


def model_meta(model) -> dict[str, Any]:
    """What a profile records about the model it came from (planning reads top_k and groups here)."""
    layers = moe_layers(model)
    config = model.config
    n_group, topk_group = routing_groups(config) or (None, None)
    return {
        "model": model_name(model),
        "model_type": getattr(config, "model_type", None),
        "config_hash": config_hash(config),
        "weights_sha256": weights_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_experts": layers[0].num_experts,
        "top_k": top_k_of(model),
        "moe_layers": [layer.index for layer in layers],
        "n_group": n_group,
        "topk_group": topk_group,
    }


def profile_model(
    model: Any,
    tokenizer,
    corpora: list[CorpusSpec],
    out_dir: str | Path,
    settings: Calibration,
    progress: bool = True,
    sequential_device: str | None = None,
) -> Profile:
    """Profile ``model`` on every corpus into ``out_dir`` with the resolved ``settings`` (samples, seq_len,
    batch_size, seed, checkpoint_every); finished corpora are reused, not recomputed. ``sequential_device``:
    run one decoder layer at a time there, the weights kept on the CPU (see profiling.sequential). ``out_dir`` is
    new, empty or a profile folder (never someone else's), and an output root: no folder below it is written
    through a link.

    ``model`` is a loaded model, or a :class:`~moeprune.streaming.layers.DiskLayers` (its meta skeleton with the
    reader of its checkpoint): the weights are then streamed from disk one decoder layer at a time."""
    stream = model if isinstance(model, DiskLayers) else None
    model = stream.model if stream is not None else model
    if settings.samples is None or settings.seq_len is None:
        raise MoePruneError("profile_model takes resolved calibration settings: Calibration(...).resolved(source).")
    out_dir = Path(out_dir)
    check_own_folder(out_dir, foreign_entry, "profile")
    with output_root(out_dir):
        return _profile_model(model, stream, tokenizer, corpora, out_dir, settings, progress, sequential_device)


def _profile_model(model: Any, stream: DiskLayers | None, tokenizer: Any, corpora: list[CorpusSpec], out_dir: Path,
                   settings: Calibration, progress: bool, sequential_device: str | None) -> Profile:
    if len({spec.name for spec in corpora}) != len(corpora):
        raise MoePruneError("Two corpora share a name; name them with NAME=SPEC.")
    recorded = {k: v for k, v in asdict(settings).items() if k != "corpora"}
    base_meta = {**model_meta(model), **_library_versions(), "settings": recorded}
    base_meta["tokenizer_sha256"] = tokenizer_fingerprint(tokenizer)
    if out_dir.exists() or out_dir.is_symlink():
        make_dirs(out_dir)  # below an experiment's --out: a linked profile folder is refused before it is read
    check_one_model(out_dir, base_meta["config_hash"], base_meta["weights_sha256"])
    if _is_rank0() and out_dir.is_dir():
        for path in remove_orphan_temp_files(out_dir):  # profile folders have no lock: only dead writers' files
            _log(progress, f"removed {path.name}, left by a killed profiling run")
    limit = getattr(model.config, "max_position_embeddings", None)
    fit_window(settings.seq_len, limit if isinstance(limit, int) and limit > 1 else None, "--seq-len")
    for spec in corpora:
        path = out_dir / f"{spec.name}.safetensors"
        wanted = _identity(base_meta, spec, settings)
        if spec.name in finished_corpora(out_dir) and _matches(ExpertStats.load(path).meta, wanted):
            _log(progress, f"corpus {spec.name}: already profiled in {path}, skipping")
            continue
        windows = calibration_windows(spec, tokenizer, settings.samples, settings.seq_len, settings.seed)
        meta = {**base_meta, **wanted, "samples": int(windows.shape[0]), "tokens": int(windows.numel())}
        if stream is not None:
            share = Share(*_rank_world())
            stats = _reduced(profile_windows_layer_major(
                stream, windows, settings.batch_size, meta, share=share, progress=progress and share.rank == 0,
                desc=f"profile {spec.name} (streamed from disk)"))
            stats.meta["stream"] = True
        elif sequential_device is not None:
            stats = _sequential(model, windows, settings.batch_size, sequential_device, meta, progress,
                                f"profile {spec.name} (layer by layer)")
        else:
            partial = out_dir / f"{spec.name}.partial.safetensors"
            stats = profile_windows(model, windows, settings, meta, partial, progress, f"profile {spec.name}")
        problem = stats.problem()
        if problem and "NaN" in problem:
            # The model's own outputs (finite weights, checked at load): an overflow in this dtype. Nothing is saved:
            # the profile would only be refused on load and blamed on its file.
            raise MoePruneError(
                f"Profiling {spec.name} gave invalid statistics ({problem}): the model's expert outputs are NaN or "
                "overflow (weights holding NaN/inf, or activations beyond this dtype's range: try --dtype float32); "
                "nothing was saved for this corpus."
            )
        if problem:  # never saved: a profile that would be refused on load (the checkpoint resumed from is removed)
            _remove_partial(out_dir / f"{spec.name}.partial.safetensors")
            raise MoePruneError(f"Profiling {spec.name} gave invalid statistics ({problem}); nothing was saved for "
                                "this corpus and its checkpoint was removed: run `moeprune profile` again.")
        if _is_rank0():
            # Checked again under the folder's lock: a run of another model that finished meanwhile is not
            # silently replaced or mixed with (two profiles started together into one new folder).
            make_dirs(out_dir)
            with output_lock(out_dir / "corpora"):
                check_one_model(out_dir, base_meta["config_hash"], base_meta["weights_sha256"])
                stats.meta["finished_at"] = time.time()
                stats.save(path)
                _remove_partial(out_dir / f"{spec.name}.partial.safetensors")
    _barrier()
    return Profile.load(out_dir, [spec.name for spec in corpora])


@torch.inference_mode()
def profile_windows(
    model,
    windows: torch.Tensor,
    settings: Calibration,
    meta: dict[str, Any],
    partial_path: Path | None = None,
    progress: bool = True,
    desc: str = "profile",
) -> ExpertStats:
    """Sums over ``windows [S, L]``, checkpointed to ``partial_path`` so an interrupted run resumes."""
    layers = moe_layers(model)
    device = next(model.parameters()).device
    recorder = StatsRecorder(layers, device=device)
    total, done = _resume(partial_path, meta, layers)
    remaining = windows[done:]
    batches = list(torch.split(remaining, settings.batch_size)) if len(remaining) else []
    rank, world = _rank_world()
    bar = tqdm(total=len(windows), initial=done, desc=desc, unit="seq", disable=not progress or rank != 0)
    with recorder.installed():
        for step in range(len(batches)):
            if step % world == rank:
                batch = batches[step].to(device)
                model.base_model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
            bar.update(len(batches[step]))
            finished = step + 1
            if finished % settings.checkpoint_every == 0 or finished == len(batches):
                total = total.merge(_reduced(recorder.take()))
                windows_done = done + sum(len(b) for b in batches[:finished])
                total.meta.update(meta, windows_done=windows_done)
                if partial_path is not None and finished < len(batches) and _is_rank0():
                    total.meta["checkpoint_sha256"] = checkpoint_seal(total)
                    total.save(partial_path)
    bar.close()
    total.meta.pop("windows_done", None)
    total.meta.pop("checkpoint_sha256", None)
    return total


def checkpoint_seal(stats: ExpertStats) -> str:
    """SHA-256 of a resume checkpoint's sums and the windows they cover: a checkpoint edited by hand (its sums
    scaled, its ``windows_done`` changed) is not resumed from; the corpus starts over."""
    digest = hashlib.sha256(f"windows_done={stats.meta.get('windows_done')!r}\0".encode())
    for name, tensor in sorted(stats.tensors().items()):
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _sequential(model, windows, batch_size: int, device: str, meta, progress: bool, desc: str) -> ExpertStats:
    if is_distributed():
        raise MoePruneError(SEQUENTIAL_ONE_PROCESS)
    return profile_windows_sequential(model, windows, batch_size, meta, device, progress=progress, desc=desc)


def _resume(partial_path: Path | None, meta: dict[str, Any], layers) -> tuple[ExpertStats, int]:
    empty = ExpertStats.zeros([layer.index for layer in layers], layers[0].num_experts, meta)
    if partial_path is None or not partial_path.exists() or not partial_path.with_suffix(".json").exists():
        return empty, 0
    try:
        partial = ExpertStats.load(partial_path)
    except MoePruneError:  # a corrupt checkpoint is only lost time: start the corpus over
        return empty, 0
    if partial.meta.get("checkpoint_sha256") != checkpoint_seal(partial):  # edited, or written before the seal
        return empty, 0
    if not _matches(partial.meta, {k: meta[k] for k in IDENTITY_KEYS}) or partial.meta.get("world_size", 1) != meta.get(
        "world_size", 1
    ):
        return empty, 0
    return partial, _windows_done(partial.meta)


def _windows_done(meta: dict[str, Any]) -> int:
    """Windows a checkpoint covers; checkpoints of older versions counted batches of their own batch size."""
    if "windows_done" in meta:
        return int(meta["windows_done"])
    return int(meta.get("batches_done", 0)) * int(meta.get("settings", {}).get("batch_size", 0))


def weights_fingerprint(model: Any) -> str | None:
    """:func:`moeprune.io.checkpoint_fingerprint` of the folder a model (or a path) was loaded from; None for a
    hub id or an in-memory model (then the config hash and the tokenizer identify it)."""
    name = model if isinstance(model, str | Path) else model_name(model)
    return checkpoint_fingerprint(resolve_model_path(name)) if name else None


def _identity(base_meta: dict[str, Any], spec: CorpusSpec, settings: Calibration) -> dict[str, Any]:
    return {
        "config_hash": base_meta["config_hash"],
        "weights_sha256": base_meta["weights_sha256"],
        "tokenizer_sha256": base_meta["tokenizer_sha256"],
        "dtype": base_meta["dtype"],
        "corpus": spec.describe(),
        "corpus_sha256": corpus_fingerprint(spec),
        "samples_requested": settings.samples,
        "seq_len": settings.seq_len,
        "seed": settings.seed,
        "world_size": _rank_world()[1],
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what makes the windows: the tokenizer's full definition (fast tokenizers) or its vocabulary,
    and the EOS id that separates documents."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{definition}\neos={tokenizer.eos_token_id}".encode()).hexdigest()


def _matches(meta: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(meta.get(key) == wanted.get(key) for key in IDENTITY_KEYS)


def _reduced(stats: ExpertStats) -> ExpertStats:
    """All-reduce the sums over data-parallel ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        for name in ("count", "gate_sum", "reap_sum", "norm_sum"):
            tensor = getattr(stats, name)
            # gloo and nccl both reduce float64 exactly enough for sums of this size.
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            reduced = tensor.to(device)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            setattr(stats, name, reduced.cpu())
    return stats


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_rank0() -> bool:
    return _rank_world()[0] == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _remove_partial(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)


def _library_versions() -> dict[str, Any]:
    import transformers

    return {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "moeprune": moeprune.__version__,
        }
    }


def _log(progress: bool, message: str) -> None:
    if progress and _is_rank0():
        tqdm.write(message)
