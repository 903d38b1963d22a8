"""Converting the two towers to Hugging Face checkpoints.

* Vision: the DINOv2-S/14 backbone inside the ONNX saliency model → ``Dinov2Model``. Named
  initializers keep their names, the linear weights are anonymous initializers named after
  the MatMul node that consumes them (stored transposed), and the position embedding is two
  tensors (CLS, patch grid) that are concatenated. The result is checked against the ONNX
  graph's own output (onnx reference runtime).
* LLM: SmolLM2 from the 4-bit GGUF (transformers reads and dequantizes it) → a float32
  ``LlamaForCausalLM`` + its tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .wheels import MiniBuildError

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
