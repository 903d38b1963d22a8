"""One generic adapter over the transformers VLM API.

`VLMAdapter` loads any image-text-to-text model with its processor and returns, per image,
the decoder hidden states at the visual positions (`input_ids == image_token_id`) for the
requested layers plus the vision encoder's hidden states. Everything model-specific that the
transformers API does not expose (patch grid, packed vision outputs, prompt placeholder when
there is no chat template) comes from `embedlens.models.overrides`; loading, the lookup of
the model's parts and the prompt format come from `embedlens.models.loading`, `.parts` and
`.prompt`, and the adapter exposes them (`decoder_layers`, `attention`, `mlp`,
`image_token_id`, `text_config`, `attn_implementation`, `format_prompt`).

Layer indices follow HF `output_hidden_states`: for the decoder, 0 = the decoder input (the
projector output at visual positions), l = output of decoder layer l, negative indices count
from the end. HF applies the final norm to the last entry; `final_norm_applied_to_last_layer`
records that, and `forward_hidden(..., prenorm_last=True)` returns the raw output of the last
layer instead.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedlens.models import parts, prompt as _prompt
from embedlens.models.loading import load_model, load_processor
from embedlens.models.loading import optional_video_processor  # noqa: F401 - re-export (tiny builders import it here)
from embedlens.models.overrides import ImageContext, TokenLayout, get_overrides
from embedlens.models.parts import UnsupportedModelError  # noqa: F401 - re-export: callers catch it from here
from embedlens.models.preprocess import preprocess_images

@dataclass
class ImageHidden:
    """Hidden states of one image's visual tokens.

    llm: (n_layers, n_tok, d) decoder states at the visual positions, layers as requested.
    vision: (n_vlayers, n_vtok, vd) vision-encoder states (all crops/tiles), or None.
    patch_row, patch_col: (n_tok,) int32 position in the `grid` (-1 = no image patch).
    grid: (R, C); (0, 0) when the grid is unknown (`grid_known` False).
    positions: (n_tok,) sequence positions of the visual tokens in the prepared batch row.
    view: (n_tok,) int8, 0 = base/global view, 1 = crop/tile, -1 = no patch (separator).
    vision_to_llm: (n_vtok,) int32 index of the visual token each vision token feeds (-1 none),
        or None when vision states were not requested or the mapping is unknown.
    """

    llm: torch.Tensor
    vision: torch.Tensor | None
    patch_row: np.ndarray
    patch_col: np.ndarray
    grid: tuple[int, int]
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    view: np.ndarray | None = None
    vision_to_llm: np.ndarray | None = None
    layout_note: str = ""
    #: False when the architecture's patch grid is unknown for this image (then grid = (0, 0)
    #: and every patch_row/patch_col is -1; `layout_note` says why)
    grid_known: bool = True

    @property
    def n_tokens(self) -> int:
        return int(self.llm.shape[1])


@dataclass
class PreparedBatch:
    """A padded (right-padded) batch, one image per row, ready for `forward_hidden`."""

    inputs: dict[str, torch.Tensor]
    texts: list[str]
    image_positions: list[np.ndarray]  # per row: positions of the visual tokens
    layouts: list[TokenLayout]
    contexts: list[ImageContext]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_tokens(self) -> list[int]:
        return [len(p) for p in self.image_positions]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.inputs[key]

    def keys(self):
        return self.inputs.keys()


# --------------------------------------------------------------------------- inputs


def _image_hw(image) -> tuple[int, int] | None:
    """(height, width) of a PIL image or an image array (channel axis inferred as transformers'
    image processors do), or None when it cannot be told."""
    if hasattr(image, "height") and hasattr(image, "width"):
        return int(image.height), int(image.width)
    try:
        from transformers.image_utils import get_image_size

        h, w = get_image_size(np.asarray(image))
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - an unknown size only makes the tiled grid unknown
        return None


_PER_TOKEN_KEYS = ("input_ids", "attention_mask")


def _truncate_after(inputs: dict[str, torch.Tensor], cut: int) -> dict[str, torch.Tensor]:
    """``inputs`` without the token columns from ``cut`` on. With causal attention no visual
    token sees them, so the visual tokens' hidden states do not change. Any other per-token
    tensor the adapter does not know keeps the sequence whole (nothing is cut)."""
    ids = inputs["input_ids"]
    B, P = ids.shape
    if cut >= P:
        return inputs
    per_token = {k for k, v in inputs.items() if v.dim() >= 2 and tuple(v.shape[:2]) == (B, P)}
    if any(k not in _PER_TOKEN_KEYS and not k.endswith("token_type_ids") for k in per_token):
        return inputs
    return {k: (v[:, :cut] if k in per_token else v) for k, v in inputs.items()}


# --------------------------------------------------------------------------- adapter


class VLMAdapter:
    """Generic access to a Hugging Face VLM: its parts, its prompt format, and the hidden
    states of its visual tokens.

    Model facts come from `embedlens.models.parts` (decoder, layers, sublayers, image token
    id, text config, attention implementation), `embedlens.models.prompt` (prompt format)
    and `embedlens.models.overrides` (per-architecture facts); the compression benchmark and
    embedlens-mini read them from here rather than from the model.

    Raises (at construction):
        UnsupportedModelError: no image token id or no decoder layer list (class named).
    """

    def __init__(self, model, processor, path: str | Path | None = None):
        self.model = model.eval()
        self.processor = processor
        self.path = Path(path) if path is not None else None
        self.config = model.config
        self.model_type = getattr(self.config, "model_type", "")
        self.overrides = get_overrides(self.model_type)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            # Right padding needs some pad id; it is never attended to.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.image_token_id = parts.image_token_id(model, processor)
        self._decoder = parts.decoder_of(model)
        self._vision_layers_list = None
        #: leave out the text after the last visual token where the architecture allows it
        #: (`ArchOverrides.truncate_after_image`); the states are the same, the work less
        self.truncate = True
        #: what `prepare` does to an image before the processor (`embedlens.models.preprocess`):
        #: "native" (nothing) or "pad_square" (LLaVA-1.5's expand2square, any architecture)
        self.preprocess = "native"

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        attn_implementation: str | Sequence[str] | None = None,
        local_files_only: bool = False,
        device_map: str | dict | None = None,
        quantization: str | None = None,
    ) -> "VLMAdapter":
        """Load model and processor from a local directory (see `embedlens.models.resolve`)
        through `embedlens.models.loading`: `dtype` by name or torch dtype, the model moved
        to `device`; `attn_implementation` one name or several in order of preference
        (``("sdpa", "eager")`` falls back to eager where sdpa is unsupported); `device_map`
        and `quantization` as `embedlens.models.loading.load_model` (a model over several
        GPUs, 8/4-bit weights).

        Raises:
            ValueError: unknown dtype, or no auto class / attention implementation loads it.
            RuntimeError: quantization without bitsandbytes or CUDA, device_map without accelerate.
            UnsupportedModelError: see the class.
        """
        path = Path(path)
        processor = load_processor(path, trust_remote_code, local_files_only=local_files_only)
        model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation, local_files_only=local_files_only,
                           device_map=device_map, quantization=quantization)
        return cls(model, processor, path)

    # ------------------------------------------------------------------ parts
    @property
    def decoder(self) -> torch.nn.Module:
        """The decoder stack (the module holding `decoder_layers`)."""
        return self._decoder

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        """The decoder layers, (num_layers,) in order."""
        return self._decoder.layers

    def attention(self, layer: int) -> torch.nn.Module:
        """The self-attention sublayer of decoder layer `layer` (raises UnsupportedModelError)."""
        return parts.attention_of(self._decoder.layers[layer])

    def mlp(self, layer: int) -> torch.nn.Module:
        """The MLP sublayer of decoder layer `layer` (raises UnsupportedModelError)."""
        return parts.mlp_of(self._decoder.layers[layer])

    @property
    def attn_implementation(self) -> str:
        """The decoder's attention implementation (``"sdpa"``, ``"eager"``...)."""
        return parts.attn_implementation(self.model)

    @property
    def projector(self) -> torch.nn.Module:
        """The multimodal projector (LLaVA-style models; raises UnsupportedModelError)."""
        return parts.projector_of(self.model)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # the first floating-point parameter: an 8-bit model's first weights may be int8
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                    next(self.model.parameters()).dtype)

    @property
    def text_config(self):
        """The language model's config (`parts.text_config`)."""
        return parts.text_config(self.config)

    @property
    def num_layers(self) -> int:
        return len(self._decoder.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def vision_config(self):
        return getattr(self.config, "vision_config", None)

    @property
    def num_vision_layers(self) -> int:
        return len(self._vision_layers())

    def _num_vision_layers_or_none(self) -> int | None:
        try:
            return self.num_vision_layers
        except ValueError:
            return None

    @property
    def final_norm(self) -> torch.nn.Module:
        return parts.final_norm_of(self._decoder)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def final_norm_applied_to_last_layer(self) -> bool:
        """True when the last `output_hidden_states` entry is the final-norm output (HF default)."""
        tie = getattr(self._decoder.config, "tie_last_hidden_states", None)
        return True if tie is None else bool(tie)

    # ------------------------------------------------------------------ vocabulary
    def embedding_matrix(self) -> torch.Tensor:
        """(V, d) float32 input embeddings on CPU (unscaled: Gemma's sqrt(d) factor is not applied)."""
        return self.model.get_input_embeddings().weight.detach().to("cpu", torch.float32).clone()

    def token_strings(self) -> list[str]:
        """Vocabulary strings as stored in the tokenizer (e.g. "▁jav", "Ġred"), one per embedding
        row; rows the tokenizer never produces (padding of the embedding matrix) get ""."""
        n = self.vocab_size
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(n, len(self.tokenizer)))))
        out = [t if isinstance(t, str) else "" for t in tokens]
        return out + [""] * (n - len(out))

    def token_texts(self) -> list[str | None]:
        """Each vocabulary piece decoded for reading ("▁jav" → "jav", "Ġred" → "red"): the
        tokenizer's ``convert_tokens_to_string`` of the piece alone, spaces around it
        stripped (a piece that is only whitespace kept). None where the tokenizer cannot
        decode a piece (or has no such method): the vocabulary store then takes
        ``embedlens.store.display_token`` of it. "" past the tokenizer."""
        convert = getattr(self.tokenizer, "convert_tokens_to_string", None)
        out: list[str | None] = []
        for piece in self.token_strings():
            if piece == "" or convert is None:
                out.append("" if piece == "" else None)
                continue
            try:
                text = convert([piece])
            except Exception:  # noqa: BLE001 - a piece the tokenizer cannot decode gets the fallback
                out.append(None)
                continue
            # "\ufffd": a piece holding part of a multi-byte character decodes to nothing readable
            out.append(None if not isinstance(text, str) or "\ufffd" in text else (text.strip(" ") or text))
        return out

    def special_token_ids(self) -> set[int]:
        """Ids excluded from lens candidates: special and added tokens (image, pad, control...)
        plus embedding rows beyond the tokenizer (never produced, untrained padding)."""
        ids = set(int(i) for i in getattr(self.tokenizer, "all_special_ids", []))
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        ids.update(int(i) for i in decoder)
        ids.add(int(self.image_token_id))
        n_tok = len(self.tokenizer)
        ids.update(range(n_tok, self.vocab_size))
        return {i for i in ids if 0 <= i < self.vocab_size}

    def describe(self) -> dict:
        """Provenance of the loaded model (JSON-serialisable)."""
        import transformers

        arch = (getattr(self.config, "architectures", None) or [type(self.model).__name__])[0]
        vc = self.vision_config
        return {
            "architecture": arch,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tokenizer_size": len(self.tokenizer),
            "image_token_id": int(self.image_token_id),
            "vision_model_type": getattr(vc, "model_type", None),
            "num_vision_layers": self._num_vision_layers_or_none(),
            "vision_hidden_size": int(getattr(vc, "hidden_size", 0) or 0) or None,
            "final_norm_applied_to_last_layer": self.final_norm_applied_to_last_layer,
            "embed_scale": float(getattr(self.model.get_input_embeddings(), "embed_scale", 1.0)),
            "chat_template": bool(getattr(self.processor, "chat_template", None)),
            "dtype": str(self.dtype).replace("torch.", ""),
            "path": str(self.path) if self.path else None,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }

    # ------------------------------------------------------------------ inputs
    def format_prompt(self, prompt: str) -> str:
        """The text for one image + `prompt` (`embedlens.models.prompt.format_prompt`): the
        chat template's user turn with the generation prompt when the processor has a
        template, else the architecture's placeholder."""
        return _prompt.format_prompt(self.processor, prompt, self.overrides.placeholder)

    def prepare(self, images: Sequence[Any], prompt: str | Sequence[str]) -> PreparedBatch:
        """Processor inputs for `images` (one per row) with `prompt` (one, or one per image),
        right-padded to the longest row; each image first goes through `self.preprocess`
        (`embedlens.models.preprocess`: "pad_square" pads it to a square with the image
        processor's mean colour, as LLaVA-1.5's released code did)."""
        images = list(images)
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        texts = [self.format_prompt(p) for p in prompts]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        images = preprocess_images(images, self.processor, self.preprocess)
        # padding_side explicitly: processors pass the tokenizer's saved init kwargs (some real
        # checkpoints save "left") as call defaults, overriding the tokenizer attribute
        kwargs = dict(padding=True, padding_side="right", return_tensors="pt", **self.overrides.processor_kwargs())
        # One list of images per prompt: the unambiguous form every processor accepts (some,
        # e.g. Idefics3 and Gemma 3, read a flat list as several images for one prompt).
        batch = self.processor(images=[[im] for im in images], text=texts, **kwargs)
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}

        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise RuntimeError(f"{type(self.processor).__name__} did not pad on the right")
        visual = (ids == self.image_token_id) & mask.bool()
        positions, layouts, contexts = [], [], []
        for i in range(len(images)):
            pos = torch.nonzero(visual[i]).flatten().numpy()
            if len(pos) == 0:
                raise ValueError(f"image {i}: the processor produced no image tokens (id {self.image_token_id})")
            # the original (height, width): tiling processors (InternVL, Aya Vision) choose the
            # tile arrangement from it and do not return it, so the overrides redo that choice
            ctx = ImageContext(self.config, self.processor, inputs, i, ids[i].numpy(), pos,
                               extra={"image_size": _image_hw(images[i])})
            layout = self.overrides.layout(ctx)
            if len(layout.patch_row) != len(pos):
                raise ValueError(f"image {i}: layout covers {len(layout.patch_row)} tokens, found {len(pos)}")
            positions.append(pos)
            layouts.append(layout)
            contexts.append(ctx)
        return PreparedBatch(inputs, texts, positions, layouts, contexts)

    # ------------------------------------------------------------------ forward
    def _vision_tower(self) -> torch.nn.Module:
        return parts.vision_tower_of(self.model)

    def _vision_layers(self) -> torch.nn.ModuleList:
        if self._vision_layers_list is None:
            self._vision_layers_list = parts.vision_layers_of(self.model)
        return self._vision_layers_list

    @staticmethod
    def _normalize(indices: Sequence[int] | None, n: int, what: str) -> list[int]:
        if indices is None:
            return list(range(n))
        out = []
        for i in indices:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"{what} index {i} out of range for {n} hidden states")
            out.append(i % n)
        return out

    def resolve_llm_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Non-negative hidden_states indices (0..num_layers) for `layers` (None = all)."""
        return self._normalize(layers, self.num_layers + 1, "llm layer")

    def resolve_vision_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Non-negative vision hidden_states indices (0..num_vision_layers); None/[] = none."""
        if not layers:
            return []
        return self._normalize(layers, self.num_vision_layers + 1, "vision layer")

    @contextlib.contextmanager
    def _capture(self, vision_idx: list[int], prenorm_last: bool):
        """Forward hooks recording vision layer outputs (and the last decoder layer's raw output)."""
        store: dict[str, Any] = {"vision": {}, "last": None}
        handles = []

        def out_of(output):
            return output[0] if isinstance(output, (tuple, list)) else output

        if vision_idx:
            layers = self._vision_layers()
            if 0 in vision_idx:

                def pre(module, args, kwargs):
                    if args:
                        h = args[0]
                    else:  # by keyword, under the layer's own name for it (Llama 4: hidden_state)
                        h = kwargs[next(iter(inspect.signature(module.forward).parameters))]
                    store["vision"].setdefault(0, []).append(h.detach())

                handles.append(layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            for k in vision_idx:
                if k == 0:
                    continue

                def hook(module, args, output, k=k):
                    store["vision"].setdefault(k, []).append(out_of(output).detach())

                handles.append(layers[k - 1].register_forward_hook(hook))
        if prenorm_last:

            def last(module, args, output):
                store["last"] = out_of(output).detach()

            handles.append(self._decoder.layers[-1].register_forward_hook(last))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def _model_kwargs(self, llm_idx: list[int]) -> dict:
        params = inspect.signature(self.model.forward).parameters
        # A flag, never a list of indices: transformers 5 forwards `output_hidden_states` to
        # every sub-model, so a list selecting decoder layers also selects the *vision
        # tower's* layers and breaks the projector's own feature-layer read (LLaVA reads
        # vision layer -2). The unwanted decoder layers are dropped right after the forward.
        kw = {"output_hidden_states": bool(llm_idx), "return_dict": True}
        if "use_cache" in params:
            kw["use_cache"] = False
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = 1  # logits are not needed; keep the LM head cheap
        return kw

    def forward_hidden(
        self,
        batch: PreparedBatch,
        llm_layers: Sequence[int] | None = None,
        vision_layers: Sequence[int] | None = None,
        prenorm_last: bool = False,
    ) -> list[ImageHidden]:
        """Hidden states of every image's visual tokens, one `ImageHidden` per batch row.

        `llm_layers`: hidden_states indices (None = all L + 1); `vision_layers`: vision
        hidden_states indices (None or [] = no vision states). With `prenorm_last` the entry
        for the last layer is the raw output of the last decoder layer, without the final norm.
        Results are on the CPU, in the model's dtype.
        """
        llm_idx = self.resolve_llm_layers(llm_layers)
        vis_idx = self.resolve_vision_layers(vision_layers)
        device, dtype = self.device, self.dtype
        # pixel values in the model's dtype (not every vision tower casts its input)
        inputs = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.inputs.items()
        }
        n_images = len(batch)
        if self.overrides.truncate_after_image and self.truncate:
            inputs = _truncate_after(inputs, 1 + max(int(p[-1]) for p in batch.image_positions))
        with torch.inference_mode(), self._capture(vis_idx, prenorm_last) as store:
            out = self.model(**inputs, **self._model_kwargs(llm_idx))
        hs = out.hidden_states if llm_idx else [None] * (self.num_layers + 1)
        if hs is None or len(hs) != self.num_layers + 1:
            raise RuntimeError(
                f"{type(self.model).__name__} returned {None if hs is None else len(hs)} hidden states, "
                f"expected {self.num_layers + 1}"
            )
        hs = list(hs)
        if prenorm_last and store["last"] is not None:
            hs[-1] = store["last"]
        missing = [l for l in llm_idx if hs[l] is None]
        if missing:
            raise RuntimeError(f"{type(self.model).__name__} did not return hidden states {missing}")

        vision_per_image: list[torch.Tensor | None] = [None] * n_images
        if vis_idx:
            per_layer = []
            for k in vis_idx:
                chunks = store["vision"].get(k)
                if not chunks:
                    raise RuntimeError(f"vision layer {k} was not run (no image reached the vision encoder)")
                captured = torch.cat(chunks, dim=0) if len(chunks) > 1 else chunks[0]
                per_layer.append(self.overrides.split_vision(captured, batch.inputs, self.config, n_images))
            vision_per_image = [torch.stack([layer[i] for layer in per_layer]).cpu() for i in range(n_images)]

        results = []
        for i in range(n_images):
            if llm_idx:
                pos = torch.as_tensor(batch.image_positions[i], device=hs[llm_idx[0]].device)
                llm = torch.stack([hs[l][i].index_select(0, pos) for l in llm_idx]).cpu()
            else:
                llm = torch.empty(0, len(batch.image_positions[i]), self.hidden_size, dtype=self.dtype)
            layout = batch.layouts[i]
            vis = vision_per_image[i]
            v2l = self.overrides.vision_to_llm(batch.contexts[i], int(vis.shape[1])) if vis is not None else None
            results.append(
                ImageHidden(
                    llm=llm,
                    vision=vis,
                    patch_row=layout.patch_row,
                    patch_col=layout.patch_col,
                    grid=tuple(int(v) for v in layout.grid),
                    positions=np.asarray(batch.image_positions[i]),
                    view=layout.view,
                    vision_to_llm=v2l,
                    layout_note=layout.note,
                    grid_known=bool(layout.known),
                )
            )
        return results
