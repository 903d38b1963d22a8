"""Loading a VLM and its processor from a local directory: the one place that does it.

Every consumer (extraction through `VLMAdapter.load`, the compression benchmark, projector
training and evaluation of embedlens-mini) loads through `load_model` / `load_processor`, so
the auto-class order, the dtype names, the device move and the attention-implementation
fallback are the same everywhere.

Sources: transformers' ``from_pretrained`` (``dtype``, ``attn_implementation``,
``trust_remote_code``, ``local_files_only``), and its processor classes' ``get_attributes``
/ ``from_args_and_dict`` for the processor without a video processor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: dtype names accepted wherever a dtype is configured (config.yaml, CLI, API)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# Auto classes tried in order: the first that recognises the config loads the model.
_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")

# Words by which a loading error names an attention implementation that cannot be used
# (transformers says "... does not support an attention implementation through
# torch.nn.functional.scaled_dot_product_attention ..." for sdpa).
_ATTN_ERROR_WORDS = {"sdpa": ("sdpa", "scaled_dot_product")}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name in `DTYPES` (case-insensitive) or a torch dtype.

    Raises:
        ValueError: the name is not one of `DTYPES`.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


# --------------------------------------------------------------------------- processor


@contextlib.contextmanager
def optional_video_processor():
    """Let processors that declare a video processor be built without one.

    transformers 5 makes the video processor of Qwen-VL-style processors mandatory and only
    implements video processors with torchvision, so image-only use on a machine without
    torchvision fails although no video is ever processed. Inside this context a `None`
    video processor passes the processor's class check.
    """
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument is None and "video" in argument_name:
            return None
        return original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def load_processor(path: str | Path, trust_remote_code: bool = False, local_files_only: bool = False):
    """The processor saved in `path` (``AutoProcessor``).

    When ``AutoProcessor`` fails, the processor is rebuilt from its parts without its video
    processor (see `optional_video_processor`); if that is not possible either, the first
    error is raised.

    Raises:
        Exception: whatever ``AutoProcessor.from_pretrained`` raised (OSError for missing
            files, ImportError for a missing optional dependency, ...).
    """
    from transformers import AutoProcessor

    path = Path(path)
    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        return AutoProcessor.from_pretrained(path, **kw)
    except Exception as first:  # noqa: BLE001 - retry without the video processor, else re-raise
        try:
            proc = _load_processor_without_video(path, **kw)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            proc = None
        if proc is None:
            raise
        log.info("loaded %s without its video processor (%s)", type(proc).__name__, first)
        return proc


def _load_processor_without_video(path: Path, trust_remote_code: bool, local_files_only: bool):
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cfg_file = next(
        (path / n for n in ("processor_config.json", "preprocessor_config.json") if (path / n).is_file()),
        None,
    )
    if cfg_file is None:
        return None
    name = json.loads(cfg_file.read_text()).get("processor_class")
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in cls.get_attributes():
        return None
    kw = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    args = []
    for attr in cls.get_attributes():
        if attr == "tokenizer":
            args.append(AutoTokenizer.from_pretrained(path, **kw))
        elif attr == "image_processor":
            args.append(AutoImageProcessor.from_pretrained(path, **kw))
        elif attr == "video_processor":
            args.append(None)
        else:
            return None
    processor_dict, _ = cls.get_processor_dict(path)
    with optional_video_processor():
        return cls.from_args_and_dict(args, processor_dict)


# --------------------------------------------------------------------------- model


def _from_auto_classes(path: Path, kwargs: dict[str, Any]):
    import transformers

    errors = []
    for auto in _AUTO_CLASSES:
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(path, **kwargs)
        except ValueError as exc:  # "Unrecognized configuration class ..." -> try the next auto class
            errors.append(f"{auto}: {exc}")
    raise ValueError(f"no transformers auto class can load {path} as a vision-language model:\n" + "\n".join(errors))


def _names_attention(exc: Exception, impl: str) -> bool:
    msg = str(exc).lower()
    return any(w in msg for w in _ATTN_ERROR_WORDS.get(impl, (impl,)))


#: ``quantization`` values: 8-bit (LLM.int8) or 4-bit (NF4) weights through bitsandbytes
QUANTIZATIONS = ("8bit", "4bit")


def quantization_config(quantization: str | None, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` ("8bit", "4bit"; None: None).

    Quantized weights change the values a model computes: the states of a quantized model
    are not the checkpoint's (the store records ``quantization``; its settings hash differs).

    Raises:
        ValueError: an unknown ``quantization``.
        RuntimeError: bitsandbytes is not installed, or no CUDA device is visible (it is
            CUDA-only); the message says what to do.
    """
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or null, got {quantization!r}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"quantization: {quantization!r} needs the bitsandbytes package, which is not "
                           "installed (it is CUDA-only and not in the project's lock): `pip install "
                           "bitsandbytes` into this environment on a CUDA machine, or set quantization: null")
    if not torch.cuda.is_available():
        raise RuntimeError(f"quantization: {quantization!r} (bitsandbytes) needs a CUDA GPU and none is "
                           "visible; set quantization: null to load the full-precision weights")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | Sequence[str] | None = None,
    local_files_only: bool = False,
    device_map: str | dict | None = None,
    quantization: str | None = None,
) -> torch.nn.Module:
    """The model saved in `path`, in `dtype`, on `device`, in eval mode.

    ``device_map`` (a model larger than one GPU): None moves the whole model to `device`;
    ``"auto"``/``"balanced"``/``"sequential"`` (or an explicit module → device dict) lets
    accelerate spread its layers over every device the process sees (`device` is then
    unused; activations move between devices at layer boundaries, the values are the same).
    ``quantization`` ("8bit", "4bit"): bitsandbytes weights (`quantization_config`; CUDA
    only, placed by ``device_map``, "auto" when not given); they change the values computed.

    The first of ``AutoModelForImageTextToText``, ``AutoModelForVision2Seq``,
    ``AutoModelForCausalLM`` that recognises the config loads it. `attn_implementation`:
    None (transformers' default), one name (``"sdpa"``, ``"eager"``...), or several in order
    of preference: a name the model cannot use (the loading error names it) falls back to the
    next one, so ``("sdpa", "eager")`` gives eager attention to a model without sdpa.

    Raises:
        ValueError: `dtype` is unknown, or no auto class recognises the config (the message
            lists each class's error), or no implementation of `attn_implementation` loads.
        ImportError: an attention implementation needs a package that is not installed
            (raised for the last preference).
    """
    path = Path(path)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if local_files_only:
        kwargs["local_files_only"] = True
    quant = quantization_config(quantization, kwargs["dtype"])
    if quant is not None:
        kwargs["quantization_config"] = quant
        device_map = device_map or "auto"  # a bitsandbytes model cannot be moved after loading
    if device_map is not None:
        _require_accelerate()
        kwargs["device_map"] = device_map
    prefs = [attn_implementation] if isinstance(attn_implementation, str) or attn_implementation is None \
        else list(attn_implementation)
    if not prefs:
        raise ValueError("attn_implementation: an empty list of preferences")
    for i, impl in enumerate(prefs):
        kw = dict(kwargs, attn_implementation=impl) if impl else kwargs
        try:
            model = _from_auto_classes(path, kw)
            break
        except (ValueError, ImportError) as exc:
            # only an error about this implementation moves on to the next preference
            if i + 1 == len(prefs) or not impl or not _names_attention(exc, impl):
                raise
            log.info("%s: attention %r unavailable, trying %r (%s)", path, impl, prefs[i + 1], exc)
    if device_map is None:
        model.to(device)
    return model.eval()


def _require_accelerate() -> None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise RuntimeError("device_map needs the accelerate package (in envs/lock-py311.txt): install the "
                           "project's environment, or set device_map: null to load onto one device")


def placement(model: torch.nn.Module) -> dict[str, int]:
    """Where a model's weights are: ``{device: number of parameter tensors}`` (for the store's
    provenance of a model loaded with a ``device_map``; accelerate's own ``hf_device_map``
    is absent when the map puts everything on one device). Raises nothing."""
    out: dict[str, int] = {}
    for p in model.parameters():
        out[str(p.device)] = out.get(str(p.device), 0) + 1
    return out
