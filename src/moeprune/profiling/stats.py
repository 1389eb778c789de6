"""Per-expert routing statistics as float64 sums, so they merge exactly.

A corpus profile holds, for every MoE layer (row) and routed expert (column):

- ``count``    tokens routed to the expert
- ``gate_sum`` sum of g_e(x), the router weight the model applies (after any top-k renormalisation)
- ``reap_sum`` sum of g_e(x) * ||f_e(h_x)||_2, f_e the expert's unweighted output
- ``norm_sum`` sum of ||f_e(h_x)||_2

plus ``layers``, the decoder-layer index of each row. Because every field is a sum, profiles of
disjoint token sets add up to the profile of their union: resuming, data-parallel shards and
adding a corpus later are all :meth:`ExpertStats.merge`.

On disk a profile is a directory with ``<corpus>.safetensors`` (the tensors) and
``<corpus>.json`` (metadata: model, config hash, corpus spec, samples, seq len, seed, tokens,
library versions) for each corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moeprune.data.corpora import check_corpus_name, corpus_spec_from_record
from moeprune.errors import MoePruneError
from moeprune.io import read_json, save_safetensors_atomic, terminal_safe, write_json_atomic

SUM_FIELDS = ("count", "gate_sum", "reap_sum", "norm_sum")
PROFILE_FORMAT = "moeprune.profile/1"


@dataclass
class ExpertStats:
    """Sums for one corpus: each field is a float64 tensor ``[num_moe_layers, num_experts]``."""

    layers: torch.Tensor  # int64 [L], decoder-layer index of each row
    count: torch.Tensor
    gate_sum: torch.Tensor
    reap_sum: torch.Tensor
    norm_sum: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def zeros(cls, layers: list[int], num_experts: int, meta: dict[str, Any] | None = None) -> ExpertStats:
        shape = (len(layers), num_experts)
        sums = {name: torch.zeros(shape, dtype=torch.float64) for name in SUM_FIELDS}
        return cls(layers=torch.tensor(layers, dtype=torch.int64), meta=dict(meta or {}), **sums)

    @property
    def num_experts(self) -> int:
        return int(self.count.shape[1])

    @property
    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.layers]

    @property
    def tokens(self) -> float:
        """Tokens seen per layer (each token is routed to top-k experts, so count sums to k * tokens)."""
        return float(self.meta.get("tokens", 0))

    def reap_score(self) -> torch.Tensor:
        """REAP utility per expert: mean over routed tokens of g_e * ||f_e||; 0 for never-routed experts."""
        return _safe_div(self.reap_sum, self.count)

    def frequency(self) -> torch.Tensor:
        """Fraction of this corpus's routing decisions that went to each expert (rows sum to 1)."""
        return _safe_div(self.count, self.count.sum(dim=1, keepdim=True))

    def merge(self, other: ExpertStats) -> ExpertStats:
        """Sum two profiles of disjoint token sets of the same model."""
        if not torch.equal(self.layers, other.layers) or self.count.shape != other.count.shape:
            raise MoePruneError(
                "Cannot merge profiles of different shapes "
                f"(layers {self.layer_ids} x {self.num_experts} vs {other.layer_ids} x {other.num_experts}); "
                "were they made from the same model?"
            )
        sums = {name: getattr(self, name) + getattr(other, name) for name in SUM_FIELDS}
        meta = dict(self.meta)
        for key in ("tokens", "samples"):
            if key in self.meta or key in other.meta:
                meta[key] = self.meta.get(key, 0) + other.meta.get(key, 0)
        return ExpertStats(layers=self.layers.clone(), meta=meta, **sums)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name).contiguous() for name in SUM_FIELDS}
        out["layers"] = self.layers.contiguous()
        return out

    def save(self, path: str | Path) -> None:
        """Write ``path`` (.safetensors) and its ``.json`` metadata, each atomically."""
        path = Path(path)
        # Metadata first: a .safetensors without its .json is treated as unfinished.
        save_safetensors_atomic(
            path, self.tensors(), {"format": PROFILE_FORMAT},
            before_rename=lambda: write_json_atomic(path.with_suffix(".json"), {"format": PROFILE_FORMAT, **self.meta}),
        )

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        path = Path(path)
        if not path.exists():
            raise MoePruneError(f"Profile file {path} not found.")
        redo = "delete it and re-run `moeprune profile` (finished corpora are kept)"
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise MoePruneError(f"Profile file {path} is truncated or corrupt ({err}); {redo}.") from err
        missing = [name for name in (*SUM_FIELDS, "layers") if name not in tensors]
        if missing:
            raise MoePruneError(f"{path} is not a moeprune profile: missing tensors {missing}; {redo}.")
        meta = read_meta(path.with_suffix(".json"))
        meta.pop("format", None)
        stats = cls(
            layers=tensors["layers"].to(torch.int64),
            meta=meta,
            **{name: tensors[name].to(torch.float64) for name in SUM_FIELDS},
        )
        problem = stats.problem()
        if problem:
            raise MoePruneError(f"Profile file {path} is invalid: {problem}; {redo}.")
        return stats

    def problem(self) -> str | None:
        """Why these sums cannot be a profile (NaN/inf, negative, fractional counts, wrong shapes), or None."""
        shape = (len(self.layers), self.count.shape[-1] if self.count.dim() == 2 else -1)
        for name in SUM_FIELDS:
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                return f"{name} has shape {list(tensor.shape)}, expected {list(shape)}"
            if not torch.isfinite(tensor).all():
                return f"{name} holds NaN or infinite values"
            if (tensor < 0).any():
                return f"{name} holds negative values"
        if not torch.equal(self.count, self.count.round()):
            return "count holds fractional token counts"
        unrouted = self.count == 0
        for name in SUM_FIELDS[1:]:
            if (getattr(self, name)[unrouted] != 0).any():
                return f"{name} is non-zero for an expert that count says no token reached"
        return self._count_problem()

    def _count_problem(self) -> str | None:
        """A finished profile routes every token to top-k experts in every layer: each row of count sums to
        top_k x tokens (checkpoints cover part of the tokens, so only their rows' equality is checked)."""
        rows = self.count.sum(dim=1)
        if len(rows) and not torch.equal(rows, rows[:1].expand_as(rows)):
            return f"count sums to different token totals in different layers ({sorted(set(rows.tolist()))})"
        top_k, tokens = self.meta.get("top_k"), self.meta.get("tokens")
        if "windows_done" in self.meta:  # a checkpoint: the windows it says it covers, each of seq_len tokens
            done, seq_len = self.meta.get("windows_done"), self.meta.get("seq_len")
            if not _is_int(done) or done < 0:
                return f"windows_done is {done!r}, not a count of windows"
            tokens = done * seq_len if _is_int(seq_len) else None
        if not _is_int(top_k) or not _is_int(tokens) or not len(rows):
            return None
        if int(rows[0]) != top_k * tokens:
            return (f"count sums to {int(rows[0])} routings per layer, but {tokens} tokens routed to top-{top_k} "
                    f"experts make {top_k * tokens}")
        return None


@dataclass
class Profile:
    """Statistics of one model on several corpora, keyed by corpus name (in profiling order)."""

    corpora: dict[str, ExpertStats]

    def __post_init__(self) -> None:
        if not self.corpora:
            raise MoePruneError("A profile needs at least one corpus.")
        first = next(iter(self.corpora.values()))
        for name, stats in self.corpora.items():
            if not torch.equal(stats.layers, first.layers) or stats.count.shape != first.count.shape:
                raise MoePruneError(f"Corpus {name!r} was profiled on a model of a different shape.")
        for key, what in (("config_hash", "config hashes"), ("weights_sha256", "weights fingerprints")):
            values = {name: s.meta[key] for name, s in self.corpora.items() if s.meta.get(key)}
            if len(set(values.values())) > 1:
                raise MoePruneError(
                    f"The profile mixes corpora of different models ({what} {values}); a profile folder must hold "
                    "one model's corpora. Move the other model's files to their own folder."
                )

    @property
    def names(self) -> list[str]:
        return list(self.corpora)

    @property
    def layer_ids(self) -> list[int]:
        return next(iter(self.corpora.values())).layer_ids

    @property
    def num_experts(self) -> int:
        return next(iter(self.corpora.values())).num_experts

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata of the first corpus (model, config hash, top-k, ...; shared by all corpora)."""
        return next(iter(self.corpora.values())).meta

    def pooled(self) -> ExpertStats:
        """All corpora summed, as if they were one corpus."""
        stats = list(self.corpora.values())
        total = stats[0]
        for other in stats[1:]:
            total = total.merge(other)
        return total

    def fingerprint(self) -> str:
        """SHA-256 of what planning reads: every corpus's name and sums, and the model's config hash and weights
        fingerprint. A mask records it (``extra["profile_sha256"]``): a mask planned from other sums is stale."""
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(self.corpora):
            stats = self.corpora[name]
            digest.update(f"{name}\0{stats.meta.get('config_hash')}\0{stats.meta.get('weights_sha256')}\0".encode())
            for tensor_name, tensor in sorted(stats.tensors().items()):
                digest.update(tensor_name.encode() + tensor.cpu().numpy().tobytes())
        return digest.hexdigest()

    def reap_scores(self) -> torch.Tensor:
        """Per-corpus REAP scores stacked: ``[num_corpora, num_moe_layers, num_experts]``."""
        return torch.stack([s.reap_score() for s in self.corpora.values()])

    def save(self, directory: str | Path) -> None:
        for name, stats in self.corpora.items():
            stats.save(Path(directory) / f"{name}.safetensors")

    @classmethod
    def load(cls, directory: str | Path, corpora: list[str] | None = None) -> Profile:
        """Load every finished corpus in ``directory`` (or just ``corpora``, in that order)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise MoePruneError(f"Profile directory {directory} not found; run `moeprune profile` first.")
        if corpora is None:
            done = finished_corpora(directory)
            corpora = sorted(done, key=lambda n: done[n])
        if not corpora:
            raise MoePruneError(f"{directory} holds no finished corpus profile (<corpus>.safetensors).")
        return cls({name: ExpertStats.load(directory / f"{name}.safetensors") for name in corpora})


def finished_corpora(directory: str | Path) -> dict[str, float]:
    """Corpus names with a complete profile in ``directory``, mapped to their finishing time."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    done = {}
    for path in directory.glob("*.safetensors"):
        if path.name.startswith(".") or path.stem.endswith(".partial"):
            continue
        try:  # a corpus name is a file name moeprune writes (one rule, applied when the folder is read)
            check_corpus_name(path.stem)
        except MoePruneError:
            raise MoePruneError(
                f"{directory} holds {terminal_safe(path.name)!r}, which is not a corpus profile moeprune writes (its "
                "name is not a corpus name); move it out of the profile folder."
            ) from None
        if path.with_suffix(".json").exists():
            meta = read_meta(path.with_suffix(".json"))
            done[path.stem] = float(meta.get("finished_at", path.stat().st_mtime))
    return done


def check_one_model(directory: str | Path, config_hash: str, weights_sha256: str | None = None) -> None:
    """Refuse to add a model's corpora to a folder holding another model's (planning would mix them, and a
    corpus of the same name would replace the other model's profile): another config hash, or the same config
    with other weights (another checkpoint of one architecture, or this one's weights changed since)."""
    directory = Path(directory)
    for name in finished_corpora(directory):
        meta = read_meta(directory / f"{name}.json")
        other = meta.get("config_hash")
        if other and other != config_hash:
            raise MoePruneError(
                f"{directory} holds the profile of another model ({name}: config hash {other}, this model's is "
                f"{config_hash}); a profile folder holds one model's corpora. Choose another --out."
            )
        weights = meta.get("weights_sha256")
        if weights and weights_sha256 and weights != weights_sha256:
            raise MoePruneError(
                f"{directory} holds corpus {name} profiled from other weights of this architecture (model "
                f"{meta.get('model')!r}; its weights fingerprint differs: another checkpoint, or these weights "
                "changed since). Its corpora would mix with this model's. Choose another --out, or delete "
                f"{directory} to profile again."
            )


# Types of the metadata fields moeprune reads (planning, resuming, identity); others are kept as they are.
META_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "model_type": (str, type(None)), "config_hash": (str,), "tokenizer_sha256": (str,),
    "corpus_sha256": (str, type(None)), "weights_sha256": (str, type(None)), "corpus": (dict,),
    "tokens": (int,), "samples": (int,), "samples_requested": (int,), "seq_len": (int,), "seed": (int,),
    "num_experts": (int,), "top_k": (int, type(None)), "n_group": (int, type(None)),
    "topk_group": (int, type(None)), "moe_layers": (list,), "world_size": (int,), "windows_done": (int,),
    "finished_at": (int, float), "settings": (dict,), "versions": (dict,), "dtype": (str,),
}


def read_meta(path: Path) -> dict[str, Any]:
    """A corpus profile's metadata (empty when absent); a corrupt file is a MoePruneError with the fix."""
    if not path.exists() and not path.is_symlink():
        return {}
    fix = "delete it and its .safetensors and re-run `moeprune profile`"
    meta = read_json(path, "Profile metadata", fix)
    if not isinstance(meta, dict):
        raise MoePruneError(f"Profile metadata {path} is not a JSON object; {fix}.")
    for key, types in META_TYPES.items():
        value = meta.get(key)
        wrong = key in meta and (not isinstance(value, types) or isinstance(value, bool)
                                 or (isinstance(value, int | float) and value < 0))
        if wrong or (key == "moe_layers" and not all(_is_int(v) and v >= 0 for v in value or [])):
            raise MoePruneError(f"Profile metadata {path}: {key!r} is {value!r}, not {_kind(types)}; {fix}.")
    if meta.get("format") != PROFILE_FORMAT:  # moeprune has written it since its first profile
        raise MoePruneError(f"Profile metadata {path}: format {terminal_safe(repr(meta.get('format')))}, not "
                            f"{PROFILE_FORMAT!r}; {fix}.")
    layers = meta.get("moe_layers") or []
    if layers != sorted(set(layers)):  # one entry per MoE layer, in order (planning zips them with the sums)
        raise MoePruneError(f"Profile metadata {path}: 'moe_layers' {layers} is not increasing; {fix}.")
    if "corpus" in meta:  # a corpus spec of known fields and a plain name (it names files when it is used)
        corpus_spec_from_record(meta["corpus"], f"Profile metadata {path}", fix)
    return meta



def _kind(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a non-negative integer", float: "a number", dict: "an object", list: "a list",
             type(None): "null"}
    return " or ".join(names[t] for t in types)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _safe_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator))
