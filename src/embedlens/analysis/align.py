"""Layer alignment (docs/methods.md §3) **[ours]**: do input-level visual tokens resemble the
LLM's intermediate-layer text representations more than its input embedding space?

Reference text states
---------------------
Short prompts are built from the data set's label words (:func:`build_prompts`:
per-task templates such as ``"a {}"`` / ``"the letter {}"``, plus compositions such as
``"a {colour} {shape}"`` → "a red circle") and a generic word list (always, and alone
when the data set has no labels). They run through the LLM on text-only input with
``output_hidden_states`` (:func:`collect_text_states`), giving per layer l

* all text-token states (every position except the first/BOS and special tokens), and
* one state per label word: the state at the word's last sub-token, averaged over the
  prompts that contain it.

HF applies the final norm to the last hidden-state entry for text exactly as for the
visual states in the store, so layer L is comparable on both sides.

Measures, per layer l, per token group (all, alive, dead, sink), for visual features
``h[0]`` (``visual="h0"``, the claim of §3) and ``h[l]`` (``visual="hl"``):

1. ``mean_max_cos``: mean over visual tokens of the max cosine to any layer-l text state;
2. ``nn_accuracy`` (per task, needs labels): the label word whose layer-l word state is
   nearest (cosine) equals the token's label; ``chance`` = 1 / number of words;
3. ``cka`` (per task, needs labels): linear CKA (Kornblith et al. 2019) between the visual
   tokens and the layer-l states of their label words (paired rows).

Centring (the same for every layer): each side is centred by its own mean before
cosines — visual features by the mean over all sampled visual tokens of that feature
layer (all groups, so groups stay comparable), text states by the mean over all layer-l
text-token states. This removes the large constant offsets (e.g. massive-activation
dimensions) that otherwise dominate cosines. CKA centres its features by definition.

Best-aligned layer per (visual, group) (:mod:`.align_best`): argmax over l of the mean
*normalized* ``nn_accuracy`` (``(acc - majority) / (1 - majority)``) over the tasks that
are not near-constant (majority share < ``max_majority_share``, ≥ 2 label values; the
others are listed as excluded), else of ``mean_max_cos``; layer L (the final-norm point)
is marked and left out of the argmax; an image-level bootstrap gives intervals of the best
layer and of the criterion value.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from embedlens.runtime import progress_bar, resolve_device
from embedlens.store import layer_values

from .align_best import (
    choose_best_layers,
    final_norm_layer,
    majority_share,
    normalized_accuracy,
    per_image_label_counts,
    per_image_sum,
)
from .labels import PatchLabels, grid_unknown_tokens
from .outputs import note, step_reader, step_summary, write_json, write_parquet
from .features import gather_features, resolve_groups
from .reference import check_mode
from .vocab import VocabIndex

OUTPUT_FILES = {"align": "align.parquet", "summary": "summary.json"}
#: The text-states step's file (beside its summary.json).
TEXT_STATES_FILE = "text_states.npz"
GENERIC_TASK = "_generic"

DEFAULT_TEMPLATES: dict[str, list[str]] = {
    "character": ["the letter {}"],
    "*": ["a {}"],
}
DEFAULT_COMPOSITIONS: list[str] = ["a {colour} {shape}"]
DEFAULT_GENERIC_WORDS: tuple[str, ...] = (
    "dog", "cat", "house", "tree", "car", "water", "sky", "road", "person", "hand", "book",
    "table", "chair", "window", "door", "flower", "grass", "cloud", "sun", "city", "food",
    "bird", "horse", "boat", "street", "wall", "light", "shadow", "mountain", "river",
    "red", "green", "blue", "yellow", "black", "white", "small", "large", "round", "square",
    "text", "number", "picture", "photo", "line", "corner", "edge", "center", "left", "right",
)


# --------------------------------------------------------------------------- prompts
def build_prompts(
    label_tasks: Mapping[str, Sequence[str]] | None,
    *,
    templates: Mapping[str, Sequence[str]] | None = None,
    compositions: Sequence[str] | None = None,
    generic_words: Sequence[str] = DEFAULT_GENERIC_WORDS,
    extra_words: Sequence[str] = (),
    generic_template: str = "a {}",
) -> list[dict[str, Any]]:
    """Prompts with the character spans of their words.

    Each prompt: ``{"text": str, "words": [(task, word, start, end), ...]}``.
    ``templates``: task → templates with one ``{}`` (key ``"*"`` = any other task);
    ``compositions``: format strings naming tasks, e.g. ``"a {colour} {shape}"``, used when
    every named task exists (all combinations); ``generic_words`` (+ ``extra_words``, the
    config's additions) go in task ``_generic``.
    """
    templates = dict(DEFAULT_TEMPLATES if templates is None else templates)
    compositions = list(DEFAULT_COMPOSITIONS if compositions is None else compositions)
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(text: str, words: list[tuple[str, str, int, int]]) -> None:
        if text not in seen:
            seen.add(text)
            prompts.append({"text": text, "words": words})

    def single(task: str, word: str, tpl: str) -> None:
        start = tpl.index("{}")
        add(tpl.replace("{}", word, 1), [(task, word, start, start + len(word))])

    for task, words in (label_tasks or {}).items():
        for tpl in templates.get(task, templates.get("*", ["a {}"])):
            for w in words:
                single(task, str(w), tpl)
    import string

    for comp in compositions:
        names = [f for _, f, _, _ in string.Formatter().parse(comp) if f]
        if not names or any(n not in (label_tasks or {}) for n in names):
            continue
        for combo in itertools.product(*[label_tasks[n] for n in names]):
            text, spans, rest = "", [], comp
            for name, word in zip(names, combo):
                before, rest = rest.split("{" + name + "}", 1)
                text += before
                spans.append((name, str(word), len(text), len(text) + len(str(word))))
                text += str(word)
            add(text + rest, spans)
    for w in dict.fromkeys([*generic_words, *extra_words]):
        single(GENERIC_TASK, str(w), generic_template)
    return prompts


# --------------------------------------------------------------------------- text states
@dataclass
class TextStates:
    """Text hidden states per layer.

    ``layers``: HF hidden_states indices; ``positions`` (n_pos, n_layers, d) float32: every
    text-token state; ``word_keys``: [(task, word)]; ``words`` (n_words, n_layers, d):
    state at the word's last sub-token, averaged over prompts.
    """

    layers: list[int]
    positions: np.ndarray
    word_keys: list[tuple[str, str]]
    words: np.ndarray

    def save(self, path: str | Path) -> None:
        from .outputs import _atomic

        keys = np.array([f"{t}\t{w}" for t, w in self.word_keys], dtype=str)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, layers=np.asarray(self.layers), positions=self.positions,
                         words=self.words, word_keys=keys)

        _atomic(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> "TextStates":
        """Read text states saved by :meth:`save` (``path``: the ``.npz`` or the text-states
        step's directory holding ``text_states.npz``)."""
        p = Path(path)
        if p.is_dir():
            p = p / TEXT_STATES_FILE
        with np.load(p, allow_pickle=False) as z:
            keys = [tuple(str(k).split("\t", 1)) for k in z["word_keys"]]
            return cls([int(x) for x in z["layers"]], z["positions"], keys, z["words"])

    def layer_index(self, layer: int) -> int:
        return self.layers.index(int(layer))

    def task_words(self, task: str, words: Sequence[str]) -> np.ndarray:
        """(n_words, n_layers, d) states of ``words`` of ``task`` (NaN where missing)."""
        where = {k: i for i, k in enumerate(self.word_keys)}
        out = np.full((len(words), len(self.layers), self.words.shape[-1]), np.nan, np.float32)
        for j, w in enumerate(words):
            i = where.get((task, str(w)))
            if i is not None:
                out[j] = self.words[i]
        return out


def _word_positions(tokenizer, text: str, spans, ids: list[int], offsets) -> list[int | None]:
    """Index of the last sub-token of each (.., start, end) span."""
    res = []
    for _, _, start, end in spans:
        best = None
        if offsets is not None:
            for i, (a, b) in enumerate(offsets):
                if b > a and a < end and b > start:
                    best = i
        else:  # prefix method: tokens of text[:end] (prefix-stable tokenizers)
            pre = tokenizer(text[:end], add_special_tokens=True)["input_ids"]
            best = len(pre) - 1 if len(pre) <= len(ids) else None
        res.append(best)
    return res


@torch.no_grad()
def collect_text_states(
    model,
    tokenizer,
    prompts: Sequence[Mapping[str, Any]],
    *,
    layers: Sequence[int] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> TextStates:
    """Run ``prompts`` through ``model`` (any HF model whose forward accepts
    ``input_ids``/``attention_mask``/``output_hidden_states`` on text-only input — the
    adapter's VLM or its language model) and collect :class:`TextStates`.
    ``layers``: hidden_states indices to keep (default all). Float32 on the way out."""
    dev = resolve_device(device)
    try:
        model_dev = next(model.parameters()).device
    except StopIteration:
        model_dev = dev
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pos_states: list[np.ndarray] = []
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[tuple[str, str], int] = {}
    keep = None
    for b0 in progress_bar(range(0, len(prompts), batch_size), enabled=progress,
                           desc="align: text states", unit="batch"):
        batch = prompts[b0:b0 + batch_size]
        encs = []
        for p in batch:
            try:
                enc = tokenizer(p["text"], add_special_tokens=True, return_offsets_mapping=True)
                offs = enc["offset_mapping"]
            except (NotImplementedError, TypeError, ValueError):
                enc = tokenizer(p["text"], add_special_tokens=True)
                offs = None
            encs.append((list(enc["input_ids"]), offs))
        n = max(len(e[0]) for e in encs)
        ids = torch.full((len(encs), n), pad, dtype=torch.long)
        att = torch.zeros((len(encs), n), dtype=torch.long)
        for i, (e, _) in enumerate(encs):
            ids[i, :len(e)] = torch.tensor(e)
            att[i, :len(e)] = 1
        out = model(input_ids=ids.to(model_dev), attention_mask=att.to(model_dev),
                    output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        if keep is None:
            keep = list(range(len(hs))) if layers is None else [int(l) % len(hs) for l in layers]
        stack = torch.stack([hs[l] for l in keep], dim=2).float().cpu().numpy()  # (B, S, nl, d)
        for i, (p, (e, offs)) in enumerate(zip(batch, encs)):
            for j, t in enumerate(e):
                if j == 0 or t in special:
                    continue
                pos_states.append(stack[i, j])
            for span, wp in zip(p["words"], _word_positions(tokenizer, p["text"], p["words"], e, offs)):
                if wp is None:
                    continue
                key = (str(span[0]), str(span[1]))
                sums[key] = sums.get(key, 0) + stack[i, wp]
                counts[key] = counts.get(key, 0) + 1
    keys = sorted(sums)
    words = np.stack([sums[k] / counts[k] for k in keys]).astype(np.float32) if keys else \
        np.zeros((0, len(keep or []), 0), np.float32)
    return TextStates(list(keep or []), np.stack(pos_states).astype(np.float32), keys, words)


# --------------------------------------------------------------------------- measures
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between paired rows of x (n, p) and y (n, q); features centred."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        num = float((kx * ky).sum())
        den = float(np.linalg.norm(kx) * np.linalg.norm(ky))
    else:
        num = float(np.linalg.norm(y.T @ x) ** 2)
        den = float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den if den > 0 else float("nan")


def max_cos(x: np.ndarray, text: np.ndarray, *, device: str = "auto") -> np.ndarray:
    """Per row of x, the max cosine to any row of ``text`` (streamed search)."""
    if len(x) == 0 or len(text) == 0:
        return np.full(len(x), np.nan, dtype=np.float32)
    idx = VocabIndex(text, normalize=True, device=device, vocab_block=8192)
    _, s = idx.search(x, 1)
    return s[:, 0]


def align(
    hidden,
    categories: pd.DataFrame | str | Path,
    text_states: TextStates | str | Path,
    labels: PatchLabels | None,
    out_dir: str | Path,
    *,
    layers: Sequence[int] | str | None = "all",
    visual: Sequence[str] = ("h0", "hl"),
    groups: Mapping[str, Sequence[str] | None] | Sequence[str] | None = ("all", "alive", "dead", "sink"),
    tasks: Sequence[str] | None = None,
    centring: str = "mean",
    max_tokens: int | None = 20000,
    cka_max_tokens: int = 2000,
    max_majority_share: float = 0.8,
    n_bootstrap: int = 200,
    seed: int = 0,
    device: str = "auto",
    max_block_bytes: int = 256 * 2**20,
    mode: str = "ours",
    model: str | None = None,
    dataset: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the alignment curves and write ``align.parquet`` + ``summary.json``.

    Parameters (config knobs)
    -------------------------
    hidden : hidden-state store; categories : categorize output (groups);
    text_states : :class:`TextStates` or a path saved with :meth:`TextStates.save`;
    labels : patch labels (``None`` → only ``mean_max_cos``, said in the summary);
    layers : text layers compared (default: those in ``text_states``; for ``visual="hl"``
        only layers also extracted for the visual tokens);
    visual : ``"h0"`` (visual h[0] vs text layer l) and/or ``"hl"`` (h[l] vs text layer l);
    groups, tasks : as in :func:`.probe.probe`;
    centring : ``"mean"`` (default; see module doc) or ``"none"``;
    max_tokens : uniform (seeded) sample of visual tokens; cka_max_tokens : CKA subsample;
    max_majority_share : a task whose majority label share among the evaluated tokens of a
        (visual, group) is ≥ this (or with < 2 label values present) is left out of the
        best-layer criterion and listed in ``excluded_tasks``;
    n_bootstrap : image-level bootstrap draws for the best layer's intervals (0 = none);
    seed, device, max_block_bytes : reproducibility and compute knobs.
    mode : the model's ``mode`` in config.yaml, recorded in ``settings``.

    ``align.parquet`` columns: ``visual``, ``group``, ``layer``, ``measure``
    (``mean_max_cos`` | ``nn_accuracy`` | ``cka``), ``task`` (null for mean_max_cos),
    ``value``, ``chance`` (uniform: 1 / words), ``majority_share`` and
    ``normalized_accuracy`` (nn_accuracy rows; NaN otherwise), ``n_tokens``,
    ``final_norm_point`` (layer = num_layers, whose state carries the final norm),
    ``is_best``. ``summary["results"]["best_layer"]["<visual>/<group>"]``: ``layer``,
    ``criterion``, ``value``, ``value_ci``, ``layer_ci``, ``layer_share``, ``n_images``,
    ``n_bootstrap``, ``value_at_layer0``, ``included_tasks``, ``excluded_tasks``,
    ``fallback`` (see :func:`.align_best.choose_best_layers`).

    Raises
    ------
    ValueError
        an unknown ``centring``; ``tasks`` not among the label tasks; ``layers`` not in the
        text states; ``visual="h0"`` without layer 0 in the store; an unknown ``mode``.
    """
    t0 = time.perf_counter()
    check_mode(mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(text_states, TextStates):
        text_states = TextStates.load(text_states)
    if isinstance(categories, (str, Path)):
        p = Path(categories)
        categories = pd.read_parquet(p / "categories.parquet" if p.is_dir() else p)
    groups = resolve_groups(groups)
    if centring not in ("mean", "none"):
        raise ValueError("centring must be 'mean' or 'none'")
    cat = categories.reset_index(drop=True)
    grid_unknown, notes = grid_unknown_tokens(cat, "nn_accuracy and cka")
    has_labels = labels is not None and not labels.empty
    task_names = (list(labels.tasks) if not tasks else list(tasks)) if has_labels else []
    unknown = [t for t in task_names if t not in labels.tasks] if has_labels else []
    if unknown:
        raise ValueError(f"align tasks {unknown} not in the data set's label tasks {list(labels.tasks)}")
    if not has_labels:
        notes.append("no labels: only mean_max_cos computed (nn_accuracy and cka need patch labels)")

    rng = np.random.default_rng(seed)
    sample = np.arange(len(cat))
    if max_tokens is not None and sample.size > max_tokens:
        sample = np.sort(rng.choice(sample, size=int(max_tokens), replace=False))
    pos_of = {str(x): i for i, x in enumerate(hidden["image_id"].values)}
    img_pos = np.array([pos_of[str(x)] for x in cat["image_id"].to_numpy()[sample]], dtype=np.int64)
    # images are the bootstrap's resampling unit (tokens of one image are not independent)
    img_idx = np.unique(img_pos, return_inverse=True)[1].astype(np.int64)
    n_images = int(img_idx.max()) + 1 if img_idx.size else 0
    tok = cat["token"].to_numpy(np.int64)[sample]
    glab = cat["label"].to_numpy()[sample]
    tl = {t: v[sample] for t, v in labels.for_table(cat).items() if t in task_names} if has_labels else {}
    cka_rng = np.random.default_rng([seed, 5])

    store_layers = set(layer_values(hidden))
    text_layers = list(text_states.layers) if layers in (None, "all") else [int(l) for l in layers]
    missing = [l for l in text_layers if l not in text_states.layers]
    if missing:
        raise ValueError(f"align layers {missing} not in the text states (layers {text_states.layers})")
    if 0 not in store_layers and "h0" in visual:
        raise ValueError("visual='h0' needs layer 0 in the store")
    word_sets = {t: text_states.task_words(t, labels.tasks[t]) for t in task_names}

    final_norm = final_norm_layer(hidden, notes)
    rows: list[dict[str, Any]] = []
    # per-image aggregates for the best-layer criterion and its bootstrap (align_best)
    nn_counts: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray]] = {}
    cos_counts: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
    feats_cache: dict[int, np.ndarray] = {}

    def visual_feats(l: int) -> np.ndarray:
        if l not in feats_cache:
            for key in [key for key in feats_cache if key != 0]:  # keep h[0] and one more
                del feats_cache[key]
            x = gather_features(hidden, "llm", l, img_pos, tok,
                                 max_block_bytes=max_block_bytes).astype(np.float64)
            if centring == "mean":
                x -= x.mean(0)  # centred by the mean over all sampled visual tokens
            feats_cache[l] = x.astype(np.float32)
        return feats_cache[l]

    jobs = [(v, l) for v in visual for l in text_layers if v == "h0" or l in store_layers]
    skipped = [l for l in text_layers if "hl" in visual and l not in store_layers]
    if skipped:
        notes.append(f"visual='hl': text layers {skipped} not extracted for visual tokens, skipped")
    for vmode, l in progress_bar(jobs, enabled=progress, desc="align", unit="layer"):
        X = visual_feats(0 if vmode == "h0" else l)
        li = text_states.layer_index(l)
        T = text_states.positions[:, li].astype(np.float64)
        tmean = T.mean(0) if centring == "mean" else np.zeros(T.shape[1])
        Tc = (T - tmean).astype(np.float32)
        maxcos = max_cos(X, Tc, device=device)
        for gname, members in groups.items():
            gm = np.ones(len(sample), bool) if members is None else np.isin(glab, members)
            cos_counts[(vmode, gname, l)] = (per_image_sum(img_idx[gm], maxcos[gm], n_images),
                                             per_image_sum(img_idx[gm], np.ones(int(gm.sum())), n_images))
            rows.append({"visual": vmode, "group": gname, "layer": l, "measure": "mean_max_cos",
                         "task": None, "value": float(maxcos[gm].mean()) if gm.any() else np.nan,
                         "chance": np.nan, "n_tokens": int(gm.sum())})
            for t in task_names:
                W = word_sets[t][:, li].astype(np.float64)
                ok_w = np.isfinite(W).all(1)
                y = tl[t]
                m = gm & (y >= 0)
                m[m] &= ok_w[y[m]]
                n = int(m.sum())
                maj = majority_share(y[m])
                if n == 0 or ok_w.sum() < 2:
                    for meas in ("nn_accuracy", "cka"):
                        rows.append({"visual": vmode, "group": gname, "layer": l, "measure": meas,
                                     "task": t, "value": np.nan, "chance": np.nan, "n_tokens": n,
                                     "majority_share": maj if meas == "nn_accuracy" else np.nan})
                    continue
                Wc = _unit(np.where(ok_w[:, None], W - tmean, 0.0))
                sims = _unit(X[m].astype(np.float64)) @ Wc.T
                sims[:, ~ok_w] = -np.inf
                correct = sims.argmax(1) == y[m]
                acc = float(correct.mean())
                nn_counts[(vmode, gname, t, l)] = (
                    per_image_sum(img_idx[m], correct, n_images),
                    per_image_label_counts(img_idx[m], y[m], n_images, W.shape[0]))
                rows.append({"visual": vmode, "group": gname, "layer": l, "measure": "nn_accuracy",
                             "task": t, "value": acc, "chance": 1.0 / ok_w.sum(), "n_tokens": n,
                             "majority_share": maj, "normalized_accuracy": normalized_accuracy(acc, maj)})
                sel = np.flatnonzero(m)
                if sel.size > cka_max_tokens:
                    sel = np.sort(cka_rng.choice(sel, size=cka_max_tokens, replace=False))
                cka = linear_cka(X[sel], W[y[sel]]) if sel.size >= 3 else np.nan
                rows.append({"visual": vmode, "group": gname, "layer": l, "measure": "cka",
                             "task": t, "value": cka, "chance": np.nan, "n_tokens": int(sel.size)})
    df = pd.DataFrame(rows, columns=["visual", "group", "layer", "measure", "task", "value", "chance",
                                     "majority_share", "normalized_accuracy", "n_tokens"])
    df["final_norm_point"] = df["layer"] == final_norm if final_norm is not None else False
    best = choose_best_layers(df, nn_counts, cos_counts, n_images=n_images, final_norm=final_norm,
                              max_majority_share=max_majority_share, n_bootstrap=n_bootstrap,
                              seed=seed, notes=notes)
    summary = {
        "status": "ok", "model": model, "dataset": dataset,
        "best_layer": best,
        "final_norm_layer": final_norm,
        "centring": ("each side centred by its own mean before cosines: visual features by the mean over "
                     "all sampled visual tokens of that feature layer; text by the mean over all layer-l "
                     "text-token states (same for every layer)") if centring == "mean" else
                    "none: raw cosines (centring='none')",
        "text": {"n_positions": int(text_states.positions.shape[0]), "n_words": len(text_states.word_keys),
                 "layers": text_states.layers},
        "tasks": task_names, "groups": {k: (None if v is None else list(v)) for k, v in groups.items()},
        "settings": {"visual": list(visual), "max_tokens": max_tokens, "cka_max_tokens": cka_max_tokens,
                     "max_majority_share": max_majority_share, "n_bootstrap": n_bootstrap,
                     "seed": seed, "layers": text_layers, "centring": centring, "mode": mode},
        "n_tokens_used": int(len(sample)),
        "grid_unknown": grid_unknown,
        "notes": notes,
        "methods_notes": [note("ours", "layer_alignment", (
            "Reference text states from label-word prompts plus a generic word list run through the "
            "LLM; measures per layer: mean max-cosine (both sides mean-centred), nearest-label-word "
            "accuracy, linear CKA with the label words' states; best layer = argmax of the mean "
            "normalized nn_accuracy ((acc - majority share) / (1 - majority share), floored at 0) over the tasks that are "
            f"not near-constant (majority share < {max_majority_share}, >= 2 label values; the others listed "
            "as excluded), else of mean_max_cos, leaving out the final-norm point (layer = num_layers); "
            f"2.5/97.5 percentile intervals of the layer and value from {n_bootstrap} image-level bootstrap "
            "draws."))],
        "seconds": time.perf_counter() - t0,
        "files": dict(OUTPUT_FILES),
    }
    write_parquet(df, out / OUTPUT_FILES["align"])
    summary = step_summary("align", summary)
    write_json(summary, out / OUTPUT_FILES["summary"])
    return summary


read_align = step_reader("align")
