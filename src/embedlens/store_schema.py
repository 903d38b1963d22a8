"""The self-description of the hidden-state, vocabulary and lens stores.

Every array and attribute is described once, here, in `VARIABLES` / `SHARD_ATTRS` /
`VOCAB_ATTRS` / `INDEX_KEYS`: the writers (`embedlens.store`) attach the descriptions as CF
attributes (`cf_attrs`), so ``xarray.open_zarr`` explains a store without this package,
and docs/architecture.md shows them (`doc_table`). Also the one derivation of a derived
variable that needs no model: `display_token`, the readable text of a token piece (the
vocabulary store's ``token_text`` when the tokenizer cannot decode a piece).

Imports nothing of embedlens (the bottom layer), so the models, the store writers, the
analyses and the report all read the same table; ``embedlens.store`` re-exports it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# A marker array written last: its presence (plus the rename) means "complete".
COMPLETE_ATTR = "embedlens_complete"

#: ``VLMAdapter.describe()`` keys recorded under their own name rather than ``model_<key>``,
#: so that no fact is stored twice under two names (None: not stored, the extraction records
#: it itself as ``compute_dtype`` / ``compute_dtype_used``).
MODEL_ATTR_NAMES = {"path": "model_path", "dtype": None, **{k: k for k in (
    "num_layers", "final_norm_applied_to_last_layer", "transformers_version", "torch_version")}}


def model_attrs(described: dict) -> dict:
    """A model's provenance (``VLMAdapter.describe()``) as store attributes: ``model_<key>``,
    except the keys of `MODEL_ATTR_NAMES`. Raises nothing."""
    names = {k: MODEL_ATTR_NAMES.get(k, f"model_{k}") for k in described}
    return {names[k]: v for k, v in described.items() if names[k] is not None}


# --------------------------------------------------------------------------- the contract
class Var(NamedTuple):
    dims: tuple[str, ...]
    long_name: str
    description: str
    units: str | None = None  # "1": a dimensionless number; None: an id, flag, text or index


_IT, _LT = ("image", "token"), ("image", "layer", "token", "k")
#: Every data variable and coordinate of a hidden-state shard, ``vocab.zarr`` and ``lens.zarr``.
#: The writers attach long_name/description/units as CF attributes (`cf_attrs`), so
#: ``xarray.open_zarr`` explains each array; docs/architecture.md's tables are `doc_table`.
VARIABLES: dict[str, Var] = {
    "llm_hidden": Var(("image", "layer", "token", "dim"), "LLM hidden state", "decoder hidden states at the "
                      "image's visual tokens in HF hidden_states order: layer 0 = decoder input (projector "
                      "output), layer l = output of decoder layer l; NaN where token_valid is False", "1"),
    "vision_hidden": Var(("image", "vision_layer", "vision_token", "vision_dim"), "vision-encoder hidden state",
                         "vision-encoder states of the image (when vision layers are configured); NaN past "
                         "n_vision_tokens", "1"),
    "image_id": Var(("image",), "image id", "the image's id in the materialized data set (dataset.json)"),
    "layer": Var(("layer",), "LLM layer", "HF hidden_states index: 0 = decoder input, l = output of decoder "
                 "layer l (the last, L = num_layers, carries the final norm when final_norm_applied_to_last_layer)"),
    "token": Var(("token",), "visual-token position", "position among the image's visual tokens in input order"),
    "patch_row": Var(_IT, "patch row", "row r of the token's patch in the grid; -1: none (separator, padding, no grid)", "1"),
    "patch_col": Var(_IT, "patch column", "column c of the token's patch; -1: none (separator, padding, no grid)", "1"),
    "token_valid": Var(_IT, "valid token", "True for the image's visual tokens, False for padding past "
                       "n_tokens (images of a store differ in token count)"),
    "n_tokens": Var(("image",), "visual tokens", "number of visual tokens of the image in the LLM input", "1"),
    "grid_rows": Var(("image",), "patch-grid rows", "rows R of the image's patch grid (the finest grid "
                     "covering the whole image); 0 where unknown", "1"),
    "grid_cols": Var(("image",), "patch-grid columns", "columns C of the image's patch grid; 0 where unknown", "1"),
    "grid_known": Var(("image",), "patch grid known", "False where the architecture's patch layout is unknown "
                      "for the image: grid 0 x 0, patches -1 (never guessed)"),
    "layout_note": Var(("image",), "layout note", "why the grid is unknown or how tokens were placed; '' if none"),
    "vision_layer": Var(("vision_layer",), "vision-encoder layer", "as configured: 0 = input of the first "
                        "encoder layer, k = output of encoder layer k (before post-norm/merger), < 0 from the end"),
    "vision_token": Var(("vision_token",), "vision-token position", "position among the image's vision tokens"),
    "n_vision_tokens": Var(("image",), "vision tokens", "number of vision-encoder tokens of the image", "1"),
    "vision_to_llm": Var(("image", "vision_token"), "visual token fed", "the visual token (index along token) "
                         "that this vision token alone feeds; -1: none (CLS, unpadded away, several feed one)"),
    "embedding": Var(("vocab", "dim"), "input embedding", "the LLM's input-embedding matrix E, one row per "
                     "token id, float32 (Gemma's sqrt(d) scale not applied)", "1"),
    "token_id": Var(("vocab",), "token id", "vocabulary id of the row"),
    "token_string": Var(("vocab",), "token string", "raw vocabulary string ('▁jav', 'Ġred'); '' past the tokenizer"),
    "token_text": Var(("vocab",), "token text", "the token decoded for reading ('jav', 'red'): the tokenizer's "
                      "convert_tokens_to_string, spaces around it stripped (embedlens.store.display_token where "
                      "the tokenizer cannot); '' past the tokenizer"),
    "is_special": Var(("vocab",), "special token", "special or added token, or a row past the tokenizer; "
                      "excluded from lens candidates unless configured"),
    "emb_id": Var(_LT, "embedding-lens token id", "id of the k-th nearest input-embedding row to h[l] by "
                  "cosine (excluded rows left out); -1 for invalid tokens"),
    "emb_sim": Var(_LT, "embedding-lens cosine", "cosine of h[l] with that row; NaN for invalid tokens", "1"),
    "logit_id": Var(_LT, "logit-lens token id", "id of the k-th largest logit of lm_head(final_norm(h[l])) "
                    "(excluded rows left out); -1 for invalid tokens"),
    "logit": Var(_LT, "logit-lens logit", "that logit; NaN for invalid tokens", "1"),
    "logprob": Var(_LT, "logit-lens log-probability", "natural-log probability of that token: logit minus "
                   "the log-sum-exp over all vocabulary rows; NaN for invalid tokens", "1"),
    "k": Var(("k",), "rank", "rank of the neighbour, 1 = nearest"),
    "final_norm_applied_by_lens": Var(("layer",), "final norm applied by the lens", "True where the logit "
                                      "lens applied final_norm before lm_head (not where HF already had)"),
}
SHARD_VARIABLES = ("llm_hidden", "vision_hidden", "image_id", "layer", "token", "patch_row", "patch_col",
                   "token_valid", "n_tokens", "grid_rows", "grid_cols", "grid_known", "layout_note",
                   "vision_layer", "vision_token", "n_vision_tokens", "vision_to_llm")
VOCAB_VARIABLES = ("embedding", "token_id", "token_string", "token_text", "is_special")
LENS_VARIABLES = ("emb_id", "emb_sim", "logit_id", "logit", "logprob", "image_id", "layer", "token", "k",
                  "patch_row", "patch_col", "token_valid", "final_norm_applied_by_lens")

#: The model's provenance (`model_attrs`), in both a shard and ``vocab.zarr``.
MODEL_ATTRS = {
    "model": "the model's name in config.yaml", "model_path": "the directory the model was loaded from",
    "num_layers": "L, the decoder layers (hidden_states has L + 1 entries)",
    "final_norm_applied_to_last_layer": "True: the last hidden_states entry already carries the final norm (HF)",
    "model_architecture": "model class (config.architectures[0])", "model_model_type": "config model_type",
    "model_hidden_size": "d of the LLM", "model_vocab_size": "V, rows of the input embedding",
    "model_tokenizer_size": "tokens the tokenizer knows (rows past it: padding)",
    "model_image_token_id": "id of the image placeholder token",
    "model_vision_model_type": "vision config model_type", "model_num_vision_layers": "vision-encoder layers",
    "model_vision_hidden_size": "vision-encoder width", "model_embed_scale": "the embedding layer's scale "
    "(Gemma: sqrt(d); not applied to embedding)", "model_chat_template": "True: the prompt is a chat user turn",
    "transformers_version": "transformers version", "torch_version": "torch version",
}
#: Every attribute of a hidden-state shard.
SHARD_ATTRS = {
    **MODEL_ATTRS, "revision": "commit of a cached Hugging Face snapshot; null for a local directory",
    "dataset": "the data set's name", "image_range": "[start, stop): the data set's images in this shard",
    "prompt": "text after the image", "compute_dtype": "forward-pass dtype as configured",
    "compute_dtype_used": "forward-pass dtype used (float16 that gave NaN/inf is redone in bfloat16/float32)",
    "store_dtype_requested": "dtype on disk as configured",
    "store_dtype": "dtype on disk (float32 where float16 overflowed)",
    "settings": "the settings that define the stored values (layers, vision_layers, compute_dtype, "
    "store_dtype, prompt; preprocess when not native: absent = native; quantization when set)",
    "settings_hash": "hash of settings", "device": "device of the forward pass",
    "cuda_visible_devices": "the GPU(s) the job held (embedlens.devices; CUDA_VISIBLE_DEVICES); null off CUDA",
    "device_map": "extraction.device_map: how the model was spread over GPUs (null: one device)",
    "model_placement": "parameter tensors per device of a model loaded with a device_map (null: no device_map)",
    "quantization": "extraction.quantization: 8bit/4bit bitsandbytes weights, null for the checkpoint's; "
    "quantized weights change the stored values (part of settings and settings_hash when set)",
    "python_version": "Python version", "final_batch_size": "batch size at the end of the shard",
    "batch_backoffs": "batch-size reductions taken (out of memory; a batch that only fails as a batch)",
    "batch_check": "first-batch self-check: image_id, batch_size, max_rel_diff, tolerance (null: not run)",
    "skipped_images": "image_id, file, reason of images left out under on_bad_image: skip",
    "extraction_notes": "fallbacks taken (dtype, batch size)", "created": "UTC time the shard was completed",
    COMPLETE_ATTR: "True: written completely (open_shard refuses a shard without it)",
}
VOCAB_ATTRS = (*MODEL_ATTRS, COMPLETE_ATTR)
#: The keys of ``hidden.json`` (`write_index`).
INDEX_KEYS = {
    "shards": "the shard paths, sorted", "n_images": "images over all shards",
    "layers": "the LLM layers stored", "max_tokens": "the widest image's visual tokens",
    "n_grid_unknown": "images whose patch grid is unknown", "skipped_images": "every shard's skipped_images",
    "extraction_notes": "every shard's extraction_notes", "model": "the model's name",
    "settings_hash": "the shards' settings_hash",
}


def cf_attrs(name: str) -> dict:
    """CF attributes (long_name, description, units) of a store array.

    Raises:
        KeyError: ``name`` is not in `VARIABLES` (every written array must be described).
    """
    if name not in VARIABLES:
        raise KeyError(f"store array {name!r} has no entry in embedlens.store.VARIABLES")
    v = VARIABLES[name]
    return {"long_name": v.long_name, "description": v.description, **({"units": v.units} if v.units else {})}


def describe_variables(ds):
    """Attach `cf_attrs` to every data variable and coordinate of the ``xarray.Dataset``
    ``ds`` (in place; returns it), for writers that go through xarray. Raises KeyError as
    `cf_attrs`."""
    for name, var in ds.variables.items():
        var.attrs.update(cf_attrs(str(name)))
    return ds


def doc_table(kind: str) -> str:
    """The Markdown table of docs/architecture.md for ``kind`` (shard, shard_attrs, vocab, lens,
    index), generated from the tables above (tests/test_store.py keeps the page in step).

    Raises:
        KeyError: an unknown ``kind``.
    """
    names = {"shard": SHARD_VARIABLES, "vocab": VOCAB_VARIABLES, "lens": LENS_VARIABLES}
    if kind in names:
        rows = ["| array | dims | units | long_name: description |", "|---|---|---|---|"]
        rows += [f"| `{n}` | {', '.join(VARIABLES[n].dims)} | {VARIABLES[n].units or ''} | "
                 f"{VARIABLES[n].long_name}: {VARIABLES[n].description} |" for n in names[kind]]
    else:
        table = {"shard_attrs": SHARD_ATTRS, "index": INDEX_KEYS}[kind]
        rows = ["| attribute | meaning |" if kind != "index" else "| key | meaning |", "|---|---|"]
        rows += [f"| `{n}` | {text} |" for n, text in table.items()]
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- token text
# Word-piece markers and what they stand for: sentencepiece "▁" and GPT-2 byte-level "Ġ"
# (a space), byte-level "Ċ" (a newline), "ĉ" (a tab).
_PIECE_MARKERS = {"▁": " ", "Ġ": " ", "Ċ": "\n", "ĉ": "\t"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def display_token(piece: str) -> str:
    """A vocabulary piece as text for reading, case kept: "▁yellow" and "Ġyellow" →
    "yellow", "##ing" → "ing", "Ċ" → "\\n", the byte piece "<0x0A>" → "\\n".

    Markers become what they stand for (space, newline, tab), a leading WordPiece "##" is
    dropped, then spaces around the text are stripped, unless the piece is nothing but
    whitespace ("Ġ" stays " "). The fallback of the vocabulary store's ``token_text`` when
    the tokenizer cannot decode a piece, and the report's decoding of raw pieces. Unlike
    ``embedlens.analysis.vocab.normalize_word`` (matching), it keeps case. Raises nothing.
    """
    s = str(piece)
    if _BYTE_PIECE.fullmatch(s):
        b = int(s[3:5], 16)
        return chr(b) if b < 0x80 else s  # one byte of a multi-byte character: the piece
    for marker, text in _PIECE_MARKERS.items():
        s = s.replace(marker, text)
    if s.startswith("##"):
        s = s[2:]
    stripped = s.strip(" ")
    return stripped if stripped else s
