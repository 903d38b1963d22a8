"""The architecture table of the README: every tiny architecture x the extraction checks.

    python benchmarks/arch_table.py            # prints a Markdown table (about a minute on 2 cores)

Per architecture, on four images of mixed sizes (32x32, 48x32, 32x20, 24x40), float32 CPU:
visual tokens per image, positions = image-token positions, stored = direct HF call
(max relative difference), batch of 4 = each image alone (max relative difference, LLM and
vision states), vision states split per image (vision tokens per image), and the grid
per image (R x C, or "unknown" with the reason recorded). The tests assert the same
checks (tests/test_models.py, tests/test_extract.py); this prints the figures.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedlens.models.adapter import VLMAdapter
from embedlens.testing import TINY_ARCHS, TINY_SKIPPED, build_tiny_model

SIZES = [(32, 32), (48, 32), (32, 20), (24, 40)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check(arch: str, root: Path) -> dict:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    ad = VLMAdapter.load(build_tiny_model(arch, root / arch))
    batch = ad.prepare(images, "Describe the image.")
    ad.truncate = False  # the same sequence as the direct call
    together = ad.forward_hidden(batch, None, [-1])
    ad.truncate = True
    with torch.inference_mode():
        ref = ad.model(**batch.inputs, output_hidden_states=True).hidden_states
    ids, mask = batch["input_ids"], batch["attention_mask"]
    direct, batched, positions_ok = 0.0, 0.0, True
    for i, img in enumerate(together):
        pos = torch.nonzero((ids[i] == ad.image_token_id) & mask[i].bool()).flatten()
        positions_ok &= np.array_equal(img.positions, pos.numpy())
        direct = max(direct, _rel(img.llm, torch.stack([h[i, pos] for h in ref])))
        (alone,) = ad.forward_hidden(ad.prepare([images[i]], "Describe the image."), None, [-1])
        batched = max(batched, _rel(img.llm, alone.llm), _rel(img.vision, alone.vision))
    grids = {("x".join(map(str, t.grid)) if t.grid_known else "unknown") for t in together}
    return {
        "arch": arch,
        "class": type(ad.model).__name__,
        "tokens": "/".join(str(t.n_tokens) for t in together),
        "positions": "yes" if positions_ok else "NO",
        "direct": direct,
        "batch": batched,
        "vision": "/".join(str(t.vision.shape[1]) for t in together),
        "grid": ", ".join(sorted(grids)),
        "note": next((t.layout_note for t in together if not t.grid_known), ""),
    }


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in TINY_ARCHS:
            try:
                rows.append(check(arch, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - a failing architecture is a row, not a crash
                rows.append({"arch": arch, "class": "", "tokens": "", "positions": "FAILED", "direct": float("nan"),
                             "batch": float("nan"), "vision": "", "grid": "", "note": f"{type(exc).__name__}: {exc}"})
    print("| model_type | class | visual tokens (4 images) | positions = image tokens | stored vs direct "
          "| batch 4 vs 1 | vision tokens per image | grid |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['class']} | {r['tokens']} | {r['positions']} | {r['direct']:.1e} "
              f"| {r['batch']:.1e} | {r['vision']} | {r['grid']} |")
    for arch, why in TINY_SKIPPED.items():
        print(f"| {arch} | skipped | | | | | | {why} |")
    notes = [r for r in rows if r["note"]]
    if notes:
        print()
        for r in notes:
            print(f"- {r['arch']}: {r['note']}")
    return 1 if any(r["positions"] != "yes" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
