"""Hidden-state store cost, side by side with raw float16 in one run (compare ratios).

    python benchmarks/bench_store.py [--images 64 --layers 31 --tokens 64 --dim 576] [--large]

On one synthetic array of realistic shape (image, layer, token, dim), float32 in memory,
float16 on disk, with hidden-state-like statistics (Gaussian, per-dimension log-normal
scales, a few "massive activation" dimensions), measures:

  - bytes on disk per stored value and write throughput (MB/s of float16 payload) of
    `embedlens.store.ShardWriter` (atomic temp dir + rename, one chunk per image x layer,
    coordinates, consolidated metadata) against `np.save` of the same array cast to
    float16 (the raw floor: one contiguous file, no chunking, no metadata);
  - read time of one layer for all images and of all layers for one image, through
    xarray (`embedlens.store.open_hidden`, what every analysis uses; open included, then
    split into open / `.values` on the open store / the zarr array read directly) against
    slicing the raw file (`np.load(mmap_mode="r")`, copied into memory).

Each variant runs `--repeats` times, interleaved; the median is reported. Files are in the
page cache when read (dropping it needs root): read times are warm-cache times. Neither
writer calls fsync. `--large` adds a second case: 4 images x 33 layers x 576 tokens x
4096 dims (a LLaVA-1.5-7B shard of 4 images, 1.2 GB float32 in memory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def hidden_like(shape: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """float32 (image, layer, token, dim) with per-dim scales and a few huge dims."""
    rng = np.random.default_rng(seed)
    n_img, n_lay, n_tok, dim = shape
    scale = rng.lognormal(0.0, 0.5, size=dim).astype(np.float32)
    massive = rng.choice(dim, size=max(1, dim // 256), replace=False)
    out = np.empty(shape, dtype=np.float32)
    for i in range(n_img):
        x = rng.standard_normal((n_lay, n_tok, dim), dtype=np.float32) * scale
        x[:, :, massive] *= 200.0  # still inside float16's range (max 65504)
        out[i] = x
    return out


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_store(arr: np.ndarray, path: Path) -> None:
    from embedlens.store import ShardWriter, atomic_directory

    n_img, n_lay, n_tok, _ = arr.shape
    side = int(np.sqrt(n_tok))
    rows, cols = np.arange(n_tok) // side, np.arange(n_tok) % side
    with atomic_directory(path) as tmp:
        w = ShardWriter(tmp, n_images=n_img, layers=list(range(n_lay)), vision_layers=[],
                        dtype="float16", attrs={"model": "bench"})
        for i in range(n_img):
            w.write(i, f"img-{i:05d}", arr[i], None, rows, cols, (side, n_tok // side))
        w.close()


def write_raw(arr: np.ndarray, path: Path) -> None:
    np.save(path, arr.astype(np.float16))


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def run_case(arr: np.ndarray, work: Path, repeats: int) -> list[tuple[str, float, float, str]]:
    from embedlens.store import open_hidden

    n_img, n_lay, n_tok, dim = arr.shape
    n_values = arr.size
    payload_mb = n_values * 2 / 1e6
    store, raw = work / "shard-0000.zarr", work / "raw.npy"
    writes: dict[str, list[float]] = {"store": [], "raw": []}
    for _ in range(repeats):  # interleaved
        for p in (store, raw):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        writes["store"].append(timed(write_store, arr, store))
        writes["raw"].append(timed(write_raw, arr, raw))
    w_store, w_raw = statistics.median(writes["store"]), statistics.median(writes["raw"])

    layer, image = n_lay // 2, n_img // 2
    ds = open_hidden([store])
    mm = np.load(raw, mmap_mode="r")
    # correctness of what is compared: same values either way
    assert np.array_equal(ds.llm_hidden.sel(layer=layer).values, np.asarray(mm[:, layer]))
    arr_z = zarr.open_array(str(store / "llm_hidden"), mode="r")
    cases = {
        "open": lambda: open_hidden([store]),
        "layer_xr": lambda: open_hidden([store]).llm_hidden.sel(layer=layer).values,
        "layer_open": lambda: ds.llm_hidden.sel(layer=layer).values,
        "layer_zarr": lambda: arr_z[:, layer],
        "layer_raw": lambda: np.array(np.load(raw, mmap_mode="r")[:, layer]),
        "image_xr": lambda: open_hidden([store]).llm_hidden.isel(image=image).values,
        "image_open": lambda: ds.llm_hidden.isel(image=image).values,
        "image_zarr": lambda: arr_z[image],
        "image_raw": lambda: np.array(np.load(raw, mmap_mode="r")[image]),
    }
    reads: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):  # interleaved
        for k, fn in cases.items():
            reads[k].append(timed(fn))
    r = {k: statistics.median(v) * 1e3 for k, v in reads.items()}

    b_store, b_raw = du(store), du(raw)
    lay, img = f"layer {layer}, all {n_img} images", f"image {image}, all {n_lay} layers"
    return [
        ("bytes on disk per value", b_store / n_values, b_raw / n_values, "B"),
        ("write throughput (float16 payload)", payload_mb / w_store, payload_mb / w_raw, "MB/s"),
        ("write time", w_store, w_raw, "s"),
        (f"read {lay}: open_hidden + .values", r["layer_xr"], r["layer_raw"], "ms"),
        ("  of which open_hidden (metadata)", r["open"], r["layer_raw"], "ms"),
        ("  .values on an open store", r["layer_open"], r["layer_raw"], "ms"),
        ("  zarr array directly (no xarray/dask)", r["layer_zarr"], r["layer_raw"], "ms"),
        (f"read {img}: open_hidden + .values", r["image_xr"], r["image_raw"], "ms"),
        ("  .values on an open store", r["image_open"], r["image_raw"], "ms"),
        ("  zarr array directly (no xarray/dask)", r["image_zarr"], r["image_raw"], "ms"),
    ]


def print_table(title: str, rows) -> None:
    print(f"\n{title}")
    print(f"{'metric':<52} {'zarr store':>11} {'raw np.save':>11} {'store/raw':>10}  unit")
    print("-" * 96)
    for name, a, b, unit in rows:
        print(f"{name:<52} {a:>11.4g} {b:>11.4g} {a / b:>10.3g}  {unit}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large", action="store_true",
                    help="also 4 images x 33 layers x 576 tokens x 4096 dims")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    cases = [(args.images, args.layers, args.tokens, args.dim)]
    if args.large:
        cases.append((4, 33, 576, 4096))
    print(f"CPU cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.2f}; "
          f"repeats: {args.repeats} (median)")
    for shape in cases:
        work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.workdir))
        try:
            arr = hidden_like(shape)
            rows = run_case(arr, work, args.repeats)
            print_table(f"(image, layer, token, dim) = {shape}: {arr.size * 2 / 1e6:.1f} MB as float16", rows)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
