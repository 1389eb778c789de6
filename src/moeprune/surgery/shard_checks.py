"""What model-free apply can verify without building the model: from safetensors headers alone.

Before writing: the source index names only tensors its shards hold, the mask covers exactly the layers
with an N-expert router (a layer left out would keep N experts under a config that says K), and every
MoE layer of the mask holds
all N experts (per-expert keys ``experts.0 .. experts.N-1`` for every weight). After writing: the output's
tensors are exactly the source's, pruned by the mask (kept experts renumbered, removed ones gone, fused and
router tensors with K rows), each with the expected shape, and the new index names every written tensor.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from safetensors import SafetensorError, safe_open

from moeprune.errors import MoePruneError
from moeprune.io import read_weight_map
from moeprune.planning.mask import ExpertMask
from moeprune.surgery.keys import EXPERT_KEY, FUSED_KEY, ROUTER_KEY, sliced_shape

INDEX_FILE = "model.safetensors.index.json"


def header_shapes(folder: Path, shards: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (shard, shape)} read from the headers (no tensor data is loaded)."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in shards:
        path = folder / shard
        if not path.exists():
            raise MoePruneError(f"{folder} lacks the shard {shard} its index names; re-download the checkpoint.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    shapes[name] = (shard, tuple(handle.get_slice(name).get_shape()))
        except SafetensorError as err:
            raise MoePruneError(f"{path} is truncated or corrupt ({err}); re-download the checkpoint.") from err
    return shapes


def check_source(folder: Path, shards: list[str], mask: ExpertMask) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The source's index agrees with its shards and every mask layer holds all N experts."""
    shapes = header_shapes(folder, shards)
    routers = {
        int(match["layer"])
        for name, (_, shape) in shapes.items()
        if name.endswith(".weight") and (match := ROUTER_KEY.match(name)) and shape and shape[0] == mask.num_experts
    }
    if not routers:
        raise MoePruneError(
            f"{folder} holds no router weight of {mask.num_experts} rows under a name model-free apply knows "
            "(...layers.N.<block>.<gate|router>.weight): its architecture keeps its router elsewhere. Use plain "
            "`moeprune apply` (without --model-free)."
        )
    if routers != set(mask.layers):
        raise MoePruneError(
            f"The mask covers MoE layers {sorted(mask.layers)} but the checkpoint has routers of {mask.num_experts} "
            f"experts in layers {sorted(routers)}: the mask is for a different model. Plan a mask from a profile "
            "of this model."
        )
    index = folder / INDEX_FILE
    if index.exists():
        listed = read_weight_map(folder)
        absent = sorted(name for name, shard in listed.items() if shapes.get(name, (None,))[0] != shard)
        if absent:
            raise MoePruneError(
                f"{index} names {len(absent)} tensor(s) its shards do not hold (e.g. {absent[0]}); the checkpoint "
                "is incomplete: re-download it."
            )
    experts: dict[tuple[int, str], set[int]] = defaultdict(set)
    sizes: dict[tuple[int, str], dict[tuple[int, ...], int]] = defaultdict(dict)
    for name, (_, shape) in shapes.items():
        match = EXPERT_KEY.match(name)
        if match and int(match["layer"]) in mask.layers:
            key = (int(match["layer"]), f"{match['head']}.*.{match['rest']}")
            experts[key].add(int(match["expert"]))
            sizes[key].setdefault(shape, int(match["expert"]))
    for (layer, pattern), seen in sorted(sizes.items()):
        if len(seen) > 1:  # one expert of another shape (e.g. zero rows): a broken save, not something to export
            shown = ", ".join(f"expert {e}: {list(shape)}" for shape, e in list(seen.items())[:3])
            raise MoePruneError(
                f"{folder}: layer {layer}'s {pattern} tensors differ in shape ({shown}); the experts of a layer are "
                "all one shape, so the checkpoint is broken: re-download or repair it."
            )
    for (layer, pattern), ids in sorted(experts.items()):
        if ids != set(range(mask.num_experts)):
            missing = sorted(set(range(mask.num_experts)) - ids)[:5]
            raise MoePruneError(
                f"{folder}: layer {layer} holds {pattern} for {len(ids)} of the mask's {mask.num_experts} experts "
                f"(missing e.g. {missing}); the checkpoint is incomplete or the mask is for another model."
            )
    return shapes


def expected_output(shapes: dict[str, tuple[str, tuple[int, ...]]], mask: ExpertMask,
                    flat: bool = False) -> dict[str, tuple[int, ...]]:
    """{name: shape} the pruned checkpoint must hold, derived from the source headers and the mask (``flat``:
    expert tensors of DBRX's ``[N * I, H]`` layout)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, (_, shape) in shapes.items():
        match = EXPERT_KEY.match(name)
        if match and int(match["layer"]) in mask.layers:
            kept = mask.kept(int(match["layer"]))
            if int(match["expert"]) in kept:
                out[f"{match['head']}.{kept.index(int(match['expert']))}.{match['rest']}"] = shape
            continue
        sliced = next((p.match(name) for p in (FUSED_KEY, ROUTER_KEY) if p.match(name)), None)
        if sliced and int(sliced["layer"]) in mask.layers:
            new_shape = sliced_shape(shape, mask, flat)
            if new_shape is None:
                rows = f"a multiple of {mask.num_experts}" if flat else str(mask.num_experts)
                raise MoePruneError(
                    f"Tensor {name} has shape {list(shape)}, but a routed-expert tensor of this MoE layer must have "
                    f"{rows} rows (the mask's expert count); the mask is for another model, or this "
                    "layout needs plain `moeprune apply`."
                )
            out[name] = new_shape
            continue
        out[name] = shape
    return out


def check_written(folder: Path, expected: dict[str, tuple[int, ...]], has_index: bool) -> None:
    """The written shards hold exactly the expected tensors with the expected shapes, and the index lists them."""
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    written = {name: shape for name, (_, shape) in header_shapes(folder, shards).items()}
    if written != expected:
        wrong = sorted(set(written) ^ set(expected)) or sorted(n for n in written if written[n] != expected[n])
        raise MoePruneError(
            f"Model-free apply wrote {len(written)} tensors where {len(expected)} were expected (first difference: "
            f"{wrong[0]}); nothing was written. This is a moeprune bug for this layout: please report it, or use "
            "plain `moeprune apply`."
        )
    if has_index:
        listed = read_weight_map(folder)
        if set(listed) != set(written) or not set(listed.values()) <= set(shards):
            raise MoePruneError("Model-free apply wrote an index that does not match its shards; nothing was written.")
