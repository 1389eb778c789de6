"""Write a pruned Hugging Face checkpoint: weights, config, tokenizer, remote code, mask.json, model card.

Everything is written into a temporary sibling directory and renamed into place only after the reloaded
checkpoint has been verified against the in-memory pruned model, so a failure never leaves half an output.

Memory: the model is pruned in place in its own dtype and on its own device (a GPU when there is one, see
loading.load_model); verification takes the pruned model's logits and weight fingerprints first, frees
the model (when it loaded it), and only then reloads the written checkpoint, so at no time are two full
models or an fp32 copy held.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moeprune.errors import MoePruneError
from moeprune.io import atomic_directory, check_output_dir, read_config_json
from moeprune.loading import (
    ModelSource,
    checkpoint_dtype,
    load_config,
    load_model,
    load_tokenizer,
    model_name,
    resolve_model_path,
)
from moeprune.planning.mask import ExpertMask
from moeprune.quant import QuantFormat, checkpoint_bytes, describe
from moeprune.streaming.layers import DiskLayers
from moeprune.streaming.runner import run_layer_major
from moeprune.surgery.config_json import pruned_config_json, source_config_json, without_quantization
from moeprune.surgery.delta import Recovery, apply_delta
from moeprune.surgery.model_card import CardInfo, exported_mask, render_model_card
from moeprune.surgery.options import ExportOptions
from moeprune.surgery.shards import check_quantized_source, prune_checkpoint_files, pruned_config, write_pruned_tensors
from moeprune.surgery.slicing import apply_mask, count_parameters, masked, masked_on_load
from moeprune.surgery.tokenizer_files import write_tokenizer

log = logging.getLogger(__name__)

VERIFY_ATOL = 1e-5  # fp32 checkpoints
# Half-precision checkpoints: relative to the largest logit. The reload runs the same kernels in the same
# dtype (exact on CPU); this only absorbs nondeterministic GPU kernels, far below what a wrong weight,
# routing or rope setting changes.
VERIFY_HALF_RTOL = 1e-2
# Weights are written in shards of at most this size (the hub's usual size): a model on a GPU is staged
# to CPU memory one shard at a time by safetensors.
MAX_SHARD_SIZE = "5GB"
FINGERPRINT_CHUNK = 1 << 26  # bytes hashed per step, so GPU tensors are copied to the CPU in small pieces
VERIFY_SHAPE = (2, 32)  # random sequences x tokens compared at verification
STREAMED_DEQUANTIZE = ("--dequantize writes the model dequantized from memory, and this model streams from disk here; "
                       "drop --dequantize (the export keeps the source's format) or --no-stream.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def export_pruned(
    model: ModelSource | nn.Module | str | Path,
    mask: ExpertMask | str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    recovery: Recovery | None = None,
    progress: bool = True,
) -> Path:
    """Prune a model to ``mask`` and save it as a checkpoint in ``out_dir``; returns ``out_dir``.

    ``model``: a :class:`~moeprune.loading.ModelSource` (or what :meth:`ModelSource.of` takes). A model object is
    pruned only for the duration of the export and restored afterwards; a path or hub id is loaded with the
    source's ``dtype`` ("auto": the checkpoint's own) on its ``device`` (default: the GPU when there is one, see
    loading.load_model). The source's ``tokenizer`` is a path or a tokenizer object (default: the model's own
    directory, skipped with a warning when it has none). ``options``
    (:class:`~moeprune.surgery.options.ExportOptions`): ``overwrite`` an existing ``out_dir``; ``dequantize`` a
    quantized source; with ``verify`` the written checkpoint is reloaded in the same dtype and placement and its
    weights and logits compared with the in-memory pruned model's (see :class:`Reference`); the caller checks the
    mask against the model (``force``). ``recovery`` (a :class:`moeprune.recovery.Recovery`) replaces the
    tensors its delta names after slicing: the verification then holds the checkpoint to the recovered
    model, and mask.json and the model card record the recovery.
    """
    options = options or ExportOptions()
    overwrite, verify, dequantize = options.overwrite, options.verify, options.dequantize
    out = Path(out_dir)
    given = ModelSource.of(model)
    model_or_path, tokenizer = given.model, given.tokenizer
    dtype, device, trust_remote_code = given.dtype, given.device, given.trust_remote_code
    # Fail before the (possibly long) model load: an existing --out, or one overlapping the source.
    source_path = None if given.is_loaded else given.name
    check_output_dir(out, sources=[source_path], overwrite=overwrite)
    if not isinstance(mask, ExpertMask):
        mask = ExpertMask.load(mask)
    quantized = _quantized_source(model_or_path, source_path, dequantize, delta=getattr(recovery, "delta", None))
    delta = getattr(recovery, "delta", None) or {}
    # The exported mask.json (and so the card) records this export's recovery, if any: what was done, with which
    # settings and seed; never a recovery the input mask claims.
    mask = exported_mask(mask, None if recovery is None else recovery.record)
    steps = tqdm(total=4 if verify else 3, desc="apply", disable=not progress, unit="step")
    try:
        _step(steps, "loading model")
        model, owned = _model(model_or_path, dtype, device, trust_remote_code, dequantize)
        source = model_name(model_or_path if isinstance(model_or_path, (str, Path)) else model)
        source_dir = _local_dir(source)
        # Whoever hands us a loaded remote-code model has already trusted that code.
        trust = trust_remote_code or (not owned and bool(getattr(model.config, "auto_map", None)))
        tok = _tokenizer(tokenizer, source, source_dir, trust)
        params_before = count_parameters(model)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            with _pruned(model, mask, owned, delta):
                info = CardInfo(source, str(out), mask, params_before, count_parameters(model))
                reference = Reference.of(model) if verify else None
                _write(model, tok, mask, info, source_dir or source, tmp, steps,
                       _tokenizer_source(tokenizer, source_dir or source), quantized, dequantize)
            if reference is not None:
                placement = _placement(model)
                if owned:  # ours alone: free it before the reload, so two models are never held
                    del model
                    _release_memory()
                _step(steps, "verifying reloaded checkpoint")
                reference.check(tmp, placement, trust_remote_code=trust)
        _step(steps, "done")
    finally:
        steps.close()
    log.info("Wrote pruned checkpoint to %s (%s -> %s parameters)", out, f"{info.params_before:,}",
             f"{info.params_after:,}")
    return out


@torch.no_grad()
def verify_checkpoint(model: nn.Module, path: str | Path, *, trust_remote_code: bool = False) -> float:
    """Reload ``path`` like ``model`` is placed, in its dtype, and compare weights and logits with ``model``.

    Weights must be equal; returns the logits' max |diff| and raises MoePruneError above the tolerance.
    """
    return Reference.of(model).check(path, _placement(model), trust_remote_code=trust_remote_code)


@dataclass
class Reference:
    """What the reloaded checkpoint must reproduce: the pruned model's logits on fixed random tokens and
    a fingerprint (shape, dtype, sha256 of the bytes) of every parameter. Taken before the export, so the
    pruned model need not be kept for the comparison."""

    ids: torch.Tensor
    logits: torch.Tensor
    fingerprints: dict[str, tuple]
    dtype: torch.dtype

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module) -> Reference:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, VERIFY_SHAPE, generator=generator)
        logits = _logits(model, ids)
        if not torch.isfinite(logits).all():
            # Not a moeprune bug: the pruned model itself (weights checked finite at load) overflows in this dtype.
            raise MoePruneError(
                "The pruned model's logits are NaN or infinite on random tokens (its activations overflow in "
                f"{str(_float_dtype(model)).removeprefix('torch.')}); nothing was written. Try --dtype float32."
            )
        # Random tokens need not reach every expert, so the weights are compared too.
        fingerprints = {name: fingerprint(p) for name, p in model.named_parameters()}
        return cls(ids, logits, fingerprints, _float_dtype(model))

    @torch.no_grad()
    def check(self, path: str | Path, placement: dict[str, Any], *, trust_remote_code: bool = False) -> float:
        reloaded = load_model(path, dtype=self.dtype, trust_remote_code=trust_remote_code, **placement)
        self._compare_weights(reloaded)
        actual = _logits(reloaded, self.ids)
        del reloaded
        expected = self.logits
        diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("inf")
        tolerance = _tolerance(self.dtype, expected)
        if not diff <= tolerance:  # also catches NaN
            raise MoePruneError(
                f"Verification failed: the reloaded checkpoint's logits differ from the pruned model's by "
                f"{diff:.3g} (> {tolerance:.3g}); nothing was written. This is a moeprune bug for this "
                "architecture: please report it (or pass verify=False / --no-verify at your own risk)."
            )
        log.info("Verified: reloaded logits match the in-memory pruned model (max |diff| %.3g, %s)", diff,
                 str(self.dtype).removeprefix("torch."))
        return diff

    def _compare_weights(self, reloaded: nn.Module) -> None:
        actual = {name: fingerprint(p) for name, p in reloaded.named_parameters()}
        wrong = sorted(set(self.fingerprints) ^ set(actual))
        wrong += [name for name in sorted(set(self.fingerprints) & set(actual))
                  if not _same(self.fingerprints[name], actual[name])]
        if wrong:
            raise MoePruneError(
                f"Verification failed: the reloaded checkpoint's weights differ from the pruned model's in "
                f"{len(wrong)} tensors ({', '.join(wrong[:3])}...); nothing was written. This is a moeprune bug "
                "for this architecture: please report it (or pass verify=False / --no-verify at your own risk)."
            )


def export_streamed(place: DiskLayers, mask: ExpertMask, out_dir: str | Path, options: ExportOptions | None = None, *,
                    progress: bool = True) -> Path:
    """``apply`` of a model streamed from disk: the checkpoint is written shard by shard (as ``--model-free``),
    then verified without ever holding the model: the source under ``mask`` (applied to each layer as it is read)
    and the written checkpoint each run layer-major on the verification tokens, and every layer's weights (after
    transformers' conversions, in the compute dtype) and the logits must agree as in the in-memory verification.
    ``options``: :class:`~moeprune.surgery.options.ExportOptions` (``dequantize`` refused); remote code is trusted
    as ``place`` trusts it."""
    options = options or ExportOptions()
    if options.dequantize:
        raise MoePruneError(STREAMED_DEQUANTIZE)
    trust_remote_code = place.trust_remote_code

    def check(folder: Path) -> None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, place.config.vocab_size, VERIFY_SHAPE, generator=generator)
        with masked_on_load(place, mask):
            expected, weights = _streamed_reference(place, ids)
        written = DiskLayers(folder, load_config(folder, trust_remote_code), place.dtype, place.device,
                             trust_remote_code)
        actual, reloaded = _streamed_reference(written, ids)
        wrong = sorted(set(weights) ^ set(reloaded)) + [n for n in sorted(set(weights) & set(reloaded))
                                                         if weights[n] != reloaded[n]]
        if wrong:
            raise MoePruneError(
                f"Verification failed: the written checkpoint's weights differ from the masked source's in "
                f"{len(wrong)} tensors ({', '.join(wrong[:3])}...); nothing was written. This is a moeprune bug "
                "for this architecture: please report it (or pass --no-verify at your own risk)."
            )
        diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("inf")
        tolerance = _tolerance(place.dtype, expected)
        if not diff <= tolerance:
            raise MoePruneError(
                f"Verification failed: the written checkpoint's logits differ from the masked source's by "
                f"{diff:.3g} (> {tolerance:.3g}); nothing was written. This is a moeprune bug for this "
                "architecture: please report it (or pass --no-verify at your own risk)."
            )
        log.info("Verified (streamed): the written checkpoint's weights and logits match the masked source "
                 "(max |diff| %.3g, %s)", diff, str(place.dtype).removeprefix("torch."))

    return prune_checkpoint_files(place.folder, mask, out_dir, options, progress=progress,
                                  trust_remote_code=trust_remote_code, check=check if options.verify else None)


def _streamed_reference(place: DiskLayers, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple]]:
    """Logits on ``ids`` and the fingerprint of every weight, each layer's taken while it is materialized."""
    weights: dict[str, tuple] = {}
    logits: list[torch.Tensor] = []
    inside = {id(p) for p in place.layers.parameters()}

    def layer_done(index: int, layer: nn.Module) -> None:
        weights.update({f"{place.prefix}.{index}.{n}": fingerprint(p) for n, p in layer.named_parameters()})

    def head(_batch: int, out: torch.Tensor) -> None:
        logits.append(out.float().cpu())
        weights.update({n: fingerprint(p) for n, p in place.model.named_parameters() if id(p) not in inside})

    run_layer_major(place, [{"input_ids": ids}], on_logits=head, on_layer_done=layer_done, progress=False,
                    desc="verify (streamed from disk)")
    return logits[0], weights


def fingerprint(tensor: torch.Tensor) -> tuple:
    """(shape, dtype, sha256 of the raw bytes) of a tensor on any device; no digest for meta tensors."""
    data = tensor.detach()
    if data.device.type == "meta":  # offloaded to disk by accelerate: nothing to hash here
        return tuple(data.shape), str(data.dtype), None
    digest = hashlib.sha256()
    for chunk in data.contiguous().reshape(-1).view(torch.uint8).split(FINGERPRINT_CHUNK):
        digest.update(chunk.cpu().numpy())  # zero-copy for CPU tensors
    return tuple(data.shape), str(data.dtype), digest.hexdigest()


def _same(expected: tuple, actual: tuple) -> bool:
    if expected[2] is None or actual[2] is None:
        return expected[:2] == actual[:2]
    return expected == actual


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tolerance(dtype: torch.dtype, expected: torch.Tensor) -> float:
    if dtype in (torch.float32, torch.float64):
        return VERIFY_ATOL
    return VERIFY_HALF_RTOL * max(1.0, expected.abs().max().item())


def _placement(model: nn.Module) -> dict[str, Any]:
    """load_model arguments that put a reload where ``model`` is (same devices, same kernels)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return {"device_map": dict(device_map)}
    device = model.get_input_embeddings().weight.device
    return {"device": "cpu"} if device.type == "cpu" else {"device_map": {"": str(device)}}


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write(model: nn.Module, tok: Any, mask: ExpertMask, info: CardInfo, source: str | Path,
           tmp: Path, steps: tqdm, tokenizer_from: str | Path | None = None,
           quantized: QuantFormat | None = None, dequantize: bool = False) -> None:
    _step(steps, "saving weights")
    source_dir = _local_dir(str(source))
    if quantized is not None:
        # The source's own quantized tensors, sliced by name (one writer with model-free apply).
        written = write_pruned_tensors(source_dir, mask, tmp, progress=False)
        (tmp / "config.json").write_text(json.dumps(pruned_config(read_config_json(source_dir), mask), indent=2,
                                                    sort_keys=True) + "\n")
        info.format, info.bytes_before, info.bytes_after = describe(quantized), written.bytes_before, \
            written.bytes_after
        if (source_dir / "generation_config.json").is_file():
            shutil.copy2(source_dir / "generation_config.json", tmp / "generation_config.json")
    else:
        # Default save_pretrained: hub-style per-expert keys, which every transformers version reloads.
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        _write_config(tmp, source, mask)
        info.format = f"{str(_float_dtype(model)).removeprefix('torch.')} (unquantized)"
        info.bytes_before = checkpoint_bytes(source_dir) if source_dir is not None else None
        info.bytes_after = checkpoint_bytes(tmp)
        if dequantize:
            info.flags = ("--dequantize",)
    if tok is not None:  # the source's files byte for byte where it has them (see surgery/tokenizer_files.py)
        write_tokenizer(tok, tokenizer_from, tmp, TOKENIZER_FILES)
    if source_dir is not None:
        for code in source_dir.glob("*.py"):  # remote modeling code (trust_remote_code models)
            if not (tmp / code.name).exists():
                shutil.copy2(code, tmp / code.name)
    # What was written, for `moeprune inspect` of the export (bytes before and after, the weights' format).
    export = {"format": info.format, "bytes_before": info.bytes_before, "bytes_after": info.bytes_after}
    replace(mask, extra={**mask.extra, "export": export}).save(tmp / "mask.json")
    (tmp / "README.md").write_text(render_model_card(info))


def _write_config(tmp: Path, source: str | Path, mask: ExpertMask) -> None:
    """Replace transformers' config.json by the source's own with the expert count edited (portable to
    transformers 4.x readers and other tools; see surgery/config_json.py)."""
    saved = read_config_json(tmp)
    # The weights save_pretrained wrote are not quantized: a source's quantization_config would be a false claim.
    config = without_quantization(pruned_config_json(source_config_json(source), saved, mask.num_experts,
                                                     mask.kept_per_layer))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model(model_or_path: nn.Module | str | Path, dtype: str | torch.dtype, device: str | None,
           trust_remote_code: bool, dequantize: bool = False) -> tuple[nn.Module, bool]:
    """The model to prune, and whether we loaded it (then it may be pruned in place, without restoring)."""
    if isinstance(model_or_path, (str, Path)):
        if dtype == "auto":  # the export keeps the checkpoint's own dtype, even on a CPU
            dtype = checkpoint_dtype(load_config(model_or_path, trust_remote_code))
        loaded = load_model(model_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                            dequantize=dequantize)
        return loaded, True
    return model_or_path.eval(), False


def _quantized_source(model_or_path: nn.Module | str | Path, source_path: str | None, dequantize: bool,
                      delta: dict | None = None) -> QuantFormat | None:
    """The source's quantized layout when the export writes it back (None: save_pretrained writes the model as
    loaded), checked before anything loads: a layout moeprune cannot write back, a source that is not a local
    folder, or a recovery (its float tensors have no quantized form) are refused with the fix."""
    name = source_path if source_path is not None else model_name(model_or_path)
    raw = source_config_json(name)
    if dequantize or raw is None or not raw.get("quantization_config"):
        return None
    folder = _local_dir(str(name))
    if folder is None:
        raise MoePruneError(
            f"{name} is a quantized checkpoint; apply writes it back in its own format from its local files. "
            "Download it (e.g. `hf download ID --local-dir DIR`) and pass DIR, or pass --dequantize."
        )
    fmt = check_quantized_source(folder, raw)
    if delta:
        raise MoePruneError(
            f"{name} is quantized ({describe(fmt)}) and --recover changes float tensors that the source's format "
            "cannot hold as they are; pass --dequantize with --recover (then quantize the result again), or apply "
            "without --recover."
        )
    return fmt


@contextmanager
def _pruned(model: nn.Module, mask: ExpertMask, owned: bool, delta: dict[str, torch.Tensor] | None = None):
    if owned:
        yield apply_delta(apply_mask(model, mask), delta or {})
    else:
        with masked(model, mask):  # restores the original Parameters, the recovered ones included
            yield apply_delta(model, delta or {})


def _tokenizer(tokenizer: Any, source: str, source_dir: Path | None, trust_remote_code: bool) -> Any:
    if tokenizer is None:
        # transformers 5 builds an empty tokenizer for a directory without tokenizer files: look first.
        if source_dir is not None and not any((source_dir / f).exists() for f in TOKENIZER_FILES):
            log.warning("No tokenizer in %s: the output has none; pass --tokenizer PATH.", source_dir)
            return None
        try:
            return load_tokenizer(source_dir or source, trust_remote_code=trust_remote_code)
        except MoePruneError:
            log.warning("No tokenizer found for %s: the output has none; pass --tokenizer PATH.", source)
            return None
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return tokenizer


def _tokenizer_source(tokenizer: Any, source: str | Path) -> str | Path | None:
    """Where the export's tokenizer files are copied from: None for a tokenizer object (saved instead)."""
    if tokenizer is None:
        return source
    return resolve_model_path(tokenizer) if isinstance(tokenizer, (str, Path)) else None


def _local_dir(source: str) -> Path | None:
    path = Path(resolve_model_path(source))
    return path if path.is_dir() else None


def _step(steps: tqdm, what: str) -> None:
    steps.set_description(f"apply: {what}")
    if steps.n < steps.total:
        steps.update(1)
    log.info("apply: %s", what)
