"""Model-free apply: prune a safetensors checkpoint shard by shard, without building the model.

Peak memory is about the largest shard, so a 671B checkpoint prunes on a machine that could never
hold it. The rules are by tensor name, for the hub's layouts:

- per-expert keys ``...layers.{i}.<block>.experts.{j}.<rest>``: kept ``j`` renumbered to its rank
  among the kept ids, removed ``j`` dropped;
- fused keys ``...layers.{i}.<block>.experts.<param>`` whose first dimension is N: rows sliced;
- router keys ``...layers.{i}.<block>.<gate|router>.<weight|bias|e_score_correction_bias>`` whose first
  dimension is N: rows sliced;
- DBRX (the ``flat`` layout of the architecture table): ``transformer.blocks.{i}.ffn.experts.mlp.<w1|v1|w2>``
  ``[N * I, H]``, expert e owning rows ``e*I .. (e+1)*I - 1``: the kept experts' blocks of rows; its router
  ``ffn.router.layer.weight`` ``[N, H]``: rows sliced;

then the config's expert count (at its dotted path for DBRX: ``ffn_config.moe_num_experts``) and
``model.safetensors.index.json`` are rewritten. Other files (tokenizer, remote code, generation config) are
copied as they are.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moeprune.arch.adapters import spec_for
from moeprune.errors import MoePruneError
from moeprune.io import WEIGHT_SUFFIXES, atomic_directory, check_output_dir, read_config_json, read_weight_map
from moeprune.loading import check_finite_tensor
from moeprune.planning.fit import check_mask_for_checkpoint
from moeprune.planning.mask import ExpertMask
from moeprune.quant import QuantFormat, check_checkpoint, describe, dtype_size, header_info, is_writable
from moeprune.surgery.config_json import with_expert_count, with_pruned_quantization
from moeprune.surgery.keys import EXPERT_KEY, FUSED_KEY, ROUTER_KEY, sliced_shape
from moeprune.surgery.model_card import CardInfo, exported_mask, render_model_card
from moeprune.surgery.options import ExportOptions
from moeprune.surgery.shard_checks import check_source, check_written, expected_output

INDEX_FILE = "model.safetensors.index.json"
MODEL_FREE_DEQUANTIZE = ("--model-free writes the source's tensors as they are and cannot --dequantize; drop "
                         "--model-free (in-memory apply dequantizes) or drop --dequantize.")


def prune_checkpoint_files(
    source: str | Path,
    mask: ExpertMask,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    progress: bool = True,
    trust_remote_code: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write the pruned checkpoint of the local safetensors checkpoint ``source`` into ``out``.

    ``options`` (:class:`~moeprune.surgery.options.ExportOptions`): ``overwrite`` an existing ``out``; ``force``
    accepts a mask planned for a model with another config hash (the CLI's ``--force``); ``dequantize`` is refused
    (the source's tensors are written as they are). ``check(folder)`` is called on the complete checkpoint before
    it replaces ``out`` (an error leaves nothing): the streamed writer's verification.

    The mask gets the checks plain apply makes (expert count, config hash, top-k, routing groups).
    ``trust_remote_code`` only lets transformers build a remote-code config to compute its hash; no model code is
    run."""
    options = options or ExportOptions()
    if options.dequantize:
        raise MoePruneError(MODEL_FREE_DEQUANTIZE)
    overwrite = options.overwrite
    source = Path(source)
    mask = exported_mask(mask)  # no recovery runs here: a recovery the input mask claims is not recorded
    check_output_dir(out, sources=[source], overwrite=overwrite)
    check_mask_for_checkpoint(mask, source, force=options.force, trust_remote_code=trust_remote_code)
    config = read_config_json(source)
    fmt = check_quantized_source(source, config)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        written = write_pruned_tensors(source, mask, tmp, progress=progress, config=config)
        _copy_other_files(source, tmp, set(_shards(source)))
        (tmp / "config.json").write_text(json.dumps(pruned_config(config, mask), indent=2) + "\n")
        # Counted from the tensors on disk: tied embeddings stored twice would be counted twice.
        card = CardInfo(str(source), str(out), mask, written.params_before, written.params_after,
                        format=describe(fmt), bytes_before=written.bytes_before, bytes_after=written.bytes_after)
        export = {"format": card.format, "bytes_before": card.bytes_before, "bytes_after": card.bytes_after}
        replace(mask, extra={**mask.extra, "export": export}).save(tmp / "mask.json")
        (tmp / "README.md").write_text(render_model_card(card).replace("moeprune apply", "moeprune apply --model-free"))
        if check is not None:
            check(tmp)
    return Path(out)


@dataclass
class Written:
    """What :func:`write_pruned_tensors` wrote: parameters (elements) and tensor bytes before and after."""

    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int


def write_pruned_tensors(source: Path, mask: ExpertMask, tmp: Path, *, progress: bool = True,
                         config: dict | None = None) -> Written:
    """The source's safetensors shards, pruned by ``mask`` tensor by tensor, written into ``tmp`` (with the index
    when the source has one) and checked from the written headers. Every kept tensor is the source's own bytes:
    quantized payloads and their scales travel with their expert (see :mod:`moeprune.quant`). The one writer of
    model-free apply and of the in-memory apply of a quantized checkpoint."""
    config = read_config_json(source) if config is None else config
    shards = _shards(source)
    flat = spec_for(SimpleNamespace(**config)).layout == "flat"  # config.json as attributes, for the table
    expected = expected_output(check_source(source, shards, mask), mask, flat)  # from the headers, before writing
    weight_map: dict[str, str] = {}
    written = Written(0, 0, 0, 0)
    routers: set[int] = set()
    for shard in tqdm(shards, desc="prune shards", unit="shard", disable=not progress):
        numel, size = _shard_size(source / shard)
        written.params_before += numel
        written.bytes_before += size
        tensors = _pruned_shard(source / shard, mask, routers, flat)
        written.params_after += sum(t.numel() for t in tensors.values())
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        written.bytes_after += sum(t.numel() * t.element_size() for t in tensors.values())
    if routers != set(mask.layers):
        raise MoePruneError(
            f"The mask covers MoE layers {sorted(mask.layers)} but the checkpoint has routers of "
            f"{mask.num_experts} experts in layers {sorted(routers)}: the mask is for a different model."
        )
    if (source / INDEX_FILE).exists():
        index = {"metadata": {"total_size": written.bytes_after}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    check_written(tmp, expected, (source / INDEX_FILE).exists())
    return written


def check_quantized_source(source: Path, config: dict) -> QuantFormat | None:
    """The source's quantized layout after its checks (see :func:`moeprune.quant.check_checkpoint`); a layout
    moeprune cannot write back is refused here, before anything is written."""
    fmt = check_checkpoint(source, config, header_info(source, _shards(source)))
    if not is_writable(fmt):
        raise MoePruneError(
            f"{source} is quantized as {describe(fmt)}, which moeprune does not write back in its own format (it "
            "writes FP8 block/tensor, MXFP4 and compressed-tensors pack-/float-quantized); pass --dequantize to write "
            "a bf16 checkpoint (in-memory apply), or quantize again after pruning (docs/apply.md)."
        )
    return fmt


def _shard_size(path: Path) -> tuple[int, int]:
    """(elements, tensor bytes) of one shard, from its header."""
    numel = size = 0
    for dtype, shape in header_info(path.parent, [path.name]).values():
        count = math.prod(shape)
        numel += count
        size += count * dtype_size(dtype)
    return numel, size


def _shards(source: Path) -> list[str]:
    index = source / INDEX_FILE
    if index.exists():
        return sorted(set(read_weight_map(source).values()))
    if (source / "model.safetensors").exists():
        return ["model.safetensors"]
    raise MoePruneError(
        f"{source} holds no safetensors checkpoint (model.safetensors or {INDEX_FILE}); model-free apply needs one. "
        "Use `moeprune apply` without --model-free to load and re-save it."
    )


def _pruned_shard(path: Path, mask: ExpertMask, routers: set[int], flat: bool) -> dict[str, torch.Tensor]:
    """The shard's tensors after pruning; adds to ``routers`` the layers whose router rows were sliced."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            renamed = _prune_tensor(name, lambda n=name: handle.get_tensor(n), mask, flat)
            if renamed is None:
                continue
            # NaN/inf weights are a broken checkpoint, refused as plain apply refuses them (not exported as they are)
            check_finite_tensor(name, renamed[1], path.parent)
            out[renamed[0]] = renamed[1].contiguous()
            router = ROUTER_KEY.match(name)
            if router and name.endswith(".weight") and int(router["layer"]) in mask.layers:
                routers.add(int(router["layer"]))
    return out


def _prune_tensor(name: str, load, mask: ExpertMask, flat: bool) -> tuple[str, torch.Tensor] | None:
    """The (new name, tensor) this tensor becomes, or None when it belongs to a removed expert."""
    match = EXPERT_KEY.match(name)
    if match and int(match["layer"]) in mask.layers:
        kept = mask.kept(int(match["layer"]))
        expert = int(match["expert"])
        if expert not in kept:
            return None
        return f"{match['head']}.{kept.index(expert)}.{match['rest']}", load()
    for pattern in (FUSED_KEY, ROUTER_KEY):
        match = pattern.match(name)
        if match and int(match["layer"]) in mask.layers:
            tensor = load()
            if sliced_shape(tuple(tensor.shape), mask, flat) is None:
                return name, tensor  # not laid out per expert: expected_output has refused it already
            # [N * rows, ...] as [N, rows, ...] (rows = 1 unless flat), kept experts' blocks, then flat again.
            blocks = tensor.reshape(mask.num_experts, -1, *tensor.shape[1:])
            return name, blocks[mask.kept(int(match["layer"]))].reshape(-1, *tensor.shape[1:])
    return name, load()


def pruned_config(config: dict, mask: ExpertMask) -> dict:
    """The source's config.json, every field kept, with the expert count (and any alias of it) set to K and the
    quantization_config's ignore lists renumbered to the kept experts."""
    return with_pruned_quantization(with_expert_count(config, mask.num_experts, mask.kept_per_layer), mask)


def _copy_other_files(source: Path, target: Path, shards: set[str]) -> None:
    """The source's other files (tokenizer, generation config, remote code, licence), never its weights in
    another format (a dense ``pytorch_model.bin`` beside ``model.safetensors`` would be loaded unpruned by
    readers preferring it) nor a symbolic link (its target may lie anywhere)."""
    skip = shards | {INDEX_FILE, "config.json", "mask.json", "README.md"}
    for path in source.iterdir():
        name = path.name
        weights = name.endswith(WEIGHT_SUFFIXES) or ".bin.index" in name or ".safetensors.index" in name
        if path.is_symlink() or not path.is_file() or name in skip or name.startswith(".") or weights:
            continue
        shutil.copyfile(path, target / name)
