"""The pipeline's verbs as Python functions: profile -> plan -> apply (prune does all three), evaluate.

Each takes what the previous one wrote (a profile directory, a mask file) or the object itself, so a
notebook and the CLI run the same code::

    from moeprune import api
    prof = api.profile("Qwen/Qwen1.5-MoE-A2.7B", ["wikitext2", "c4"], "prof/")
    mask = api.plan(prof, "tb-coverage", 0.5, model="Qwen/Qwen1.5-MoE-A2.7B")
    api.apply("Qwen/Qwen1.5-MoE-A2.7B", mask, "qwen-50/")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moeprune.data.corpora import CorpusSpec, parse_corpus
from moeprune.errors import MoePruneError
from moeprune.loading import load_model, load_tokenizer, model_name, resolve_model_path  # noqa: F401 (re-export)
from moeprune.planning import METHODS
from moeprune.planning import plan as plan_from_profile
from moeprune.planning.mask import ExpertMask, kept_count
from moeprune.profiling.runner import ProfileSettings, profile_model
from moeprune.profiling.stats import Profile

log = logging.getLogger("moeprune")

DEFAULT_CORPORA = ("wikitext2", "c4")
# Calibration defaults: the paper's (512 x 1024 on WikiText2 and C4), and a fast one for the bundled testbed.
# Reconstruction (expert-sparsity): NAEE's own settings in the paper preset (128 x 2048 of C4, the loss
# summed over batches of 8 windows); the bundled one keeps the cheaper global norm on fewer tokens.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "corpora": DEFAULT_CORPORA,
        "samples": 512,
        "seq_len": 1024,
        "recon_samples": 128,
        "recon_seq_len": 2048,
        "recon_loss": "per-batch",
        "ppl_seq_len": 2048,
    },
    "bundled": {
        "corpora": ("wiki", "web"),
        "samples": 128,
        "seq_len": 256,
        "recon_samples": 32,
        "recon_seq_len": 256,
        "recon_loss": "global",
        "ppl_seq_len": 256,
    },  # the testbed model was trained on 256-token windows
}


def is_bundled(model: Any) -> bool:
    """Whether ``model`` names the bundled testbed: ``bundled`` or its directory (a loaded model never does)."""
    from moeprune.bundled import bundled_model_path

    if not isinstance(model, str | Path) or not str(model):
        return False
    return str(model) == "bundled" or Path(model).resolve() == bundled_model_path().resolve()


def preset_for(model: Any) -> dict[str, Any]:
    """The bundled testbed model gets the fast preset; every other model the paper's settings."""
    return PRESETS["bundled" if is_bundled(model) else "paper"]


# The reconstruction candidate is fitted on C4 in the paper; without C4 we use the last profiled corpus.
RECONSTRUCTION_CORPUS = "c4"
NEEDS_MODEL = {"expert-sparsity"}
# The paper's candidate mask: layerwise reconstruction (ExpertSparsity) on C4. planning.plan alone, which
# never sees the model, falls back to tb_coverage.DEFAULT_CANDIDATE (reap).
TB_COVERAGE_CANDIDATE = "expert-sparsity"


def profile(
    model: Any,
    corpora: Sequence[str | CorpusSpec] = DEFAULT_CORPORA,
    out: str | Path = "profile",
    *,
    samples: int = 512,
    seq_len: int = 1024,
    batch_size: int = 4,
    seed: int = 0,
    checkpoint_every: int = 16,
    sequential: bool | None = None,
    dtype: str = "auto",
    device: str | None = None,
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Profile:
    """Profile ``model`` (a loaded model, a local path or a hub id) on each corpus into ``out``.

    ``sequential=True`` keeps the weights on the CPU and runs one decoder layer at a time on ``device``;
    ``None`` (default) does so only when a model given by name does not fit in the free GPU memory.
    """
    sequential_device = None
    if sequential or (sequential is None and not isinstance(model, torch.nn.Module) and not _fits(model, device)):
        sequential_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = "cpu"
    model = _model(model, dtype, device, trust_remote_code)
    tokenizer = _tokenizer(tokenizer, model, trust_remote_code)
    specs = [c if isinstance(c, CorpusSpec) else parse_corpus(c) for c in corpora]
    settings = ProfileSettings(
        num_samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=checkpoint_every,
        sequential_device=sequential_device,
    )
    return profile_model(model, tokenizer, specs, out, settings, progress=progress)


def plan(
    profile: Profile | str | Path,
    method: str = "tb-coverage",
    retain: float = 0.5,
    *,
    seed: int = 0,
    protect_budget: int | None = None,
    candidate: str | None = None,
    model: Any = None,
    reconstruction: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExpertMask:
    """One mask; see :func:`plan_many` for several retain ratios sharing one reconstruction."""
    return plan_many(
        profile,
        method,
        [retain],
        seed=seed,
        protect_budget=protect_budget,
        candidate=candidate,
        model=model,
        reconstruction=reconstruction,
        progress=progress,
    )[0]


def plan_many(
    profile: Profile | str | Path,
    method: str,
    retains: Sequence[float],
    *,
    seed: int = 0,
    protect_budget: int | None = None,
    candidate: str | None = None,
    model: Any = None,
    reconstruction: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[ExpertMask]:
    """Masks for every retain ratio. Methods that need the model (expert-sparsity, and tb-coverage with
    that candidate) load it from ``model`` or from the path recorded in the profile."""
    workdir = Path(profile) if isinstance(profile, (str, Path)) else None
    prof = Profile.load(profile) if workdir is not None else profile
    if method not in METHODS:
        plan_from_profile(prof, method, 1.0)  # raises the registry's "unknown method" error
    candidate = _candidate(method, candidate)
    kept = [kept_count(r, prof.num_experts, prof.meta.get("top_k")) for r in retains]
    selections = None
    if method in NEEDS_MODEL or candidate in NEEDS_MODEL:
        selections = _reconstruct(prof, kept, model, workdir, reconstruction or {}, progress)
    masks = []
    for retain, k in zip(retains, kept, strict=True):
        chosen = None if selections is None else {layer: kept for layer, (kept, _) in selections[k].items()}
        kwargs: dict[str, Any] = {"seed": seed}
        if method == "tb-coverage":
            kwargs.update(protect_budget=protect_budget, candidate=candidate, candidate_masks=chosen)
        elif method in NEEDS_MODEL:
            kwargs["precomputed"] = chosen
        mask = plan_from_profile(prof, method, retain, **kwargs)
        if selections is not None:
            # For tb-coverage the loss is its candidate's, not the final mask's: say so in the name.
            prefix = "" if method in NEEDS_MODEL else "candidate_"
            for layer, result in selections[k].items():
                mask.layers[layer].extra[prefix + "reconstruction_loss"] = float(result.loss)
                mask.layers[layer].extra[prefix + "search"] = result.search
        masks.append(mask)
    return masks


def mask_filename(mask: ExpertMask) -> str:
    seed = f"-seed{mask.seed}" if mask.seed is not None else ""
    return f"{mask.method}-{mask.retain:.2f}{seed}.json"


def apply(
    model: Any,
    mask: ExpertMask | str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    tokenizer: Any = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Write the pruned checkpoint to ``out`` (atomically, verified against the in-memory masked model)."""
    from moeprune.surgery import export_pruned

    mask = mask if isinstance(mask, ExpertMask) else ExpertMask.load(mask)
    if isinstance(model, str | Path):
        model = resolve_model_path(model)
    return export_pruned(
        model,
        mask,
        out,
        tokenizer=tokenizer,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        verify=verify,
        progress=progress,
    )


def prune(
    model: Any,
    retain: float,
    out: str | Path,
    *,
    method: str = "tb-coverage",
    corpora: Sequence[str] = DEFAULT_CORPORA,
    workdir: str | Path | None = None,
    samples: int = 512,
    seq_len: int = 1024,
    batch_size: int = 4,
    seed: int = 0,
    protect_budget: int | None = None,
    candidate: str | None = None,
    reconstruction: dict[str, Any] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    ppl_datasets: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Profile, plan and apply in one call; the profile is kept in ``workdir`` (default ``OUT.work``).

    With ``ppl_datasets`` the dense model and the written checkpoint are scored on those held-out sets
    and a table is printed (and saved as ``workdir/perplexity.json``)."""
    workdir = Path(workdir) if workdir else Path(str(out).rstrip("/") + ".work")
    loaded = _model(model, dtype, device, trust_remote_code)
    tokenizer = _tokenizer(None, loaded, trust_remote_code)
    profile(
        loaded,
        corpora,
        workdir,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
        progress=progress,
    )
    mask = plan(
        workdir,
        method,
        retain,
        seed=seed,
        protect_budget=protect_budget,
        candidate=candidate,
        model=loaded,
        reconstruction=reconstruction,
        progress=progress,
    )
    mask.save(workdir / mask_filename(mask))
    ppl_seq_len = preset_for(model)["ppl_seq_len"]
    dense_ppl = _perplexities(loaded, tokenizer, ppl_datasets, ppl_seq_len, progress) if ppl_datasets else None
    # Exported from the checkpoint itself when we have one, so the output keeps its dtype (on a CPU the
    # loaded copy is float32, see loading.load_model).
    source = loaded if isinstance(model, torch.nn.Module) else model
    written = apply(
        source,
        mask,
        out,
        dtype=dtype,
        tokenizer=tokenizer,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )
    if dense_ppl is not None:
        pruned = load_model(written, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        pruned_ppl = _perplexities(pruned, tokenizer, ppl_datasets, ppl_seq_len, progress)
        _report_perplexity(dense_ppl, pruned_ppl, mask, workdir)
    return written


def _perplexities(model: Any, tokenizer: Any, datasets: Sequence[str], seq_len: int, progress: bool) -> dict[str, dict]:
    from moeprune.evaluation.perplexity import perplexity

    seq_len = min(seq_len, int(getattr(model.config, "max_position_embeddings", seq_len) or seq_len))
    return {name: perplexity(model, tokenizer, name, seq_len=seq_len, progress=progress) for name in datasets}


def _report_perplexity(dense: dict[str, dict], pruned: dict[str, dict], mask: ExpertMask, workdir: Path) -> None:
    from moeprune.io import write_json_atomic

    print(f"\nheld-out perplexity, {mask.method} keeping {mask.kept_per_layer} of {mask.num_experts} experts per layer")
    print(f"{'dataset':<12}{'dense':>10}{'pruned':>10}{'ratio':>8}")
    for name in dense:
        a, b = dense[name]["ppl"], pruned[name]["ppl"]
        print(f"{name:<12}{a:>10.2f}{b:>10.2f}{b / a:>8.2f}")
    write_json_atomic(workdir / "perplexity.json", {"dense": dense, "pruned": pruned, "mask": mask.to_json()})


def _fits(model: Any, device: str | None) -> bool:
    """Whether the weights fit in 90% of the free memory of the target GPU (always true without one)."""
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        return True
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moeprune.loading import load_config

    config = load_config(model)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    dtype_bytes = torch.tensor([], dtype=getattr(config, "dtype", None) or torch.bfloat16).element_size()
    needed = sum(p.numel() for p in skeleton.parameters()) * dtype_bytes
    free, _ = torch.cuda.mem_get_info(torch.device(device or "cuda"))
    return needed < 0.9 * free


def _candidate(method: str, candidate: str | None) -> str | None:
    if method != "tb-coverage":
        return candidate
    return candidate or TB_COVERAGE_CANDIDATE


def _reconstruct(
    prof: Profile, kept: list[int], model: Any, workdir: Path | None, options: dict[str, Any], progress: bool
) -> dict[int, dict[int, tuple[list[int], float]]]:
    """ExpertSparsity selections for each K, from activations captured once into the work directory.

    ``options``: corpus, samples, seq_len, loss (``per-batch`` | ``global``), tokens (a budget: at most
    that many tokens, in whole windows), seed, workdir, dtype, device, trust_remote_code; unset ones
    come from the model's preset."""
    from moeprune.data.sampling import calibration_windows
    from moeprune.reconstruction import reconstruction_selection

    if model is None:
        model = prof.meta.get("model")
        if not model:
            raise MoePruneError("expert-sparsity needs the model: pass --model (the profile records none).")
    preset = preset_for(model)
    loaded = _model(model, options.get("dtype", "auto"), options.get("device"), options.get("trust_remote_code", False))
    _check_same_model(prof, loaded)
    spec = _reconstruction_corpus(prof, options.get("corpus"))
    seq_len = options.get("seq_len") or preset["recon_seq_len"]
    samples = options.get("samples") or preset["recon_samples"]
    if options.get("tokens"):  # sample no more windows than the budget keeps
        samples = min(samples, max(1, options["tokens"] // seq_len))
    windows = calibration_windows(
        spec, _tokenizer(None, loaded, options.get("trust_remote_code", False)), samples, seq_len,
        options.get("seed", 0),
    )
    workdir = Path(options.get("workdir") or workdir or "moeprune-work")
    key = f"{spec.name}-{windows.shape[0]}x{windows.shape[1]}-seed{options.get('seed', 0)}"
    return reconstruction_selection(
        loaded, windows, kept, workdir, key, corpus=spec.name, progress=progress,
        loss=options.get("loss") or preset["recon_loss"], token_budget=options.get("tokens"),
    )


def _check_same_model(prof: Profile, model: Any) -> None:
    """A profile is only meaningful for the model it was made from: refuse any other."""
    from moeprune.loading import config_hash

    recorded, actual = prof.meta.get("config_hash"), config_hash(model.config)
    if recorded and recorded != actual:
        raise MoePruneError(
            f"The profile was made from {prof.meta.get('model')!r} (config hash {recorded}), but the model given "
            f"for planning, {model_name(model)!r}, has config hash {actual}. Profile this model first, or pass "
            "the profiled model with --model."
        )


def _reconstruction_corpus(prof: Profile, name: str | None) -> CorpusSpec:
    if name is not None:
        return parse_corpus(name)
    chosen = RECONSTRUCTION_CORPUS if RECONSTRUCTION_CORPUS in prof.names else prof.names[-1]
    recorded = prof.corpora[chosen].meta.get("corpus")
    return CorpusSpec(**recorded) if recorded else parse_corpus(chosen)


def _model(model: Any, dtype: str, device: str | None, trust_remote_code: bool):
    if isinstance(model, torch.nn.Module):
        return model
    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _tokenizer(tokenizer: Any, model: Any, trust_remote_code: bool):
    if tokenizer is None or isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer or model_name(model), trust_remote_code)
    return tokenizer
