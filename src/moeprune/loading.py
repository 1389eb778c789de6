"""Load a Hugging Face MoE checkpoint (local directory or hub id) and its tokenizer, with clear errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moeprune.arch.adapters import check_routing_counts
from moeprune.bundled import bundled_model_path
from moeprune.errors import BrokenConfig, MoePruneError
from moeprune.io import INDEX_FILE, read_config_json, read_weight_map
from moeprune.models import register as register_ports
from moeprune.options import flag, given_flags
from moeprune.presets import PRESETS, Preset, preset_for
from moeprune.quant import QuantFormat, check_checkpoint, format_of, header_info
from moeprune.streaming.layers import DiskLayers
from moeprune.streaming.memory import Memory, available_memory, gib, should_stream

# Files of which at least one makes a directory hold a tokenizer (transformers 5 silently builds an empty,
# one-token tokenizer for a directory with none of them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)

log = logging.getLogger(__name__)

# Weights may take this share of a GPU's free memory; the rest is for activations and the CUDA context.
FIT_FRACTION = 0.9

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model_path(model: str | Path) -> str:
    """``bundled`` names the testbed model that ships with moeprune; anything else is passed through."""
    if str(model) == "bundled":
        return str(bundled_model_path())
    return str(model)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoePruneError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'.")
    return DTYPES[dtype]


def load_config(model: str | Path, trust_remote_code: bool = False):
    # Model types moeprune maintains a port of (DeepSeek-MoE) load through it, never through their hub code.
    register_ports()
    path = resolve_model_path(model)
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except StrictDataclassError as err:  # typed configs: `"num_experts_per_tok": "2"`, `"norm_topk_prob": 2`
        cause = err.__cause__ or err
        raise BrokenConfig(
            f"{path}'s config.json holds a value of the wrong type: {str(cause).splitlines()[0]}. Fix config.json "
            "(or re-download the checkpoint)."
        ) from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise MoePruneError(
                f"{path} uses custom modeling code; pass --trust-remote-code if you trust its source."
            ) from err
        raise MoePruneError(f"Cannot read the config of {path}: {err}") from err
    except OSError as err:
        raise MoePruneError(
            f"Cannot load model {path!r}: not a local directory with config.json, and the hub is unreachable or "
            f"has no such repo ({err.__class__.__name__}). Pass a local checkout path instead."
        ) from err
    check_routing_counts(config)  # top-k 0 or above the expert count: a broken config, named before any work
    return config


def load_model(
    model: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    dequantize: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in eval mode, placed the way the field's tools place it.

    ``device_map`` (e.g. "auto") goes to transformers/accelerate as given; otherwise see
    :func:`choose_device_map`: with CUDA and no ``device`` the weights load straight onto one GPU, or are
    spread over all visible GPUs when one is not enough; ``device="cpu"`` keeps them on the CPU.
    ``dtype="auto"`` keeps the checkpoint's dtype (bf16 for most hub MoEs), except on the CPU, where it
    means float32 (half-precision matmuls are many times slower there). A quantized checkpoint loads through
    transformers' quantizer, dequantized on every device (``dequantize`` is kept for callers that say so).
    """
    path = resolve_model_path(model)
    config = load_config(path, trust_remote_code)
    torch_dtype = parse_dtype(dtype)
    if device_map is None:
        device_map = choose_device_map(config, torch_dtype, device, trust_remote_code)
    kwargs = {"dtype": _auto_dtype(torch_dtype, device_map), "trust_remote_code": trust_remote_code}
    quantization = getattr(config, "quantization_config", None)
    # Always dequantized on loading, on a GPU too: moeprune's instrumentation (f_e for REAP, the expert-sparsity
    # capture, slicing in memory) reads the experts' weights as tensors, which quantized kernels' packed weights
    # are not; on the CPU transformers would dequantize FP8 and MXFP4 anyway, and compressed-tensors it would
    # decompress only on the first forward, fake-quantizing activations. Too big dequantized: --stream, which
    # dequantizes one layer at a time.
    dequantize = dequantize or quantization is not None
    if dequantize and quantization is not None:
        from transformers.quantizers.auto import AutoQuantizationConfig

        raw = quantization if isinstance(quantization, dict) else quantization.to_dict()
        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict({**raw, "dequantize": True})
    if device_map is not None:
        kwargs["device_map"] = device_map
    log.info("Loading %s (%s) on %s", path, kwargs["dtype"], _placement_name(device_map))
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except OSError as err:
        raise MoePruneError(f"Cannot load the weights of {path}: {err}") from err
    except RuntimeError as err:
        # transformers 5 also fails while stacking per-expert tensors of different shapes (zero rows, say)
        if "mismatched" not in str(err) and "conversion of the weights" not in str(err):
            raise
        raise MoePruneError(
            f"The tensors of {path} do not have the shapes its config.json describes (e.g. the config says more "
            "experts, or another size, than the weights hold); fix config.json or re-download the checkpoint."
        ) from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # transformers would initialise them randomly and carry on: every result would be silently wrong.
        raise MoePruneError(
            f"{len(missing)} weight(s) of the model are missing from {path} (e.g. {missing[0]}); transformers "
            "would fill them with random values. Re-download or re-save the checkpoint."
        )
    loaded.eval()
    loaded.name_or_path = path
    check_finite_weights(loaded, path)
    return loaded


FINITE_CHUNK = 1 << 24  # elements checked per step, so the check needs little extra memory on any device


def check_finite_weights(model: torch.nn.Module, source: Any = None) -> None:
    """Every floating-point weight is finite: a NaN or inf weight is a broken checkpoint, named as such (with the
    tensor) before it turns into NaN statistics, a NaN perplexity or a failed verification blamed on moeprune."""
    for name, param in model.named_parameters():
        if param.device.type != "meta":
            check_finite_tensor(name, param.detach(), source)


FINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float8 payloads are quantized data


def check_finite_tensor(name: str, tensor: torch.Tensor, source: Any = None) -> None:
    """One weight of :func:`check_finite_weights`; model-free apply checks each tensor it writes the same way."""
    if tensor.dtype not in FINITE_DTYPES:
        return
    for chunk in tensor.reshape(-1).split(FINITE_CHUNK):
        if not bool(torch.isfinite(chunk).all()):
            where = f" of {source}" if source is not None else ""
            raise MoePruneError(
                f"The weight {name}{where} holds NaN or infinite values: the checkpoint is broken (a bad save, "
                "download or conversion), not something moeprune can prune or score. Re-download or repair it."
            )


def choose_device_map(config, dtype: torch.dtype | str, device: str | None,
                      trust_remote_code: bool = False) -> str | dict | None:
    """Where the weights go: None (the CPU), ``{"": device}`` (one device) or "auto" (accelerate spreads them).

    ``device`` "cpu" -> CPU; "auto" -> "auto"; any other device -> all weights on it. Without ``device``:
    the CPU when CUDA is absent; under torchrun each rank's own GPU; else the current GPU when the weights
    fit in ``FIT_FRACTION`` of its free memory, otherwise "auto" over all visible GPUs (then CPU).
    """
    if device is not None:
        if str(device) == "auto":
            return "auto"
        if str(device).startswith("cpu"):
            return None
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MoePruneError(f"--device {device} asks for CUDA, but torch sees no CUDA device here; "
                                "drop --device (the CPU is then used) or pass --device cpu.")
        return {"": _normalised(device)}
    if not torch.cuda.is_available():
        return None
    gpu = torch.cuda.current_device()
    if _distributed() or weight_bytes(config, dtype, trust_remote_code) <= FIT_FRACTION * _free_bytes(gpu):
        return {"": gpu}
    log.info("The weights do not fit on GPU %d alone: spreading them over all visible GPUs (device_map='auto')",
             gpu)
    return "auto"


def fits_on_gpus(model: str | Path, dtype: str | torch.dtype | None = "auto", device: str | None = None,
                 trust_remote_code: bool = False) -> bool:
    """Whether the weights fit in ``FIT_FRACTION`` of the free memory of ``device``, or of all visible GPUs
    when ``device`` is None (True on a CPU run: there is nothing to fit)."""
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
        return True
    config = load_config(model, trust_remote_code)
    if device is not None:
        free = _free_bytes(torch.device(_normalised(device)).index)
    elif _distributed():
        free = _free_bytes(torch.cuda.current_device())
    else:
        free = sum(_free_bytes(i) for i in range(torch.cuda.device_count()))
    return weight_bytes(config, parse_dtype(dtype), trust_remote_code) <= FIT_FRACTION * free


def weight_bytes(config, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False) -> int:
    """Bytes of the model's weights in ``dtype`` ("auto": the checkpoint's), from an empty (meta) skeleton."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    target = checkpoint_dtype(config) if dtype == "auto" else dtype
    size = torch.tensor([], dtype=target).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in skeleton.parameters())


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (float32 when the config does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return DTYPES.get(value, torch.float32) if isinstance(value, str) else value


def _auto_dtype(dtype: torch.dtype | str, device_map) -> torch.dtype | str:
    """ "auto" keeps the checkpoint's dtype, except for weights loaded on the CPU (device_map None):
    half-precision matmuls are many times slower than fp32 on CPUs, so there "auto" means float32."""
    return torch.float32 if dtype == "auto" and device_map is None else dtype


def _normalised(device: str | torch.device) -> str:
    """``cuda`` -> ``cuda:<current>``, so that a device map names one concrete device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _gpu_free_bytes(device: str | None) -> int:
    """Free memory of the GPUs a run would use (0 without CUDA or with --device cpu)."""
    if not torch.cuda.is_available() or (device is not None and not str(device).startswith(("cuda", "auto"))):
        return 0
    if device is not None and str(device).startswith("cuda"):
        return _free_bytes(torch.device(_normalised(device)).index)
    return sum(_free_bytes(i) for i in range(torch.cuda.device_count()))


def _free_bytes(gpu: int) -> int:
    return torch.cuda.mem_get_info(gpu)[0]


def _distributed() -> bool:
    """Under torchrun every rank holds a whole replica on its own GPU: never spread a model over GPUs."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _placement_name(device_map) -> str:
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict) and set(device_map) == {""}:
        value = device_map[""]
        return f"cuda:{value}" if isinstance(value, int) else str(value)
    return f"device_map={device_map!r}"


def load_tokenizer(model: str | Path, trust_remote_code: bool = False):
    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MoePruneError(f"Cannot load a tokenizer from {path}: {err}. Pass --tokenizer PATH.") from err


def config_hash(config) -> str:
    """A short hash of the architecture-defining config, to recognise profiles and masks of other models.

    ``quantization_config`` is not part of it: transformers removes it from a config it dequantized on loading
    (and adds its own fields to one it did not), so the same checkpoint would hash differently loaded and from
    its config.json; and a mask's expert ids mean the same experts in a model's bf16 and quantized releases."""
    data = config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "auto_map",
        "use_cache",
        "output_router_logits",
        "_attn_implementation_autoset",
        "_experts_implementation",
    ):
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_name(model: PreTrainedModel | str | Path) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    return str(name) if name else type(model).__name__


def is_local(model: str | Path) -> bool:
    return Path(resolve_model_path(model)).exists()


# ------------------------------------------------------------------------------ checked loading
def checked_model(model: Any, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    """``model`` itself when it is loaded already; else :func:`load_model` after the device and the
    checkpoint's files are checked (a truncated download is one line, not a safetensors traceback)."""
    if isinstance(model, torch.nn.Module):
        check_finite_weights(model, model_name(model))
        return model
    check_device(device)
    check_checkpoint_files(model)
    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def checked_tokenizer(tokenizer: Any, model: Any, trust_remote_code: bool = False):
    """``tokenizer`` itself when it is loaded already; else the one of ``tokenizer`` (a path or hub id) or of
    the model, refused when the folder has no tokenizer files or transformers builds an empty one."""
    if tokenizer is None or isinstance(tokenizer, str | Path):
        source = tokenizer or model_name(model)
        check_tokenizer_source(str(source), None)
        return check_tokenizer(load_tokenizer(source, trust_remote_code), source, model)
    return check_tokenizer(tokenizer, "the given tokenizer", model)


RUN_DEVICES = ("cpu", "cuda", "mps")


def check_device(device: str | None) -> None:
    """A device torch knows and this machine has (``--device cuda`` on a machine without CUDA fails here)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise MoePruneError(f"Unknown --device {device!r}: {err}. Use e.g. cpu, cuda or cuda:1.") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MoePruneError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise MoePruneError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise MoePruneError(f"--device {device}: MPS is not available here; use --device cpu.")
    elif parsed.type not in RUN_DEVICES:
        # meta holds no data (every result would be empty or a crash); others are not devices moeprune runs on.
        raise MoePruneError(f"--device {device}: moeprune computes on {', '.join(RUN_DEVICES)} only; use --device "
                            "cpu or cuda.")


def check_checkpoint_files(model: Any, compute: bool = True) -> None:
    """Every safetensors file of a local checkpoint opens (its header covers the file) and every shard the
    index names exists; a quantized one passes :func:`check_quantized_files` (``compute``: it will be loaded and
    dequantized; False for model-free apply, which only slices it)."""
    if not isinstance(model, str | Path):
        return
    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return

    check_not_pickle_only(folder)
    if (folder / INDEX_FILE).exists():
        shards = set(read_weight_map(folder).values())
        missing = sorted(s for s in shards if not (folder / s).exists())
        if missing:
            raise MoePruneError(f"{folder} lacks the shard(s) {missing} its index names; re-download the checkpoint.")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise MoePruneError(
                f"{path} is truncated or corrupt ({err}); re-download or re-save the checkpoint."
            ) from err
    check_quantized_files(folder, compute)


def dequantizing_quantizer(quantization: dict[str, Any] | None) -> Any:
    """transformers' quantizer for a pre-quantized checkpoint, set to dequantize as it loads (None when the
    checkpoint is not quantized): what the streamer hands transformers' loader to dequantize one layer at a time."""
    if not quantization:
        return None
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    quantizer = AutoHfQuantizer.from_config(AutoQuantizationConfig.from_dict({**quantization, "dequantize": True}),
                                            pre_quantized=True)
    quantizer.validate_environment()
    return quantizer


def check_quantized_files(folder: Path, compute: bool = True) -> QuantFormat | None:
    """A quantized checkpoint's layout, checked from config.json and the safetensors headers before any weight is
    read (a method transformers cannot read, a missing scale, a block the expert shape does not divide; with
    ``compute``, any FP8 weight transformers' dequantization would get wrong)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = read_config_json(folder)
    if not config.get("quantization_config"):
        return None
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    return check_checkpoint(folder, config, header_info(folder, shards), compute=compute)


def check_tokenizer_source(model: str, tokenizer: str | None) -> None:
    """A local model folder without tokenizer files needs --tokenizer (transformers would build an empty one)."""
    source = Path(resolve_model_path(tokenizer or model))
    if source.is_dir() and not any((source / name).exists() for name in TOKENIZER_FILES):
        flag = "--tokenizer" if tokenizer else "the model folder"
        raise MoePruneError(
            f"{flag} {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); pass "
            "--tokenizer PATH_OR_ID naming the model's tokenizer."
        )


def check_tokenizer(tokenizer: Any, source: Any, model: Any = None) -> Any:
    """Refuse an empty tokenizer (transformers 5 returns one of length 1 for a folder without its files), and
    one whose ids run past the model's embedding rows (an IndexError deep in the embedding otherwise)."""
    try:
        size = len(tokenizer)
    except TypeError:
        return tokenizer
    if size < 2:
        raise MoePruneError(
            f"The tokenizer loaded from {source} is empty ({size} token); the folder has no tokenizer files. "
            "Pass --tokenizer PATH_OR_ID naming the model's tokenizer."
        )
    rows = _embedding_rows(model)
    if rows is not None and size > rows:
        raise MoePruneError(
            f"The tokenizer from {source} has {size} tokens, more than the model's {rows} embedding rows "
            "(vocab_size): its ids would index past the embedding. Pass --tokenizer naming this model's tokenizer."
        )
    return tokenizer


def _embedding_rows(model: Any) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError, ValueError):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        return vocab if isinstance(vocab, int) else None


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "pytorch_model.pt")


def check_not_pickle_only(folder: Path) -> None:
    """A checkpoint with pickle weights only (pytorch_model.bin, no safetensors): torch refuses to unpickle it
    safely, and moeprune never unpickles untrusted files. Refused with the conversion to do."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = [name for name in PICKLE_WEIGHTS if (folder / name).exists()] or [p.name for p in folder.glob("*.bin")]
    if pickles:
        raise MoePruneError(
            f"{folder} holds pickle weights only ({pickles[0]}), no .safetensors; moeprune loads safetensors "
            "checkpoints only (unpickling can run code). Convert it where you trust the file, e.g. "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR_SAFE), and pass that folder."
        )


# ------------------------------------------------------------------------------ the model source
PLACEMENTS = ("memory", "device-map", "stream")


@dataclass(frozen=True)
class ModelSource:
    """What a verb is given as "the model", resolved once at the door: a path, a hub id, ``bundled`` or a loaded
    module, with how to load it (``dtype``, ``device``, ``trust_remote_code``, ``tokenizer``) and where its weights
    live while the stages run (``stream``: True streams them from disk one decoder layer at a time, False keeps them
    in memory, None decides from the memory available); ``preset_name`` picks a preset instead of the one the name
    implies (``experiment --preset``).

    It knows its preset from its name before anything loads, its config (read once), its positions limit and
    whether it is quantized, and loads itself (:meth:`load`, :meth:`load_tokenizer`). Verbs accept a string or a
    source: :meth:`of` turns either into one.
    """

    model: Any
    dtype: str | torch.dtype = field(default="auto", metadata=flag(
        "--dtype", "auto | float32 | bfloat16 | float16 (auto: the checkpoint's dtype; float32 on the CPU)"))
    device: str | None = field(default=None, metadata=flag(
        "--device", "cpu, cuda, cuda:1, or auto (spread over all GPUs) (default: the GPU if there is one, spread "
        "over all visible GPUs when it is too small, else the CPU)"))
    trust_remote_code: bool = field(default=False, metadata=flag(
        "--trust-remote-code", "allow the checkpoint's own modeling code", action="store_true"))
    tokenizer: Any = field(default=None, metadata=flag(
        "--tokenizer", "tokenizer path or hub id (default: the model's; needed when the model folder has no "
        "tokenizer files)"))
    stream: bool | None = field(default=None, metadata=flag(
        "--stream", "read the weights from the checkpoint's safetensors shards one decoder layer at a time, never the "
        "whole model in memory (default: only when the model does not fit in the memory available to the process, "
        "cgroup limits included; --no-stream loads it whole)", action=argparse.BooleanOptionalAction))
    preset_name: str | None = field(default=None, metadata=flag(
        "--preset", "paper: wikitext2+c4, 512x1024, B=20/24, six tasks, seeds 0-4,42; bundled: the testbed, fast "
        "(default: bundled for the testbed, else paper)", dest="preset", choices=tuple(PRESETS)))
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, ModelSource):
            raise MoePruneError("ModelSource.model is a path, hub id, 'bundled' or a loaded model, not a ModelSource;"
                                " use ModelSource.of(source, ...) to change its settings.")
        if not isinstance(self.model, str | Path | torch.nn.Module) or (isinstance(self.model, str) and not self.model):
            raise MoePruneError(f"model must be a path, hub id, 'bundled' or a loaded torch model, not "
                                f"{type(self.model).__name__}.")
        if isinstance(self.model, Path):
            object.__setattr__(self, "model", str(self.model))
        if self.preset_name is not None and self.preset_name not in PRESETS:
            raise MoePruneError(f"Unknown preset {self.preset_name!r}; choose one of: {', '.join(PRESETS)}.")
        if not isinstance(self.trust_remote_code, bool):
            raise MoePruneError(f"trust_remote_code must be True or False, not {self.trust_remote_code!r}.")
        if self.device is not None and not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))
        if not isinstance(self.dtype, str | torch.dtype):
            raise MoePruneError(f"dtype must be a name such as 'bfloat16' or 'auto', not {self.dtype!r}.")
        if isinstance(self.tokenizer, Path):
            object.__setattr__(self, "tokenizer", str(self.tokenizer))

    @classmethod
    def of(cls, model: Any, **settings: Any) -> ModelSource:
        """``model`` as a source; ``settings`` (None values ignored) override a given source's own."""
        given = {k: v for k, v in settings.items() if v is not None}
        if isinstance(model, ModelSource):
            return replace(model, **given) if given else model
        return cls(model, **given)

    # ---------------------------------------------------------------------------------- what it is
    @property
    def is_loaded(self) -> bool:
        return isinstance(self.model, torch.nn.Module)

    @property
    def name(self) -> str:
        """The resolved path or hub id (``bundled`` resolved to its folder); a loaded model's ``name_or_path``."""
        return model_name(self.model) if self.is_loaded else resolve_model_path(self.model)

    @property
    def local_dir(self) -> Path | None:
        """The checkpoint's folder on this machine, or None (a hub id, a loaded model)."""
        if self.is_loaded:
            return None
        path = Path(self.name)
        return path if path.is_dir() else None

    @property
    def preset(self) -> Preset:
        """The preset of the model's name (or ``preset_name``): known before loading, and the same for the model
        once loaded. The one place a verb's preset is decided."""
        return PRESETS[self.preset_name] if self.preset_name else preset_for(self.name)

    @property
    def config(self) -> Any:
        if "config" not in self._cache:
            self._cache["config"] = self.model.config if self.is_loaded \
                else load_config(self.name, self.trust_remote_code)
        return self._cache["config"]

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.config, "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 1 else None

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The checkpoint's ``quantization_config`` as a dict (None for unquantized weights). For a loaded model
        whose quantizer dequantized it (transformers then drops the field), the one in its folder's config.json."""
        value = getattr(self.config, "quantization_config", None)
        if value is None and self.is_loaded and Path(self.name, "config.json").is_file():
            value = read_config_json(self.name).get("quantization_config")
        if value is None:
            return None
        return value if isinstance(value, dict) else value.to_dict()

    @property
    def format(self) -> QuantFormat | None:
        """The quantized layout of the checkpoint (:mod:`moeprune.quant`), None when it is not quantized; a
        quantization method transformers cannot read is refused here."""
        return format_of(self.quantization, name=self.name)

    def placement(self, memory: Memory | None = None) -> str:
        """Where the weights live while the stages run: ``memory`` (the CPU or one device), ``device-map``
        (accelerate spreads them over the visible GPUs) or ``stream`` (one decoder layer at a time from disk).

        ``stream=True`` streams, ``False`` never does; ``None`` (the default) streams a local checkpoint whose weights
        in their compute dtype do not fit in :data:`~moeprune.streaming.memory.FIT_FRACTION` of the memory available
        to this process (``memory``, by default read from /proc/meminfo and the process's cgroup v1/v2 limits) plus
        the free memory of the visible GPUs, and logs one line saying why."""
        if self.stream:
            return "stream"
        if self.is_loaded:
            return "device-map" if len(getattr(self.model, "hf_device_map", None) or {}) > 1 else "memory"
        if self.stream is None and self.local_dir is not None and "placement" not in self._cache:
            host = memory or available_memory()
            gpus = _gpu_free_bytes(self.device)
            total = Memory(host.available + gpus, host.source + (f" + {gib(gpus)} free on GPUs" if gpus else ""))
            streamed, why = should_stream(self.compute_bytes(), total)
            if streamed:
                log.info("%s: %s", self.name, why)
            self._cache["placement"] = "stream" if streamed else None
        if self._cache.get("placement") == "stream" and self.stream is None:
            return "stream"
        if self.device is not None and str(self.device) == "auto":
            return "device-map"
        return "memory"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layers compute in: ``dtype``, or for "auto" the checkpoint's on a GPU and float32 on the CPU
        (as :func:`load_model` loads)."""
        dtype = parse_dtype(self.dtype)
        if dtype != "auto":
            return dtype
        on_cpu = (self.device is not None and str(self.device).startswith("cpu")) or not torch.cuda.is_available()
        return torch.float32 if on_cpu else checkpoint_dtype(self.config)

    def compute_bytes(self) -> int:
        """Bytes of the weights in their compute dtype."""
        return weight_bytes(self.config, self.compute_dtype, self.trust_remote_code)

    def open_stream(self, memory: Memory | None = None) -> DiskLayers:
        """The meta skeleton and its per-layer reader (:class:`~moeprune.streaming.layers.DiskLayers`), checked
        before any weight is read: a local safetensors checkpoint (no pickle, every shard the index names present; a
        quantized one checked as :func:`check_quantized_files` does, then dequantized layer by layer through
        transformers' quantizer), and memory enough for one decoder layer, the one read ahead and the embeddings."""
        if self.is_loaded:
            raise MoePruneError("--stream reads the weights from a checkpoint folder; pass its path, not a loaded "
                                "model (or drop --stream).")
        folder = self.local_dir
        if folder is None:
            raise MoePruneError(f"--stream reads a local checkpoint folder; {self.name} is not one (download it, e.g. "
                                "huggingface-cli download ID --local-dir DIR, and pass DIR).")
        check_quantized_files(folder)
        device = self.device if self.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
        layers = DiskLayers(folder, self.config, self.compute_dtype, _normalised(device), self.trust_remote_code,
                            hf_quantizer=dequantizing_quantizer(self.quantization))
        layers.check_fits(memory)
        return layers

    # ---------------------------------------------------------------------------------- loading it
    def load(self) -> PreTrainedModel:
        """The model, loaded (checked first) as :func:`checked_model` does; a loaded model is returned as is."""
        return checked_model(self.model, self.dtype, self.device, self.trust_remote_code)

    def load_tokenizer(self, model: Any = None) -> Any:
        """The tokenizer (given, or the model's own), checked against ``model``'s embedding when given."""
        return checked_tokenizer(self.tokenizer, model if model is not None else self.model, self.trust_remote_code)

    @classmethod
    def from_args(cls, args: Any, model: Any = None) -> ModelSource:
        """The verb's model (``args.model`` unless given) with its loading flags, as the CLI's parser made them."""
        return cls.of(model if model is not None else args.model, **given_flags(cls, args))

    def with_model(self, model: Any) -> ModelSource:
        """The same settings for another model (a loaded copy of this one, a written checkpoint)."""
        return replace(self, model=model)
