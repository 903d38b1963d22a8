"""LoRA adapters on the LLM of embedlens-mini v2 (peft): adding, saving, merging; and the
rule that picks the training dtype from what the CPU supports.

Adapters go on every linear layer of the language model's decoder (attention q/k/v/o and
MLP gate/up/down of each layer), rank 16, alpha 32, no dropout; not on the tied LM head /
input embeddings (a LoRA there would untie them) and not on the vision tower or projector
(the projector is trained in full). The build merges the adapter into the weights
(``merge_and_unload``), so the saved model is a plain ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LORA_RANK = 16
LORA_ALPHA = 32
#: every linear layer of a Llama decoder layer, under the VLM's language model only
LORA_TARGET_REGEX = r".*language_model\.(?:model\.)?layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: what adapter_config.json records as the base model (the v1 build the adapter was trained on)
BASE_MODEL_NAME = "embedlens-mini (version 1 build)"


def lora_config(rank: int = LORA_RANK, alpha: int = LORA_ALPHA):
    """The peft ``LoraConfig`` of v2 (targets: `LORA_TARGET_REGEX`)."""
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=int(alpha), lora_dropout=0.0, bias="none",
                      target_modules=LORA_TARGET_REGEX, init_lora_weights=True)


def add_lora(model, rank: int = LORA_RANK, alpha: int = LORA_ALPHA, seed: int = 0):
    """Wrap ``model`` in a peft ``PeftModel`` with fresh adapters (A seeded, B zero, so the
    wrapped model computes exactly what ``model`` did). Only the adapters are trainable
    afterwards; the caller unfreezes anything else it trains.

    Raises:
        ValueError: no module of ``model`` matches the targets (not a Llama-style decoder).
    """
    from peft import get_peft_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(rank, alpha))
    finally:
        torch.random.set_rng_state(state)
    if n_lora_params(peft_model) == 0:
        raise ValueError("add_lora: no linear layer of the language model matched the LoRA targets")
    return peft_model


def n_lora_params(model) -> int:
    return int(sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))


def save_adapter(peft_model, out_dir: Path | str) -> Path:
    """Write the adapter (``adapter_model.safetensors``, float32, + ``adapter_config.json``)."""
    out_dir = Path(out_dir)
    # peft records the base model's path: a temporary build directory here, which would make
    # the config differ run to run (and name a path that no longer exists); record the name
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = BASE_MODEL_NAME
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    readme = out_dir / "README.md"  # peft's model-card stub: the project's card documents the adapter
    if readme.is_file():
        readme.unlink()
    return out_dir


def merge_adapter(model, adapter_dir: Path | str):
    """``model`` with the adapter in ``adapter_dir`` merged into its linear weights
    (``PeftModel.from_pretrained`` then ``merge_and_unload``): the returned model has the
    original class and module names, so it saves and loads without peft.

    Raises:
        FileNotFoundError: ``adapter_dir`` lacks the adapter files.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (adapter_dir / f).is_file():
            raise FileNotFoundError(f"LoRA adapter: {adapter_dir / f} is missing (train it with "
                                    "`embedlens train-mini-v2`, or build version 1)")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload()


# --------------------------------------------------------------------------------------
# dtype rule
# --------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: Path | str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty when unreadable)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def autocast_dtype(device_type: str = "cpu", flags: set[str] | None = None,
                   cuda_bf16: bool | None = None) -> torch.dtype:
    """The dtype to train in (autocast; the weights stay float32).

    CPU: ``bfloat16`` only when the CPU multiplies bf16 natively (``avx512_bf16`` or
    ``amx_bf16`` among its flags); otherwise ``float32``, because without them bf16 matrix
    products were measured 7-75x slower than float32 (``shared/spec/embedded-model.md``).
    CUDA: ``bfloat16`` when the GPU supports it, else ``float32``. ``EMBEDLENS_TRAIN_DTYPE``
    (``float32``/``bfloat16``) overrides the rule. ``flags``: the CPU flags (default: read
    from ``/proc/cpuinfo``).

    Raises:
        ValueError: ``EMBEDLENS_TRAIN_DTYPE`` holds another value.
    """
    forced = os.environ.get("EMBEDLENS_TRAIN_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"EMBEDLENS_TRAIN_DTYPE={forced!r}: use float32 or bfloat16")
        return getattr(torch, forced)
    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return torch.bfloat16 if ok else torch.float32
    flags = cpu_flags() if flags is None else flags
    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32
