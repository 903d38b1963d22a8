"""Training embedlens-mini v2: LLaVA's two stages on composed real-object scenes.

* **Stage 1** (projector only; vision tower and LLM frozen): captions ("Describe the
  image." → caption) of composed scenes (`embedlens.mini.compose`: real objects from
  `embedlens.mini.sources` + the v1 synthetic shapes and letters). Starts from the projector
  of the base model (the committed v1 projector when the base is a v1 build).
* **Stage 2** (projector + LoRA rank 16 on every linear layer of the LLM, `embedlens.mini.lora`):
  all items of the scenes, in the benchmark formats (yes/no, short answers, multiple
  choice, grounding box text) and the captions, plus training-only copies of every
  multiple-choice item (`embedlens.mini.compose.mc_variants`: the options in another order,
  and once with the answer stated as a hint).

Each example: the chat template's system turn and "<|im_start|>user\\n" (the *prefix*,
identical in every example), the 64 image tokens, "\\n" + the item's prompt and the
generation prompt, then the assistant answer + end-of-turn. Loss: next-token cross-entropy
on the answer tokens only, averaged per example, then over the batch
(`StageTrainer.loss_on`). Frozen vision features are computed once. The prefix's
keys/values are computed once in stage 1 (nothing before the image is trained) and once per
step, at batch 1 and with gradients, in stage 2 (LoRA changes them). Autocast dtype:
`embedlens.mini.lora.autocast_dtype` (bf16 only on CPUs that multiply bf16 natively).
Deterministic by ``seed`` for a given machine and thread count.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedlens.models import parts
from embedlens.models.prompt import assistant_suffix, chat_prompt

from .compose import MC_HINT, MIN_PICTURES_PER_NAME
from .lora import LORA_ALPHA, LORA_RANK, add_lora, autocast_dtype, n_lora_params, save_adapter
from .train import _env_info, load_model, precompute_features, save_projector

V2_DATA_SEED_BASE = 2_000  # training scenes: compose seed 2000 + seed
V2_EVAL_SEED = 999_990  # held-out scenes (never a training seed)
IMAGE_TOKEN = "<image>"


@dataclass
class RecipeV2:
    stage1_steps: int = 150
    stage2_steps: int = 1200
    batch_size: int = 8
    seed: int = 0
    n_scenes: int = 3000
    min_pictures_per_name: int = MIN_PICTURES_PER_NAME
    mc_reshuffles: int = 1  # stage 2: copies of each multiple-choice item with the options reordered
    mc_hint: bool = True  # stage 2: one more copy with the answer stated (compose.mc_variants)
    lr_stage1: float = 5e-4
    lr_projector_stage2: float = 2e-4
    lr_lora: float = 5e-4
    lora_rank: int = LORA_RANK
    lora_alpha: int = LORA_ALPHA
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    grad_clip: float = 1.0
    data_seed: int = 0
    autocast_dtype: str = "float32"
    schedule: str = "per stage: linear warm-up, then cosine to 0"
    loss: str = ("next-token cross-entropy on the answer tokens (answer + end-of-turn), "
                 "averaged per example, then over the batch's examples")


# --------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------


def encode_items(processor, prompts: list[str], answers: list[str], n_image_tokens: int
                 ) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """(prefix ids, [(ids after the image tokens, answer ids)]) for each prompt/answer.

    The chat template's text is split at the image placeholder: the part before it is the
    prefix (the same for every prompt, checked), the part after it holds "\\n" + prompt +
    the generation prompt. Special tokens split the text before BPE, so the split gives the
    ids the processor gives for the whole text (tested).

    Raises:
        ValueError: the template has no single image placeholder or the prefixes differ.
    """
    tok = processor.tokenizer
    prefix_text = None
    out = []
    for p, a in zip(prompts, answers, strict=True):
        text = chat_prompt(processor, p)
        if text.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"chat template: expected one {IMAGE_TOKEN} in {text!r}")
        head, tail = text.split(IMAGE_TOKEN)
        if prefix_text is None:
            prefix_text = head
        elif head != prefix_text:
            raise ValueError("chat template: the text before the image differs between prompts")
        q = tok(tail, add_special_tokens=False)["input_ids"]
        ans = tok(assistant_suffix(processor, p, a), add_special_tokens=False)["input_ids"]
        out.append((list(q), list(ans)))
    prefix = tok(prefix_text or "", add_special_tokens=False)["input_ids"]
    return list(prefix), out


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


def _lr_lambda(steps: int, warmup_frac: float):
    warm = max(1, int(round(warmup_frac * steps)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return f


class StageTrainer:
    """One stage over precomputed features. ``llava``: the (possibly peft-wrapped inner)
    LLaVA model; ``groups``: [(params, lr)] trained with AdamW; everything else frozen by
    the caller. ``examples``: [(feature row, ids after the image, answer ids)]."""

    def __init__(self, llava, prefix_ids: list[int], examples: list[tuple[int, list[int], list[int]]],
                 features: torch.Tensor, groups: list[tuple[list[torch.nn.Parameter], float]], steps: int,
                 recipe: RecipeV2, pad_id: int, dtype: torch.dtype, prefix_grad: bool, seed: int):
        self.llava, self.examples, self.features = llava, examples, features
        self.recipe, self.pad_id, self.dtype, self.prefix_grad = recipe, pad_id, dtype, prefix_grad
        self.device = next(llava.parameters()).device
        self.proj = parts.projector_of(llava)
        self.embed = llava.get_input_embeddings()
        self.lm = parts.decoder_of(llava)
        self.head = llava.get_output_embeddings()
        self.prefix = torch.tensor(prefix_ids, dtype=torch.long, device=self.device)
        self.n_img = int(features.shape[1])
        self.params = [p for ps, _ in groups for p in ps]
        self.opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups],
                                     betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(steps, recipe.warmup_frac))
        self.rng = np.random.default_rng(seed)
        self._order: list[int] = []
        # transformers >= 5.24 names the cache argument `cache` (`past_key_values` deprecated)
        self.cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.prefix_kv = None if prefix_grad else self._prefix_kv()

    def _prefix_kv(self):
        ctx = torch.enable_grad() if self.prefix_grad else torch.no_grad()
        with ctx, torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            emb = self.embed(self.prefix).unsqueeze(0)
            out = self.lm(inputs_embeds=emb, use_cache=True)
        return getattr(out, "cache", None) or out.past_key_values

    def next_batch(self) -> list[int]:
        while len(self._order) < self.recipe.batch_size:
            self._order.extend(self.rng.permutation(len(self.examples)).tolist())
        b, self._order = self._order[:self.recipe.batch_size], self._order[self.recipe.batch_size:]
        return b

    def loss_on(self, idx: list[int]) -> torch.Tensor:
        """Cross-entropy over the answer tokens of the examples ``idx``: mean per example,
        then mean over the examples.

        Why per example: a token mean lets long answers (captions, 20-token boxes) outweigh
        one-token answers (yes/no, an option letter) ten to one; averaging each example
        first gives every item the same weight whatever its answer length."""
        B, S, N = len(idx), len(self.prefix), self.n_img
        exs = [self.examples[i] for i in idx]
        lens = [N + len(q) + len(a) for _, q, a in exs]
        T = max(lens)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, S + T), dtype=torch.long)
        mask[:, :S] = 1
        sel = torch.zeros((B, T), dtype=torch.bool)
        labels = []
        for j, (_, q, a) in enumerate(exs):
            ids[j, N:N + len(q) + len(a)] = torch.tensor(q + a)
            mask[j, S:S + lens[j]] = 1
            start = N + len(q) - 1  # row r of the output predicts token r + 1
            sel[j, start:start + len(a)] = True
            labels.append(torch.tensor(a))
        owner = torch.repeat_interleave(torch.arange(B), torch.tensor([len(a) for _, _, a in exs]))
        ids, mask, sel = ids.to(self.device), mask.to(self.device), sel.to(self.device)
        feats = self.features[[f for f, _, _ in exs]].to(self.device, torch.float32)
        if self.prefix_grad:
            cache = self._prefix_kv()
        else:
            cache = copy.deepcopy(self.prefix_kv)
        cache.batch_repeat_interleave(B)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            img = self.proj(feats)
            emb = self.embed(ids).to(img.dtype)
            emb = torch.cat([img, emb[:, N:]], dim=1)
            h = self.lm(inputs_embeds=emb, attention_mask=mask, use_cache=True,
                        **{self.cache_kw: cache}).last_hidden_state
            logits = self.head(h[sel])
        tok_loss = torch.nn.functional.cross_entropy(logits.float(), torch.cat(labels).to(self.device),
                                                     reduction="none")
        owner = owner.to(self.device)
        per_example = torch.zeros(B, device=self.device).index_add_(0, owner, tok_loss)
        per_example = per_example / torch.bincount(owner, minlength=B).clamp_min(1)
        return per_example.mean()

    def step(self) -> tuple[float, float]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_on(self.next_batch())
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(loss.detach()), float(gnorm)


def _run(trainer: StageTrainer, steps: int, name: str, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    losses, gnorms, loads = [], [], [os.getloadavg()[0]]
    t, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc=name, unit="step", disable=not progress)
    for _ in bar:
        loss, g = trainer.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: training diverged (loss {loss} at step {len(losses)})")
        losses.append(loss)
        gnorms.append(g)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if len(losses) % 10 == 0:
            loads.append(os.getloadavg()[0])
    secs, cpu = time.perf_counter() - t, time.process_time() - cpu
    k = max(1, min(20, steps // 5))
    # CPU seconds per step (all threads) do not depend on what else runs on the machine
    return {"steps": steps, "train_s": secs, "s_per_step": secs / max(1, steps),
            "cpu_s_per_step": cpu / max(1, steps), "loss": losses,
            "grad_norm": gnorms, "loss_first_mean": float(np.mean(losses[:k])),
            "loss_last_mean": float(np.mean(losses[-k:])), "mean_over": k,
            "loadavg_1min_mean": float(np.mean(loads)), "loadavg_1min_max": float(np.max(loads))}


def train_mini_v2(model_dir: Path | str, out_dir: Path | str, objects_dir: Path | str,
                  stage1_steps: int = 150, stage2_steps: int = 1200, batch_size: int = 8, seed: int = 0,
                  n_scenes: int = 3000, device: str = "auto", threads: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train v2 from the base model in ``model_dir`` (a built embedlens-mini); write
    ``out_dir/projector.safetensors``, ``out_dir/adapter/`` and ``out_dir/training.json``.

    ``objects_dir``: the unpacked real objects (`embedlens.mini.sources.fetch_sources`).
    Returns the log dict (recipe, per-stage losses and seconds per step, timings).

    Raises:
        FileNotFoundError: ``objects_dir`` has no catalogue.
        FloatingPointError: a loss became non-finite.
    """
    from embedlens.extract import resolve_device

    from .compose import make_scenes, mc_variants, vocabulary
    from .sources import load_catalogue

    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    dev = torch.device(resolve_device(device))
    dtype = autocast_dtype(dev.type)
    recipe = RecipeV2(stage1_steps=int(stage1_steps), stage2_steps=int(stage2_steps), batch_size=int(batch_size),
                      seed=int(seed), n_scenes=int(n_scenes), data_seed=V2_DATA_SEED_BASE + int(seed),
                      autocast_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(recipe.seed)
    timings: dict[str, Any] = {}
    objects = vocabulary(load_catalogue(objects_dir), recipe.min_pictures_per_name)
    model, processor = load_model(model_dir)
    model.to(dev)
    start_projector = {k: v.clone() for k, v in parts.projector_of(model).state_dict().items()}
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    scenes = make_scenes(recipe.n_scenes, recipe.data_seed, objects)
    timings["compose_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small vision forwards: one thread is as fast on a shared machine
    try:
        features = precompute_features(model, processor, [s.image for s in scenes],
                                       bf16=dtype == torch.bfloat16, progress=progress)
    finally:
        torch.set_num_threads(n_threads)
    timings["features_s"] = time.perf_counter() - t

    flat = [(i, it) for i, s in enumerate(scenes) for it in s.items]
    # stage 2 only: the copies are drawn from their own stream, so the scenes and their
    # items are the same with or without them
    mc_rng = np.random.default_rng([recipe.data_seed, 1])
    flat += [(i, v) for i, it in list(flat)
             for v in mc_variants(it, mc_rng, recipe.mc_reshuffles, recipe.mc_hint)]
    prefix, enc = encode_items(processor, [it.prompt for _, it in flat], [it.answer for _, it in flat],
                               int(features.shape[1]))
    examples = [(i, q, a) for (i, _), (q, a) in zip(flat, enc, strict=True)]
    captions = [e for e, (_, it) in zip(examples, flat, strict=True) if it.format == "caption"]
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    proj_params = list(parts.projector_of(model).parameters())
    for p in proj_params:
        p.requires_grad_(True)

    # Stage 1: projector on captions
    s1 = StageTrainer(model, prefix, captions, features, [(proj_params, recipe.lr_stage1)], recipe.stage1_steps,
                      recipe, pad_id, dtype, prefix_grad=False, seed=recipe.seed)
    stage1 = _run(s1, recipe.stage1_steps, "stage 1 (projector, captions)", progress) if recipe.stage1_steps else {}
    del s1

    # Stage 2: projector + LoRA on all items
    peft_model = add_lora(model, recipe.lora_rank, recipe.lora_alpha, seed=recipe.seed)
    llava = peft_model.base_model.model
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in proj_params:
        p.requires_grad_(True)
    s2 = StageTrainer(llava, prefix, examples, features,
                      [(proj_params, recipe.lr_projector_stage2), (lora_params, recipe.lr_lora)],
                      recipe.stage2_steps, recipe, pad_id, dtype, prefix_grad=True, seed=recipe.seed + 1)
    stage2 = _run(s2, recipe.stage2_steps, "stage 2 (projector + LoRA, all items)", progress) if recipe.stage2_steps else {}
    del s2

    out_dir.mkdir(parents=True, exist_ok=True)
    save_projector(llava, out_dir / "projector.safetensors", {"embedlens_recipe_v2": asdict(recipe)})
    save_adapter(peft_model, out_dir / "adapter")
    from .wheels import sha256_file

    counts: dict[str, int] = {}
    for _, it in flat:
        hinted = it.question.startswith(MC_HINT.partition("{")[0])
        key = f"{it.format}/{it.type}" + (" (hinted copy)" if hinted else "")
        counts[key] = counts.get(key, 0) + 1
    timings["total_s"] = time.perf_counter() - t0
    log = {
        "model_dir": str(model_dir), "recipe": asdict(recipe),
        "start_projector_norm": float(sum(v.float().norm() ** 2 for v in start_projector.values()) ** 0.5),
        "n_examples": {"captions": len(captions), "all": len(examples)}, "item_counts": counts,
        "n_prefix_tokens": len(prefix), "n_visual_tokens": int(features.shape[1]),
        "mean_tokens_per_example": float(np.mean([len(prefix) + features.shape[1] + len(q) + len(a)
                                                  for _, q, a in examples])),
        "lora_params": n_lora_params(peft_model),
        "projector_params": int(sum(p.numel() for p in proj_params)),
        "stage1": stage1, "stage2": stage2, "timings": timings,
        "env": {**_env_info(), "device": str(dev), "nice": os.nice(0)},
        "sha256": {"projector.safetensors": sha256_file(out_dir / "projector.safetensors"),
                   "adapter/adapter_model.safetensors": sha256_file(out_dir / "adapter" / "adapter_model.safetensors")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / "training.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="train embedlens-mini v2 (stage 1 projector, stage 2 + LoRA)")
    ap.add_argument("--model", default="resources/models/embedlens-mini")
    ap.add_argument("--out", required=True)
    ap.add_argument("--objects", default="resources/mini-data/objects")
    ap.add_argument("--stage1-steps", type=int, default=RecipeV2.stage1_steps)
    ap.add_argument("--stage2-steps", type=int, default=RecipeV2.stage2_steps)
    ap.add_argument("--batch-size", type=int, default=RecipeV2.batch_size)
    ap.add_argument("--n-scenes", type=int, default=RecipeV2.n_scenes)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    log = train_mini_v2(a.model, a.out, a.objects, a.stage1_steps, a.stage2_steps, a.batch_size, a.seed,
                        a.n_scenes, a.device)
    print(json.dumps({k: {kk: v.get(kk) for kk in ("s_per_step", "loss_first_mean", "loss_last_mean")}
                      for k, v in (("stage1", log["stage1"]), ("stage2", log["stage2"]))} | {"timings": log["timings"]},
                     indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def train_mini_v2_step(out_dir: Path | str, wheels: Path | str, data: Path | str, *,
                       model_dir: Path | str | None = None, **kwargs: Any) -> dict:
    """``embedlens train-mini-v2``: fetch the real objects into ``data`` (only here: building
    never fetches them), then :func:`train_mini_v2` on ``model_dir`` or, when it is None, on
    a v1 embedlens-mini assembled from the cached parts with the committed v1 projector.

    Raises:
        see :func:`embedlens.mini.sources.fetch_sources`, :func:`train_mini_v2` and
        :func:`embedlens.mini.build.build_mini`.
    """
    import tempfile

    from .build import DEFAULT_OUT_DIR, build_mini
    from .sources import fetch_sources

    objects = fetch_sources(data)
    # the workflow's cache of converted towers, so the base assembles without converting again
    parts_dir = DEFAULT_OUT_DIR.parent / f".{DEFAULT_OUT_DIR.name}-parts"
    with tempfile.TemporaryDirectory(prefix="embedlens-mini-base-") as tmp:
        base = model_dir if model_dir is not None else build_mini(Path(tmp) / "embedlens-mini", wheels,
                                                                  parts_dir=parts_dir, version=1)
        return train_mini_v2(base, out_dir, objects, **kwargs)
