"""Projector-only training of ``embedlens-mini`` on synthetic captions (LLaVA stage 1).

Recipe (``shared/spec/embedded-model.md``): frozen vision tower and LLM; the vision
features of every training image are computed once; each example is the chat template's
user turn "<image>\\nDescribe the image." (64 image tokens) followed by the assistant turn
holding the caption ("A red circle and an orange letter K."); the loss is the LM's
next-token loss on the assistant turn only (caption + end-of-turn token); only the 2-layer
projector is trained. AdamW (lr 1e-3, betas (0.9, 0.98), no weight decay), 5 % linear
warm-up then cosine decay to 0, gradient clipping at 1.0, batch 16, bf16 autocast on CPU.

Deterministic by ``seed``: the projector initialisation, the batch order and the data are
functions of the seed (training images come from the synthetic set with
``data_seed = TRAIN_DATA_SEED_BASE + seed``; evaluation uses ``EVAL_DATA_SEED``, disjoint).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedlens.models import loading as _loading, parts
from embedlens.models.overrides import get_overrides
# The prompt format is the model's: the chat template's user turn (image + question) with the
# generation prompt, and the text the template adds after it for an assistant answer.
from embedlens.models.prompt import assistant_suffix, chat_prompt  # noqa: F401 - re-exported

DEFAULT_STEPS = 400
DEFAULT_BATCH = 16
DEFAULT_LR = 1e-3
TRAIN_DATA_SEED_BASE = 1_000  # training images: synthetic seed 1000 + seed
EVAL_DATA_SEED = 999_999  # held-out images for eval-model (never a training seed)
CAPTION_QUESTION = "Describe the image."


@dataclass
class Recipe:
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    lr: float = DEFAULT_LR
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    schedule: str = "linear warm-up, then cosine to 0"
    grad_clip: float = 1.0
    n_images: int = 0  # distinct training images (0 → chosen from steps × batch)
    data_seed: int = 0
    image_size: int = 224
    p_letter: float = 0.6
    bf16_autocast: bool = True
    prompt: str = CAPTION_QUESTION
    trained: str = "multi_modal_projector only; vision tower and LLM frozen"
    loss: str = "next-token cross-entropy on the assistant turn (caption + end-of-turn token)"
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Pieces shared with evaluation
# --------------------------------------------------------------------------------------


def load_model(model_dir: Path | str, dtype: torch.dtype = torch.float32):
    """(model, processor) from a saved embedlens-mini (or any LLaVA-style) directory, offline
    (local files only), through `embedlens.models.loading`; the model on the CPU, in eval mode.

    Raises:
        OSError / ValueError: the directory does not hold a loadable model and processor.
    """
    model = _loading.load_model(model_dir, dtype=dtype, local_files_only=True)
    processor = _loading.load_processor(model_dir, local_files_only=True)
    return model, processor


def _projector(model):
    return parts.projector_of(model)


def _vision_select(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision features as the model feeds them to its projector (the architecture's rule,
    `ArchOverrides.projector_input`: LLaVA's feature layer and select strategy)."""
    return get_overrides(getattr(model.config, "model_type", "")).projector_input(model, pixel_values)


@torch.no_grad()
def precompute_features(model, processor, images: Sequence, batch_size: int = 32,
                        bf16: bool = True, progress: bool = True) -> torch.Tensor:
    """Frozen vision features ``(N, n_visual_tokens, vision_dim)`` for ``images`` (bf16 storage)."""
    from tqdm.auto import tqdm

    chunks = []
    it = range(0, len(images), batch_size)
    for i in tqdm(it, desc="vision features", unit="batch", disable=not progress, leave=False):
        pv = processor.image_processor(list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        dev = model.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            feats = _vision_select(model, pv.to(dev, model.dtype))
        chunks.append(feats.to(torch.bfloat16 if bf16 else torch.float32).cpu())
    return torch.cat(chunks, 0)


def tokenize_examples(processor, captions: Sequence[str], question: str = CAPTION_QUESTION,
                      sample_image=None) -> tuple[list[int], list[list[int]]]:
    """(prompt ids with the image placeholder expanded, target ids per caption)."""
    from PIL import Image

    prompt = chat_prompt(processor, question)
    img = sample_image if sample_image is not None else Image.new("RGB", (224, 224), (255, 255, 255))
    prompt_ids = processor(images=[img], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    tok = processor.tokenizer
    targets = [tok(assistant_suffix(processor, question, c), add_special_tokens=False)["input_ids"]
               for c in captions]
    return prompt_ids, targets


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class ProjectorTrainer:
    """One projector-training run over precomputed features (frozen everything else)."""

    def __init__(self, model, prompt_ids: list[int], targets: list[list[int]], features: torch.Tensor,
                 recipe: Recipe, pad_id: int, prefix_cache: bool = True):
        self.model = model
        self.recipe = recipe
        self.features = features
        self.targets = targets
        self.pad_id = pad_id
        self.device = model.device
        self.prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        self.image_pos = (self.prompt == parts.image_token_id(model)).nonzero().squeeze(-1)
        if len(self.image_pos) != features.shape[1]:
            raise ValueError(f"prompt has {len(self.image_pos)} image tokens, features have "
                             f"{features.shape[1]} tokens")
        for p in model.parameters():
            p.requires_grad_(False)
        self.proj = _projector(model)
        for p in self.proj.parameters():
            p.requires_grad_(True)
        self.embed = model.get_input_embeddings()
        self.lm = parts.decoder_of(model)
        self.head = model.get_output_embeddings()
        with torch.no_grad():
            self.prompt_emb = self.embed(self.prompt).detach()  # (P, d)
        # The prompt part before the first image token (system turn, "<|im_start|>user\n") is the
        # same in every example and, with causal attention, independent of everything after it:
        # its keys/values are computed once (no gradient needed) and reused by every step.
        self.n_prefix = int(self.image_pos[0]) if prefix_cache else 0
        self.prefix_kv = None
        if self.n_prefix > 0:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                 enabled=recipe.bf16_autocast):
                out = self.lm(inputs_embeds=self.prompt_emb[: self.n_prefix].unsqueeze(0), use_cache=True)
            self.prefix_kv = out.past_key_values
        self.opt = torch.optim.AdamW(self.proj.parameters(), lr=recipe.lr, betas=tuple(recipe.betas),
                                     weight_decay=recipe.weight_decay)
        warm = max(1, int(round(recipe.warmup_frac * recipe.steps)))

        def lr_lambda(step: int) -> float:  # step = number of optimizer steps done
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, recipe.steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.rng = np.random.default_rng(recipe.seed)
        self._order: list[int] = []

    def next_batch(self) -> list[int]:
        n = len(self.targets)
        while len(self._order) < self.recipe.batch_size:
            self._order.extend(self.rng.permutation(n).tolist())
        b, self._order = self._order[:self.recipe.batch_size], self._order[self.recipe.batch_size:]
        return b

    def loss_on(self, idx: Sequence[int]) -> torch.Tensor:
        P, S = len(self.prompt), self.n_prefix
        lens = [len(self.targets[i]) for i in idx]
        T = max(lens)
        B = len(idx)
        tgt = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + T), dtype=torch.long)
        mask[:, :P] = 1
        for j, i in enumerate(idx):
            tgt[j, :lens[j]] = torch.tensor(self.targets[i])
            mask[j, P:P + lens[j]] = 1
        tgt, mask = tgt.to(self.device), mask.to(self.device)
        with torch.no_grad():
            tgt_emb = self.embed(tgt)
        feats = self.features[list(idx)].to(self.device)
        kw: dict[str, Any] = {"use_cache": False}
        if self.prefix_kv is not None:
            cache = copy.deepcopy(self.prefix_kv)
            cache.batch_repeat_interleave(B)
            kw = {"past_key_values": cache, "use_cache": True}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe.bf16_autocast):
            img = self.proj(feats.to(torch.float32))
            emb = self.prompt_emb[S:].unsqueeze(0).expand(B, -1, -1).clone().to(img.dtype)
            emb[:, self.image_pos - S] = img
            emb = torch.cat([emb, tgt_emb.to(img.dtype)], dim=1)  # (B, P - S + T, d)
            h = self.lm(inputs_embeds=emb, attention_mask=mask, **kw).last_hidden_state
            # sequence position P - 1 + k (row index P - 1 - S + k of h) predicts target token k
            sel = torch.zeros((B, P - S + T), dtype=torch.bool, device=self.device)
            labels = []
            for j in range(B):
                sel[j, P - 1 - S:P - 1 - S + lens[j]] = True
                labels.append(tgt[j, :lens[j]])
            logits = self.head(h[sel])
        return torch.nn.functional.cross_entropy(logits.float(), torch.cat(labels))

    def step(self) -> tuple[float, float, float]:
        idx = self.next_batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_on(idx)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.proj.parameters(), self.recipe.grad_clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        return float(loss.detach()), float(gnorm), lr


def projector_state(model) -> dict[str, torch.Tensor]:
    from embedlens.mini.build import PROJECTOR_PREFIX

    return {PROJECTOR_PREFIX + k: v.detach().to(torch.float32).contiguous().clone()
            for k, v in _projector(model).state_dict().items()}


def _canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted, so the same tensors
    and metadata give the same bytes: safetensors writes the metadata map in a per-map random
    order (a Rust HashMap), so two saves in one process could differ with 2+ metadata keys."""
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = {k: (dict(sorted(v.items())) if k == "__metadata__" else v)
              for k, v in sorted(json.loads(data[8:8 + n]).items())}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # never seen (same content, compact JSON); keep the tensor offsets' alignment
        text += b" " * (-len(text) % 8)
    else:
        text += b" " * (n - len(text))
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def save_projector(model, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the projector's weights as safetensors with ``metadata``; byte-identical for
    the same weights and metadata (sorted header)."""
    from safetensors.torch import save

    from embedlens.atomic import atomic_file

    path = Path(path)
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    data = _canonical_safetensors(save(projector_state(model), metadata=meta))
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def _env_info() -> dict[str, Any]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def train_projector(model_dir: Path | str, out_path: Path | str, steps: int = DEFAULT_STEPS, seed: int = 0,
                    batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, n_images: int = 0,
                    warmup_frac: float = 0.05, bf16: bool = True, log_path: Path | str | None = None,
                    progress: bool = True, threads: int | None = None,
                    feature_threads: int | None = 1, device: str = "auto") -> dict[str, Any]:
    """Train the projector of the model in ``model_dir``; write weights + a JSON log.

    ``out_path``: the projector ``.safetensors``; ``log_path``: the JSON with recipe, loss
    curve and timings (default ``training.json`` beside ``out_path``). ``n_images``: distinct
    synthetic training images (0 → ``min(steps × batch_size, 4000)``). ``device``: ``"auto"``
    (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``; bf16 autocast on either.
    Returns the log dict.
    """
    from embedlens.extract import resolve_device

    from tqdm.auto import tqdm

    from embedlens.datasets.synthetic import make_examples
    from embedlens.mini.build import init_projector_

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    load_samples = [os.getloadavg()[0]]
    if threads:
        torch.set_num_threads(int(threads))
    out_path = Path(out_path)
    log_path = Path(log_path) if log_path else out_path.parent / "training.json"
    n_images = int(n_images) or min(steps * batch_size, 4000)
    recipe = Recipe(steps=int(steps), batch_size=int(batch_size), seed=int(seed), lr=float(lr),
                    warmup_frac=float(warmup_frac), n_images=n_images,
                    data_seed=TRAIN_DATA_SEED_BASE + int(seed), bf16_autocast=bool(bf16))
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}

    model, processor = load_model(model_dir)
    dev = resolve_device(device)
    model.to(dev)
    init_projector_(_projector(model), recipe.seed)
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    examples = make_examples(n_images, recipe.data_seed, image_size=recipe.image_size, p_letter=recipe.p_letter)
    images = [e.image for e in examples]
    captions = [e.caption for e in examples]
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    # One thread for the many small vision forwards: as fast as two on an idle 2-core machine
    # within ~1.5x, and 3-4x faster than two when other jobs share the CPU.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(int(feature_threads) if feature_threads else n_threads)
    try:
        features = precompute_features(model, processor, images, bf16=bf16, progress=progress)
    finally:
        torch.set_num_threads(n_threads)
    del images, examples
    timings["features_s"] = time.perf_counter() - t
    prompt_ids, targets = tokenize_examples(processor, captions)

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = ProjectorTrainer(model, prompt_ids, targets, features, recipe, pad_id)

    t = time.perf_counter()
    losses, gnorms, lrs = [], [], []
    bar = tqdm(range(recipe.steps), desc="train projector", unit="step", disable=not progress)
    for _ in bar:
        loss, gnorm, cur_lr = trainer.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss {loss} at step {len(losses)}")
        losses.append(loss)
        gnorms.append(gnorm)
        lrs.append(cur_lr)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{cur_lr:.2e}")
        if len(losses) % 25 == 0:
            load_samples.append(os.getloadavg()[0])
    timings["train_s"] = time.perf_counter() - t
    timings["s_per_step"] = timings["train_s"] / max(1, recipe.steps)
    timings["total_s"] = time.perf_counter() - t0
    timings["process_cpu_s"] = time.process_time() - cpu0
    # other jobs on the machine slow a run down: the 1-min load average, sampled every 25 steps
    timings["loadavg_1min_mean"] = float(np.mean(load_samples))
    timings["loadavg_1min_max"] = float(np.max(load_samples))

    every = max(1, recipe.steps // 24)
    curve = [{"step": i + 1, "loss_mean": float(np.mean(losses[max(0, i + 1 - every):i + 1]))}
             for i in range(every - 1, recipe.steps, every)]
    log = {
        "model_dir": str(model_dir),
        "recipe": asdict(recipe),
        "n_prompt_tokens": len(prompt_ids),
        "n_visual_tokens": int(features.shape[1]),
        "vision_feature_layer": model.config.vision_feature_layer,
        "projector_params": int(sum(p.numel() for p in _projector(model).parameters())),
        "loss_first": losses[0], "loss_last_mean20": float(np.mean(losses[-20:])),
        "loss_curve": curve, "loss": losses, "grad_norm": gnorms, "lr": lrs,
        "timings": timings, "env": {**_env_info(), "device": str(dev)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_projector(model, out_path, {"embedlens_recipe": asdict(recipe)})
    log["projector_path"] = str(out_path)
    from embedlens.mini.build import sha256_file

    log["projector_sha256"] = sha256_file(out_path)
    from embedlens.atomic import atomic_file

    with atomic_file(log_path) as tmp:
        tmp.write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="train the embedlens-mini projector")
    ap.add_argument("--model", default="resources/models/embedlens-mini")
    ap.add_argument("--out", default="src/embedlens/mini/projector.safetensors")
    ap.add_argument("--log", default=None)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--n-images", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    log = train_projector(a.model, a.out, a.steps, a.seed, a.batch_size, lr=a.lr, n_images=a.n_images,
                          bf16=not a.no_bf16, log_path=a.log, device=a.device)
    print(json.dumps({k: log[k] for k in ("loss_first", "loss_last_mean20", "timings")}, indent=1),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def train_projector_step(out_path: Path | str, wheels: Path | str, *, model_dir: Path | str | None = None,
                         **kwargs: Any) -> dict:
    """``embedlens train-projector``: :func:`train_projector` on ``model_dir``, or, when it
    is None, on an embedlens-mini assembled from the cached parts (training re-initializes
    the projector, so any assembly of the frozen towers serves as the base).

    Raises
    ------
    see :func:`train_projector` and :func:`embedlens.mini.build.build_mini`.
    """
    import tempfile

    from .build import build_mini

    with tempfile.TemporaryDirectory(prefix="embedlens-mini-base-") as tmp:
        base = model_dir if model_dir is not None else build_mini(Path(tmp) / "embedlens-mini", wheels)
        return train_projector(base, out_path, **kwargs)
