"""Batched extraction of visual hidden states into one Zarr shard.

The expensive GPU step of the workflow: run once per (model, data set, settings,
image range) and cached; every analysis reads the store.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import settings_hash
from .datasets import load_dataset
from .datasets.images import BadImageError
from .models.loading import placement
from .models.preprocess import PREPROCESS
from .runtime import free_cached_memory, is_out_of_memory, resolve_device
from .store import (
    NonFiniteError,
    ShardWriter,
    StoreOverflowError,
    atomic_directory,
    check_states,
    model_attrs,
    write_vocab,
)
from .store_writer import BackgroundWriter

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
    #: what happens to an image before the model's processor (`embedlens.models.preprocess`):
    #: "native" nothing; "pad_square" pad to a square with the image processor's mean colour
    #: (LLaVA-1.5's expand2square). Changes the stored values, so it is part of `identity`.
    preprocess: str = "native"
    #: leave out the prompt text after the last visual token where the architecture allows
    #: (``ArchOverrides.truncate_after_image``): same values, less work; off only to compare
    truncate: bool = True
    #: an image the model's processor or forward rejects: "fail" names it, "skip" leaves it
    #: out and lists it in the store's ``skipped_images``
    on_bad_image: str = "fail"
    #: re-run one image of the first batch alone to prove batching does not change states
    check_batch: bool = True
    #: a model larger than one GPU: accelerate's device_map ("auto", "balanced", ...) spreads
    #: it over every device the job holds (`embedlens.devices`); None: one device. Placement
    #: only, so not part of `identity`
    device_map: str | None = None
    #: "8bit" / "4bit" bitsandbytes weights (CUDA only); quantized weights change the stored
    #: values, so it is part of `identity` (when set)
    quantization: str | None = None

    @classmethod
    def from_config(cls, section: dict | None = None, **runtime) -> "ExtractSettings":
        """Settings from a model's ``extraction`` config section (keys = field names;
        ``shard_size`` is planning, not extraction) plus ``runtime`` fields (device,
        batch size, on_bad_image) that the job gives. Absent keys keep the defaults.

        Raises
        ------
        KeyError
            a key that is no field (names it and the fields).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in (section or {}).items() if k != "shard_size"}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise KeyError(f"extraction.{unknown[0]}: not an extraction setting (settings: {sorted(fields)})")
        values.update({k: v for k, v in runtime.items() if v is not None})
        if "vision_layers" in values:
            values["vision_layers"] = tuple(values["vision_layers"])
        return cls(**values)

    def identity(self) -> dict:
        """The settings that define the stored values (batch size and device do not).

        ``preprocess`` is there only when it is not "native": the identity (and settings
        hash) of a native store is the one stores had before the option existed, so their
        caches stay valid; a reader takes a missing ``preprocess`` as "native". The same for
        ``quantization`` (absent: the checkpoint's weights)."""
        out = {"layers": self.layers, "vision_layers": list(self.vision_layers),
               "compute_dtype": self.compute_dtype, "store_dtype": self.store_dtype,
               "prompt": self.prompt}
        if self.preprocess != "native":
            out["preprocess"] = self.preprocess
        if self.quantization is not None:  # absent = full-precision weights, as before the option
            out["quantization"] = self.quantization
        return out


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


class BatchDependenceError(RuntimeError):
    """An image's states in a batch differ from the same image alone (e.g. a processor that
    pads the pixel values of a batch to its largest image)."""

    def __init__(self, image_id: str, rel: float, tol: float, batch_size: int):
        super().__init__(f"image {image_id}: states in a batch of {batch_size} differ from the image "
                         f"alone by {rel:.3g} (relative; tolerance {tol:.0e})")
        self.image_id, self.rel, self.tol, self.batch_size = image_id, rel, tol, batch_size


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    scale = float(b.abs().max().clamp_min(1e-12)) if b.numel() else 1.0
    return float((a - b).abs().max()) / scale if a.numel() else 0.0


# Largest relative difference between an image's states in a batch and alone that is float
# rounding of another kernel, not a batch effect: float32 agrees to ~1e-6 in the tests;
# half-precision kernels differ by up to ~1e-2. A padding bug changes values at O(1).
_BATCH_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def _check_batch_independence(adapter, images, chunk_ids, outputs, settings, llm_layers, vision_layers):
    """Re-run the image with the fewest visual tokens (the most padded one) alone and compare.

    Raises BatchDependenceError when the batched states differ; returns the check's record.
    """
    k = min(range(len(outputs)), key=lambda j: (outputs[j].n_tokens, -j))
    alone = adapter.forward_hidden(adapter.prepare([images[k]], settings.prompt), llm_layers, vision_layers)[0]
    tol = _BATCH_TOLERANCE.get(adapter.dtype, 5e-2)
    if alone.n_tokens != outputs[k].n_tokens:
        raise BatchDependenceError(chunk_ids[k], float("inf"), tol, len(images))
    rel = _rel_diff(outputs[k].llm, alone.llm)
    if outputs[k].vision is not None and alone.vision is not None:
        if outputs[k].vision.shape != alone.vision.shape:
            raise BatchDependenceError(chunk_ids[k], float("inf"), tol, len(images))
        rel = max(rel, _rel_diff(outputs[k].vision, alone.vision))
    if math.isnan(rel):
        return None  # non-finite states: the writer names them (NonFiniteError), not a batch effect
    if not rel <= tol:
        raise BatchDependenceError(chunk_ids[k], rel, tol, len(images))
    return {"image_id": chunk_ids[k], "batch_size": len(images), "max_rel_diff": rel, "tolerance": tol}


class _Run:
    """What one pass over a shard records beside the states (goes into the store's attrs)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.backoffs: list[str] = []
        self.skipped: list[dict] = []
        self.batch_check: dict | None = None


def _describe_image(dataset, i: int) -> str:
    meta = dataset.images[i]
    return f"image {meta['image_id']!r} ({dataset.path / meta['file']})"


def _forward(adapter, images, settings, llm_layers, vision_layers):
    return adapter.forward_hidden(adapter.prepare(images, settings.prompt), llm_layers, vision_layers)


def _forward_one_by_one(adapter, dataset, chunk, images, settings, llm_layers, vision_layers, run, batch_exc):
    """After a batch failed with `batch_exc`: each image alone, to name the image at fault.

    Returns one output per image (None for an image skipped under on_bad_image: skip). When
    every image of a batch fails alike, the fault is not an image's: the error is re-raised
    as it is, with its own message.
    """
    outputs, failures = [], []
    for i, image in zip(chunk, images):
        try:
            outputs.append(_forward(adapter, [image], settings, llm_layers, vision_layers)[0])
        except Exception as exc:  # noqa: BLE001 - named, then re-raised or recorded
            if is_out_of_memory(exc):
                raise RuntimeError(
                    f"out of memory on {adapter.device} with a single image ({_describe_image(dataset, i)}): "
                    "use a smaller compute_dtype (bfloat16/float16), fewer extraction.layers, or a "
                    "larger device") from exc
            failures.append((i, exc))
            outputs.append(None)
    if len(chunk) > 1 and len(failures) == len(chunk) and len({(type(e), str(e)) for _, e in failures}) == 1:
        raise failures[0][1]
    for i, exc in failures:
        reason = f"{type(exc).__name__}: {exc}"
        if settings.on_bad_image != "skip":
            raise BadImageError(
                str(dataset.path / dataset.images[i]["file"]),
                f"the model's processor or forward pass rejects this image ({reason}); "
                "set on_bad_image: skip to leave such images out") from exc
        log.warning("skipping %s: %s", _describe_image(dataset, i), reason)
        run.skipped.append({"image_id": dataset.images[i]["image_id"],
                            "file": dataset.images[i]["file"], "reason": reason})
    if not failures and len(chunk) > 1:
        # Every image works alone: the batch itself was the problem (e.g. a processor that
        # cannot batch these sizes). Go on one image at a time.
        log.warning("a batch of %d failed (%s: %s) but each image works alone: batch size 1 from now on",
                    len(chunk), type(batch_exc).__name__, batch_exc)
        run.backoffs.append(f"batch of {len(chunk)} failed ({type(batch_exc).__name__}), images alone work: 1")
        run.batch_size = 1
    return outputs


_TORCH_STORE_DTYPES = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}


def _host_states(image_id: str, hid, writer: ShardWriter):
    """An image's states checked where they were computed, cast to the store dtype there and
    copied to the host: (llm (layer, token, dim), vision or None) numpy arrays.

    On a GPU this moves only the stored bytes (float16: half of float32) and leaves the
    checks (one flag per layer) to the device. Raises as `embedlens.store.check_states`."""
    check_states(image_id, hid.llm, hid.vision, writer.layers, writer.vision_layers, writer.dtype)
    dt = _TORCH_STORE_DTYPES[writer.dtype]
    llm = hid.llm.to(dt).cpu().numpy()
    vision = None if hid.vision is None else hid.vision.to(dt).cpu().numpy()
    return llm, vision


def _run_batches(adapter, dataset, indices, llm_layers, vision_layers, settings, writer: BackgroundWriter,
                 progress: bool, check_batch: bool) -> _Run:
    """Forward images in batches and hand them, in order, to the background ``writer``.

    Out of memory (any device) halves the batch size and retries; any other error is
    attributed to an image by re-running the batch one image at a time: that image is
    named (fail) or skipped and recorded (skip). On the first batch of more than one image,
    one image is re-run alone to prove the batch does not change its states
    (BatchDependenceError otherwise).
    """
    run = _Run(settings.batch_size)
    pos = 0
    bar = tqdm(total=len(indices), desc="extract", unit="img", disable=not progress)
    while pos < len(indices):
        chunk = indices[pos: pos + run.batch_size]
        images = [dataset.image(i) for i in chunk]
        try:
            outputs = _forward(adapter, images, settings, llm_layers, vision_layers)
        except Exception as exc:  # noqa: BLE001 - OOM backs off; anything else is attributed
            if is_out_of_memory(exc) and run.batch_size > 1:
                run.batch_size //= 2
                free_cached_memory(adapter.device)
                run.backoffs.append(f"out of memory at batch {len(chunk)}: {run.batch_size}")
                log.warning("out of memory on %s with a batch of %d: batch size halved to %d",
                            adapter.device, len(chunk), run.batch_size)
                continue
            if len(chunk) == 1 and is_out_of_memory(exc):
                raise
            outputs = _forward_one_by_one(adapter, dataset, chunk, images, settings, llm_layers,
                                          vision_layers, run, exc)
        ids = [dataset.images[i]["image_id"] for i in chunk]
        if check_batch and run.batch_check is None and len(chunk) > 1 and all(o is not None for o in outputs):
            run.batch_check = _check_batch_independence(adapter, images, ids, outputs, settings,
                                                        llm_layers, vision_layers)
        for image_id, hid in zip(ids, outputs):
            if hid is None:
                continue
            llm, vision = _host_states(image_id, hid, writer.writer)
            # queued: the thread writes it while the next batch is computed
            writer.submit(image_id, llm, vision,
                          np.asarray(hid.patch_row), np.asarray(hid.patch_col), tuple(hid.grid),
                          vision_to_llm=None if hid.vision is None else np.asarray(hid.vision_to_llm),
                          grid_known=hid.grid_known, layout_note=hid.layout_note, checked=True)
        pos += len(chunk)
        bar.update(len(chunk))
    bar.close()
    if writer.n_submitted == 0:
        raise RuntimeError(f"no image of {dataset.path} [{indices[0]}, {indices[-1] + 1}) could be "
                           f"extracted (first reason: {run.skipped[0]['reason']}): this is not a bad "
                           "image but a model/processor problem")
    return run


def _load(adapter_cls, model_dir, dtype: str, device: str, settings: ExtractSettings, trust_remote_code: bool):
    """The model as the settings ask (dtype, device or device_map, quantization)."""
    adapter = adapter_cls.load(str(model_dir), dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               device_map=settings.device_map, quantization=settings.quantization)
    adapter.truncate = settings.truncate
    adapter.preprocess = settings.preprocess
    return adapter


def _fallback_dtype(device) -> str:
    """The dtype to retry in after float16 overflowed: bfloat16 (float32's range) where the
    device computes it natively, else float32 (bf16 on a CPU without AVX-512 is 7-75x slower)."""
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def extract_shard(model_dir: str | Path, dataset_dir: str | Path, out: str | Path, *,
                  start: int, stop: int, settings: ExtractSettings, model_name: str,
                  trust_remote_code: bool = False, revision: str | None = None,
                  progress: bool = True) -> Path:
    """Extract images [start, stop) of a materialized data set into the shard store ``out``.

    Raises
    ------
    BadImageError
        an image the model or its processor rejects, named (unless ``settings.on_bad_image``
        is "skip": then it is left out and listed in the store's ``skipped_images``).
    NonFiniteError
        NaN/inf states in float32/bfloat16, naming image and layers (float16 compute falls
        back to a wider dtype first).
    RuntimeError
        out of memory with a single image (with advice), or no image of the range extracted.
    embedlens.models.parts.UnsupportedModelError
        an architecture the adapter cannot handle, before any work.
    ValueError
        an empty image range, a bad ``on_bad_image``, layers out of range.
    """
    from .models.adapter import VLMAdapter  # heavy import, only when extracting

    dataset = load_dataset(dataset_dir)
    stop = min(stop, len(dataset.images))
    if start >= stop:
        raise ValueError(f"empty image range [{start}, {stop}) for data set {dataset_dir}")
    if settings.on_bad_image not in ("fail", "skip"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {settings.on_bad_image!r}")
    if settings.preprocess not in PREPROCESS:
        raise ValueError(f"extraction.preprocess must be one of {list(PREPROCESS)}, got {settings.preprocess!r}")
    device = resolve_device(settings.device)
    compute_dtype = settings.compute_dtype
    adapter = _load(VLMAdapter, model_dir, compute_dtype, device, settings, trust_remote_code)
    llm_layers = resolve_layers(settings.layers, adapter.num_layers + 1)
    vision_layers = list(settings.vision_layers)
    # Before any work: an architecture without a findable vision tower / layer list fails
    # here (UnsupportedModelError naming the class), and vision indices are range-checked.
    adapter.resolve_vision_layers(vision_layers)
    indices = list(range(start, stop))
    attrs = {
        "model": model_name,
        "revision": revision,
        "dataset": dataset.name,
        "image_range": [start, stop],
        "prompt": settings.prompt,
        "compute_dtype": settings.compute_dtype,
        "settings": settings.identity(),
        "settings_hash": settings_hash(settings.identity()),
        "device": device,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES") if device.startswith("cuda") else None,
        "device_map": settings.device_map,
        "model_placement": placement(adapter.model) if settings.device_map else None,
        "quantization": settings.quantization,
        "python_version": platform.python_version(),
        # model_path, num_layers, final_norm_applied_to_last_layer (the analyses read these two
        # to place layers and the logit lens), transformers/torch_version, and model_<key>
        **model_attrs(adapter.describe()),
    }
    attrs["final_norm_applied_to_last_layer"] = bool(attrs["final_norm_applied_to_last_layer"])
    store_dtype = settings.store_dtype
    check_batch = settings.check_batch
    notes: list[str] = []
    while True:
        try:
            with atomic_directory(out) as tmp:
                writer = ShardWriter(tmp, n_images=len(indices), layers=llm_layers,
                                     vision_layers=vision_layers, dtype=store_dtype,
                                     attrs={**attrs, "store_dtype_requested": settings.store_dtype})
                # the thread stops (with block) before atomic_directory removes tmp on an error
                with BackgroundWriter(writer, shard=out) as background:
                    run = _run_batches(adapter, dataset, indices, llm_layers, vision_layers,
                                       settings, background, progress, check_batch)
                    writer.attrs.update({
                        "final_batch_size": run.batch_size,
                        "batch_backoffs": run.backoffs,
                        "batch_check": run.batch_check,
                        "skipped_images": run.skipped,
                        "compute_dtype_used": compute_dtype,
                        "extraction_notes": notes,
                    })
                    background.close()
                    log.info("%s: %d images written in %.1f s by the background writer; the forward "
                             "passes waited %.1f s for it", out, background.n_submitted,
                             background.seconds_writing, background.seconds_waiting)
            return Path(out)
        except StoreOverflowError as exc:
            if store_dtype == "float32":
                raise
            # Massive activations exist in real MLLMs; keep them exact rather than inf.
            log.warning("%s; storing this shard in float32 instead", exc)
            notes.append(f"stored in float32: {exc}")
            store_dtype = "float32"
        except NonFiniteError as exc:
            if compute_dtype != "float16":
                raise NonFiniteError(exc.image_id, exc.layers, exc.vision_layers,
                                     f"computed in {compute_dtype} on {device}, so this is not a float16 "
                                     "overflow: check the model's weights for NaN/inf, or try another "
                                     "attention implementation; nothing was stored") from exc
            # float16's range (65504) is exceeded inside the model; redo the shard in a dtype
            # with float32's range rather than store or drop anything.
            compute_dtype = _fallback_dtype(device)
            log.warning("%s in float16; recomputing this shard in %s", exc, compute_dtype)
            notes.append(f"float16 gave non-finite states ({exc}); recomputed in {compute_dtype}")
            adapter = _load(VLMAdapter, model_dir, compute_dtype, device, settings, trust_remote_code)
        except BatchDependenceError as exc:
            log.warning("%s; extracting this shard one image at a time", exc)
            notes.append(f"batch dependence detected ({exc}); extracted with batch size 1")
            settings = replace(settings, batch_size=1)
            check_batch = False


def shard_ranges(n_images: int, shard_size: int) -> list[tuple[int, int]]:
    """Image ranges of the extraction shards: [(0, s), (s, 2s), ...]."""
    return [(i, min(i + shard_size, n_images)) for i in range(0, n_images, shard_size)]


def export_vocab(model_dir: str | Path, out: str | Path, *, model_name: str,
                 trust_remote_code: bool = False) -> tuple[int, int]:
    """Store a model's input-embedding matrix E, token strings (raw pieces), their decoded
    texts (``VLMAdapter.token_texts``) and special-token flags as ``vocab.zarr`` (format:
    docs/architecture.md); returns E's shape (V, d).

    Raises
    ------
    embedlens.models.parts.UnsupportedModelError
        no input embeddings or tokenizer found (names the class).
    """
    from .models.adapter import VLMAdapter  # heavy import, only when exporting

    adapter = VLMAdapter.load(str(model_dir), dtype="float32", device="cpu",
                              trust_remote_code=trust_remote_code)
    emb = adapter.embedding_matrix().float().cpu().numpy()
    write_vocab(out, emb, adapter.token_strings(), adapter.special_token_ids(),
                {"model": model_name, **model_attrs(adapter.describe())}, token_texts=adapter.token_texts())
    return int(emb.shape[0]), int(emb.shape[1])
