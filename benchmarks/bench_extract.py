"""Extraction throughput, side by side in one run (machines here are noisy: compare ratios).

    python benchmarks/bench_extract.py [--model resources/models/embedlens-mini] [--images 64]

Measures images/s of
  (a) the plain batched forward pass with nothing captured (the ceiling),
  (b) the naive loop a researcher writes by hand: one image at a time,
      output_hidden_states=True, one torch.save per image,
  (c) `embedlens extract` (extract_shard: batched, every layer into Zarr; by default the
      prompt text after the last visual token is left out of the forward pass where the
      architecture allows it, see ArchOverrides.truncate_after_image),
  (c0) the same without that truncation (the whole prompt, as (a) runs it),
and prints (c)/(a), (c)/(b) and (c0)/(a). Each variant runs `--repeats` times
interleaved; the median is reported.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resources/models/embedlens-mini")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--store-dtype", default="float16")
    args = ap.parse_args()

    from embedlens.datasets import load_dataset, materialize
    from embedlens.extract import ExtractSettings, extract_shard
    from embedlens.models.adapter import VLMAdapter
    from embedlens.runtime import resolve_device

    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    data_dir = materialize("bench", {"source": "synthetic", "n_images": args.images, "seed": 7},
                           work / "data")
    data = load_dataset(data_dir)
    images = [data.image(i) for i in range(len(data.images))]
    adapter = VLMAdapter.load(args.model, dtype=args.dtype, device=device)
    prompt = "Describe the image."
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def plain_forward() -> None:
        with torch.inference_mode():
            for i in range(0, len(images), args.batch_size):
                batch = adapter.prepare(images[i: i + args.batch_size], prompt)
                adapter.model(**batch)
        sync()

    def naive_loop() -> None:
        out = work / "naive"
        out.mkdir(exist_ok=True)
        with torch.inference_mode():
            for i, img in enumerate(images):
                batch = adapter.prepare([img], prompt)
                hs = adapter.model(**batch, output_hidden_states=True).hidden_states
                mask = batch["input_ids"][0] == adapter.image_token_id
                torch.save([h[0][mask].cpu() for h in hs], out / f"{i}.pt")
        sync()
        shutil.rmtree(out)

    def embedlens_extract(truncate: bool = True) -> None:
        settings = ExtractSettings(batch_size=args.batch_size, device=device,
                                   compute_dtype=args.dtype, store_dtype=args.store_dtype,
                                   truncate=truncate)
        extract_shard(args.model, data_dir, work / "shard.zarr", start=0, stop=len(images),
                      settings=settings, model_name="bench", progress=False)
        shutil.rmtree(work / "shard.zarr")

    variants = {"plain forward (a)": plain_forward, "naive loop (b)": naive_loop,
                "embedlens extract (c)": embedlens_extract,
                "extract, whole prompt (c0)": lambda: embedlens_extract(truncate=False)}
    plain_forward()  # warm-up (allocator, kernels, page cache)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {k: len(images) / statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}  device {device}  dtype {args.dtype}  images {len(images)}  "
          f"batch {args.batch_size}  repeats {args.repeats}  torch threads {torch.get_num_threads()}")
    for name, r in rate.items():
        print(f"  {name:<24} {r:8.2f} images/s")
    c = rate["embedlens extract (c)"]
    print(f"  ratio (c)/(a) = {c / rate['plain forward (a)']:.2f}   (goal >= 0.8 CPU, >= 0.85 GPU)")
    print(f"  ratio (c)/(b) = {c / rate['naive loop (b)']:.2f}   (goal >= 1.3 CPU, >= 3 GPU)")
    c0 = rate["extract, whole prompt (c0)"]
    print(f"  ratio (c0)/(a) = {c0 / rate['plain forward (a)']:.2f}, (c0)/(b) = {c0 / rate['naive loop (b)']:.2f}"
          "   (without leaving out the text after the image)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
