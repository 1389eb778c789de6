"""Write a pruned Hugging Face checkpoint: weights, config, tokenizer, remote code, mask.json, model card.

Everything is written into a temporary sibling directory and renamed into place only after the reloaded
checkpoint has been verified against the in-memory pruned model, so a failure never leaves half an output.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from moeprune.errors import MoePruneError
from moeprune.io import atomic_directory, check_output_dir
from moeprune.loading import (
    checkpoint_dtype,
    load_config,
    load_model,
    load_tokenizer,
    model_name,
    resolve_model_path,
)
from moeprune.planning.mask import ExpertMask
from moeprune.surgery.model_card import CardInfo, render_model_card
from moeprune.surgery.slicing import apply_mask, count_parameters, masked

log = logging.getLogger(__name__)

VERIFY_ATOL = 1e-5
VERIFY_SHAPE = (2, 32)  # random sequences x tokens compared at verification
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def export_pruned(
    model_or_path: nn.Module | str | Path,
    mask: ExpertMask | str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Prune a model to ``mask`` and save it as a checkpoint in ``out_dir``; returns ``out_dir``.

    A model object is pruned only for the duration of the export and restored afterwards; a path or hub
    id is loaded with ``dtype``. ``tokenizer`` is a path or a tokenizer object (default: the model's own
    directory, skipped with a warning when it has none). With ``verify`` the written checkpoint is reloaded
    in fp32 and its logits compared with the in-memory pruned model (max |diff| <= 1e-5).
    """
    out = Path(out_dir)
    # Fail before the (possibly long) model load: an existing --out, or one overlapping the source.
    source_path = resolve_model_path(model_or_path) if isinstance(model_or_path, str | Path) else None
    check_output_dir(out, sources=[source_path], overwrite=overwrite)
    if not isinstance(mask, ExpertMask):
        mask = ExpertMask.load(mask)
    steps = tqdm(total=4 if verify else 3, desc="apply", disable=not progress, unit="step")
    try:
        _step(steps, "loading model")
        model, owned = _model(model_or_path, dtype, trust_remote_code)
        source = model_name(model_or_path if isinstance(model_or_path, (str, Path)) else model)
        source_dir = _local_dir(source)
        # Whoever hands us a loaded remote-code model has already trusted that code.
        trust = trust_remote_code or (not owned and bool(getattr(model.config, "auto_map", None)))
        tok = _tokenizer(tokenizer, source, source_dir, trust)
        params_before = count_parameters(model)
        with _pruned(model, mask, owned):
            info = CardInfo(source, str(out), mask, params_before, count_parameters(model))
            with atomic_directory(out, overwrite=overwrite) as tmp:
                _write(model, tok, mask, info, source_dir, tmp, steps)
                if verify:
                    _step(steps, "verifying reloaded checkpoint")
                    verify_checkpoint(model, tmp, trust_remote_code=trust)
        _step(steps, "done")
    finally:
        steps.close()
    log.info("Wrote pruned checkpoint to %s (%s -> %s parameters)", out, f"{info.params_before:,}",
             f"{info.params_after:,}")
    return out


@torch.no_grad()
def verify_checkpoint(model: nn.Module, path: str | Path, *, trust_remote_code: bool = False,
                      atol: float = VERIFY_ATOL) -> float:
    """Reload ``path`` in fp32 and compare its weights and logits with ``model``'s (upcast to fp32 meanwhile).

    Weights must be equal; returns the logits' max |diff| and raises MoePruneError above ``atol``.
    """
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, VERIFY_SHAPE, generator=generator).to(device)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if getattr(model, "hf_device_map", None):
        kwargs["device_map"] = model.hf_device_map  # same placement, same kernels
    reloaded = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    if "device_map" not in kwargs:
        reloaded.to(device)
    with _fp32(model):
        # Random tokens need not reach every expert, so the weights are compared too.
        _compare_weights(model, reloaded)
        expected = model(input_ids=ids).logits.float()
    actual = reloaded(input_ids=ids).logits.float()
    del reloaded
    diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("inf")
    if not diff <= atol:  # also catches NaN
        raise MoePruneError(
            f"Verification failed: the reloaded checkpoint's logits differ from the pruned model's by "
            f"{diff:.3g} (> {atol:g}); nothing was written. This is a moeprune bug for this architecture: "
            "please report it (or pass verify=False / --no-verify at your own risk)."
        )
    log.info("Verified: reloaded logits match the in-memory pruned model (max |diff| %.3g)", diff)
    return diff


def _compare_weights(model: nn.Module, reloaded: nn.Module) -> None:
    expected, actual = dict(model.named_parameters()), dict(reloaded.named_parameters())
    wrong = sorted(set(expected) ^ set(actual))
    wrong += [name for name in sorted(set(expected) & set(actual))
              if not torch.equal(expected[name].to(actual[name].device), actual[name])]
    if wrong:
        raise MoePruneError(
            f"Verification failed: the reloaded checkpoint's weights differ from the pruned model's in "
            f"{len(wrong)} tensors ({', '.join(wrong[:3])}...); nothing was written. This is a moeprune bug "
            "for this architecture: please report it (or pass verify=False / --no-verify at your own risk)."
        )


def _write(model: nn.Module, tok: Any, mask: ExpertMask, info: CardInfo, source_dir: Path | None,
           tmp: Path, steps: tqdm) -> None:
    _step(steps, "saving weights")
    # Default save_pretrained: hub-style per-expert keys, which every transformers version reloads.
    model.save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    if source_dir is not None:
        for code in source_dir.glob("*.py"):  # remote modeling code (trust_remote_code models)
            if not (tmp / code.name).exists():
                shutil.copy2(code, tmp / code.name)
    mask.save(tmp / "mask.json")
    (tmp / "README.md").write_text(render_model_card(info))


def _model(model_or_path: nn.Module | str | Path, dtype: str | torch.dtype,
           trust_remote_code: bool) -> tuple[nn.Module, bool]:
    """The model to prune, and whether we loaded it (then it may be pruned in place, without restoring)."""
    if isinstance(model_or_path, (str, Path)):
        if dtype == "auto":  # the export keeps the checkpoint's own dtype, even on a CPU
            dtype = checkpoint_dtype(load_config(model_or_path, trust_remote_code))
        return load_model(model_or_path, dtype=dtype, trust_remote_code=trust_remote_code), True
    return model_or_path.eval(), False


@contextmanager
def _pruned(model: nn.Module, mask: ExpertMask, owned: bool):
    if owned:
        yield apply_mask(model, mask)
    else:
        with masked(model, mask):
            yield model


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


def _local_dir(source: str) -> Path | None:
    path = Path(resolve_model_path(source))
    return path if path.is_dir() else None


@contextmanager
def _fp32(model: nn.Module):
    """Upcast floating tensors to fp32 in place for the block, then restore each one's dtype exactly."""
    changed: list[tuple[dict, str, torch.dtype]] = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                    changed.append((table, name, tensor.dtype))
                    _set_data(table, name, tensor.float())
    try:
        yield model
    finally:
        for table, name, dtype in changed:
            _set_data(table, name, table[name].to(dtype))


def _set_data(table: dict, name: str, value: torch.Tensor) -> None:
    # Parameters keep their identity (masked() and optimisers hold references); buffers are replaced.
    if isinstance(table[name], nn.Parameter):
        table[name].data = value.data if isinstance(value, nn.Parameter) else value
    else:
        table[name] = value


def _step(steps: tqdm, what: str) -> None:
    steps.set_description(f"apply: {what}")
    if steps.n < steps.total:
        steps.update(1)
    log.info("apply: %s", what)
