"""The GPU check: the GPU code paths, run for real, in a few minutes (driver of gpu_check.sh).

On a machine with a CUDA device, on a tiny LLaVA (random weights, embedlens.testing) and a
small synthetic data set:

1. extraction in float16 and bfloat16 with batch 4 vs batch 1: max |difference| of the
   stored states (float32 on the CPU as the reference beside them);
2. out-of-memory back-off really triggered: a memory cap
   (``torch.cuda.set_per_process_memory_fraction``) that a batch of 16 exceeds; the shard's
   ``batch_backoffs`` and its states vs batch 1;
3. categorize and lens on the GPU vs the CPU: seconds, and the share of equal top-1 ids;
4. compression benchmark latency (prefill seconds per condition) on the GPU.

Without a CUDA device it runs what the CPU can (1 in float32, 3 on the CPU) and says which
parts it skipped. Prints figures; exits non-zero when a check fails.

    python benchmarks/gpu_check.py [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedlens.datasets import materialize
from embedlens.extract import ExtractSettings, export_vocab, extract_shard
from embedlens.store import open_shard, write_index
from embedlens.testing.tiny import build_tiny_model

N_IMAGES = 8
FAILED: list[str] = []


def say(msg: str) -> None:
    print(msg, flush=True)


def check(ok: bool, what: str) -> None:
    say(f"    {'ok' if ok else 'FAILED'}: {what}")
    if not ok:
        FAILED.append(what)


def extract(model, data, out, *, dtype, batch, device, **kw):
    settings = ExtractSettings(compute_dtype=dtype, store_dtype="float32", device=device, batch_size=batch,
                               check_batch=False, **kw)
    t = time.perf_counter()
    path = extract_shard(model, data, out, start=0, stop=N_IMAGES, settings=settings, model_name="tiny",
                         progress=False)
    return open_shard(path), time.perf_counter() - t


def max_abs_diff(a, b) -> float:
    x, y = a["llm_hidden"].values, b["llm_hidden"].values
    both = np.isfinite(x) & np.isfinite(y)
    return float(np.abs(x[both] - y[both]).max())


def part_batches(model, data, work, device) -> None:
    say("1. extraction, batch 4 vs batch 1")
    ref, _ = extract(model, data, work / "cpu-f32-b1.zarr", dtype="float32", batch=1, device="cpu")
    dtypes = ["float16", "bfloat16"] if device == "cuda" else ["float32"]
    for dtype in dtypes:
        one, t1 = extract(model, data, work / f"{dtype}-b1.zarr", dtype=dtype, batch=1, device=device)
        four, t4 = extract(model, data, work / f"{dtype}-b4.zarr", dtype=dtype, batch=4, device=device)
        d_batch, d_ref = max_abs_diff(four, one), max_abs_diff(one, ref)
        scale = float(np.nanmax(np.abs(ref["llm_hidden"].values)))
        say(f"    {dtype} on {device}: max|batch4 - batch1| = {d_batch:.3g}, max|batch1 - cpu float32| = "
            f"{d_ref:.3g} (max|h| {scale:.3g}); {t1:.2f} s at batch 1, {t4:.2f} s at batch 4")
        tol = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}[dtype] * scale
        check(d_batch <= tol, f"{dtype} batch 4 equals batch 1 within {tol:.2g}")


def part_oom(model, data, work) -> None:
    say("2. out-of-memory back-off under a memory cap")
    one, _ = extract(model, data, work / "oom-b1.zarr", dtype="float16", batch=1, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    extract(model, data, work / "oom-probe.zarr", dtype="float16", batch=1, device="cuda")
    per_image = max(1, torch.cuda.max_memory_allocated() - base)
    total = torch.cuda.get_device_properties(0).total_memory
    # room for the model (loaded again by the job) and ~3 images' activations: 16 do not fit
    cap = (2 * base + 3 * per_image + (64 << 20)) / total
    say(f"    batch-1 peak {per_image / 2**20:.1f} MiB above {base / 2**20:.1f} MiB; cap {cap * total / 2**20:.0f} MiB")
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap), 0)
    try:
        capped, t = extract(model, data, work / "oom-b16.zarr", dtype="float16", batch=16, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    backoffs = capped.attrs.get("batch_backoffs") or []
    say(f"    batch 16 under the cap: backoffs {backoffs}, final batch {capped.attrs.get('final_batch_size')}, "
        f"{t:.2f} s; max|capped - batch 1| = {max_abs_diff(capped, one):.3g}")
    check(any("out of memory" in b for b in backoffs), "the cap triggered an out-of-memory back-off")
    check(max_abs_diff(capped, one) <= 5e-2 * float(np.nanmax(np.abs(one["llm_hidden"].values))),
          "the backed-off shard equals batch 1")


def part_analyses(model, data, work, device) -> None:
    from embedlens.analysis.categorize import read_categories
    from embedlens.analysis.steps import categorize_step, lens_step

    say("3. categorize and lens" + (" on the GPU vs the CPU" if device == "cuda" else " on the CPU"))
    index = work / "hidden.json"
    write_index([work / "cpu-f32-b1.zarr"], index)
    export_vocab(model, work / "vocab.zarr", model_name="tiny")
    results = {}
    for dev in (["cpu", "cuda"] if device == "cuda" else ["cpu"]):
        t = time.perf_counter()
        categorize_step(index, work / "vocab.zarr", data, work / f"categorize-{dev}", {"device": dev},
                        model="tiny", dataset="shapes", progress=False)
        tc = time.perf_counter() - t
        t = time.perf_counter()
        lens_step(index, work / "vocab.zarr", model, work / f"lens-{dev}", {"device": dev},
                  model="tiny", dataset="shapes", progress=False)
        tl = time.perf_counter() - t
        results[dev] = read_categories(work / f"categorize-{dev}")
        say(f"    {dev}: categorize {tc:.2f} s, lens {tl:.2f} s")
    if "cuda" in results:
        a, b = results["cpu"], results["cuda"]
        cols = [c for c in a.columns if c == "label" or c.startswith("top1")] or list(a.columns[-1:])
        same = min(float((a[c].to_numpy() == b[c].to_numpy()).mean()) for c in cols)
        say(f"    categorize {cols} equal on CPU and GPU for {same:.4f} of the tokens")
        check(same >= 0.999, "GPU categorize agrees with the CPU")


def part_compress(model, data, work) -> None:
    from embedlens.compress.benchmark import run_compress

    say("4. compression benchmark latency on the GPU")
    parquet = next((work / "categorize-cuda").glob("categories*.parquet"), None) or \
        next((work / "categorize-cpu").glob("categories*.parquet"))
    t = time.perf_counter()
    table = run_compress(model, data, parquet, None, work / "compress", n_items=4, seeds=(0,), repeats=2,
                         device="cuda", dtype="float16", latency_items=2, progress=False)
    cols = [c for c in table.columns if "latency" in c or "seconds" in c or "prefill" in c]
    say(f"    {time.perf_counter() - t:.1f} s in all")
    say(table[["condition", *cols]].to_string(max_rows=20) if "condition" in table.columns
        else table[cols].to_string(max_rows=20))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="embedlens-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        say(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        say("no CUDA device visible: the GPU parts (float16/bfloat16 extraction, the out-of-memory "
            "back-off, categorize/lens on the GPU, compress latency) are SKIPPED; running the CPU parts")
    t0 = time.perf_counter()
    try:
        model = build_tiny_model("llava", work / "tiny-llava", seed=0)
        data = materialize("shapes", {"source": "synthetic", "n_images": N_IMAGES, "seed": 1,
                                      "image_size": 64, "grid": 4}, work / "shapes")
        part_batches(model, data, work, device)
        if device == "cuda":
            part_oom(model, data, work)
        else:
            say("2. out-of-memory back-off: SKIPPED (needs a CUDA device and its memory cap)")
        part_analyses(model, data, work, device)
        if device == "cuda":
            part_compress(model, data, work)
        else:
            say("4. compression benchmark latency: SKIPPED (GPU latency only)")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.perf_counter() - t0:.0f} s; " + (f"FAILED: {json.dumps(FAILED)}" if FAILED else "all checks ok"))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
