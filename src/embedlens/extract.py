"""Batched extraction of visual hidden states into one Zarr shard.

The expensive GPU step of the workflow: run once per (model, data set, settings,
image range) and cached; every analysis reads the store.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from .config import settings_hash
from .datasets import load_dataset
from .store import ShardWriter, StoreOverflowError, atomic_directory

log = logging.getLogger("embedlens.extract")


@dataclass
class ExtractSettings:
    """Everything that changes the stored values (hashed into the store's attributes)."""

    layers: object = "all"           # "all" or list of hidden_states indices
    vision_layers: tuple = (-1,)
    compute_dtype: str = "float32"
    store_dtype: str = "float16"
    device: str = "auto"
    batch_size: int = 8
    prompt: str = "Describe the image."
    #: leave out the prompt text after the last visual token where the architecture allows
    #: (``ArchOverrides.truncate_after_image``): same values, less work; off only to compare
    truncate: bool = True

    def identity(self) -> dict:
        """The settings that define the stored values (batch size and device do not)."""
        return {"layers": self.layers, "vision_layers": list(self.vision_layers),
                "compute_dtype": self.compute_dtype, "store_dtype": self.store_dtype,
                "prompt": self.prompt}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("extraction.device is 'cuda' but no CUDA device is visible; "
                           "set extraction.device: auto or cpu")
    return device


def resolve_layers(spec, n_hidden: int) -> list[int]:
    """'all' or a list with negative indices -> sorted unique non-negative indices."""
    if spec == "all":
        return list(range(n_hidden))
    out = []
    for layer in spec:
        idx = layer + n_hidden if layer < 0 else layer
        if not 0 <= idx < n_hidden:
            raise ValueError(f"layer {layer} out of range: the model has {n_hidden} hidden "
                             f"states (0 = decoder input .. {n_hidden - 1})")
        out.append(idx)
    return sorted(set(out))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _run_batches(adapter, dataset, indices, llm_layers, vision_layers, settings, writer,
                 progress: bool) -> int:
    """Forward images in batches; halve the batch on CUDA OOM. Returns the final batch size."""
    batch_size = settings.batch_size
    pos = 0
    bar = tqdm(total=len(indices), desc="extract", unit="img", disable=not progress)
    while pos < len(indices):
        chunk = indices[pos: pos + batch_size]
        images = [dataset.image(i) for i in chunk]
        try:
            batch = adapter.prepare(images, settings.prompt)
            outputs = adapter.forward_hidden(batch, llm_layers, vision_layers)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if adapter.device.startswith("cuda") and _is_oom(exc) and batch_size > 1:
                batch_size //= 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: batch size halved to %d", batch_size)
                continue
            raise
        for offset, (i, hid) in enumerate(zip(chunk, outputs)):
            vision = None if hid.vision is None else hid.vision.float().cpu().numpy()
            writer.write(pos + offset, dataset.images[i]["image_id"],
                         hid.llm.float().cpu().numpy(), vision,
                         np.asarray(hid.patch_row), np.asarray(hid.patch_col), tuple(hid.grid),
                         vision_to_llm=None if hid.vision is None else np.asarray(hid.vision_to_llm))
        pos += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return batch_size


def extract_shard(model_dir: str | Path, dataset_dir: str | Path, out: str | Path, *,
                  start: int, stop: int, settings: ExtractSettings, model_name: str,
                  trust_remote_code: bool = False, revision: str | None = None,
                  progress: bool = True) -> Path:
    """Extract images [start, stop) of a materialized data set into the shard store ``out``."""
    from .models.adapter import VLMAdapter  # heavy import, only when extracting

    dataset = load_dataset(dataset_dir)
    stop = min(stop, len(dataset.images))
    if start >= stop:
        raise ValueError(f"empty image range [{start}, {stop}) for data set {dataset_dir}")
    device = resolve_device(settings.device)
    adapter = VLMAdapter.load(str(model_dir), dtype=settings.compute_dtype, device=device,
                              trust_remote_code=trust_remote_code)
    adapter.truncate = settings.truncate
    llm_layers = resolve_layers(settings.layers, adapter.num_layers + 1)
    vision_layers = list(settings.vision_layers)
    indices = list(range(start, stop))
    attrs = {
        "model": model_name,
        "model_path": str(model_dir),
        "revision": revision,
        "dataset": dataset.name,
        "image_range": [start, stop],
        "prompt": settings.prompt,
        "compute_dtype": settings.compute_dtype,
        "settings": settings.identity(),
        "settings_hash": settings_hash(settings.identity()),
        "device": device,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **{f"model_{k}": v for k, v in adapter.describe().items()},
        # Unprefixed: the analyses read these two to place layers and the logit lens.
        "num_layers": adapter.num_layers,
        "final_norm_applied_to_last_layer": bool(adapter.final_norm_applied_to_last_layer),
    }
    store_dtype = settings.store_dtype
    while True:
        try:
            with atomic_directory(out) as tmp:
                writer = ShardWriter(tmp, n_images=len(indices), layers=llm_layers,
                                     vision_layers=vision_layers, dtype=store_dtype,
                                     attrs={**attrs, "store_dtype_requested": settings.store_dtype})
                used = _run_batches(adapter, dataset, indices, llm_layers, vision_layers,
                                    settings, writer, progress)
                writer.attrs["final_batch_size"] = used
                writer.close()
            return Path(out)
        except StoreOverflowError as exc:
            if store_dtype == "float32":
                raise
            # Massive activations exist in real MLLMs; keep them exact rather than inf.
            log.warning("%s; storing this shard in float32 instead", exc)
            store_dtype = "float32"


def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    """Image ranges of the extraction shards: [(0, s), (s, 2s), ...]."""
    return [(i, min(i + shard_size, n_images)) for i in range(0, n_images, shard_size)]
