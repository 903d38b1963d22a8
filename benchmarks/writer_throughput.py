"""Does the hidden-state store keep up with a GPU? (a benchmark, not a test)

Feeds the extraction's writer (`embedlens.store_writer.BackgroundWriter` over a
`embedlens.store.ShardWriter`, inside `atomic_directory`: the real path) with synthetic
states of LLaVA-1.5-7B's shape (576 visual tokens x 4096 dims x 33 hidden states, float16:
156 MB per image) as fast as a GPU would give them, and prints:

1. store throughput vs a raw sequential write of the same bytes to one file on the same
   disk (goal >= 0.7x). Both end with a ``syncfs`` of the file system, so both are timed
   to the disk, not to the page cache, with the kernel's parallel writeback.
2. overlap, for one shard of ``--images`` images (default 64: the extraction's default
   ``shard_size``, so the run is what one extraction job writes): the producer "computes"
   each image (a sleep: a GPU forward holds neither the GIL nor a core) for ``ratio`` times
   the time the store takes to write one, for each ``--ratios`` (default 0.25, 1, 4): below 1
   the GPU is faster than the disk (LLaVA-7B on one H100 forwards tens of images per second,
   i.e. several GB/s of states: more than most disks take), 1 is the balanced case where
   any slowdown of the writes shows, above 1 a slow model or GPU. Overlap: the share of the
   smaller of (compute, write) hidden behind the larger: (compute + write - wall) /
   min(compute, write), where write is all the store's work: the images' writes and the
   shard's close (coordinates, attributes, marker, rename) (goal >= 0.9; 0 = serial, 1 = the
   wall time is the larger of the two). Even a perfect pipeline writes the shard's last
   image and closes it after the last compute, and computes the first image before any
   write, so the ceiling is about (n - 1) / n (0.98 for 64), printed beside it. Split into its parts: the producer's stalls beyond what the slower side
   forces (time in its loop beyond max(compute, write)) as a share of the write time, and
   the drain (the writes left when the last image is computed, plus the shard's close).
   At ratio 1, the same with the writer inline (the extraction before the background
   writer) for comparison.

    python benchmarks/writer_throughput.py                  # 64 images (10 GB) per run, ~6 min
    python benchmarks/writer_throughput.py --images 24 --repeat 3 --dir /scratch/me

Everything written is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from embedlens.store import ShardWriter, atomic_directory
from embedlens.store_writer import BackgroundWriter


def _sync_to_disk(path: Path) -> None:
    """Flush the file system holding `path` to the disk (``syncfs``), as the kernel's
    writeback does during an extraction: all dirty files at once, in parallel. (An fsync of
    each of a shard's hundreds of chunk files one after the other would time a queue depth
    of one, which no extraction does: the store itself never fsyncs.)"""
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "syncfs") or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _states(args) -> list[np.ndarray]:
    """Two distinct images (reused in turn): normal values with a per-layer scale, as the
    norms of hidden states grow with depth; float16's mantissa is noise, as real states'."""
    rng = np.random.default_rng(0)
    scale = np.linspace(0.5, 20.0, args.layers, dtype=np.float32)[:, None, None]
    return [(rng.standard_normal((args.layers, args.tokens, args.dim), dtype=np.float32) * scale)
            .astype(args.dtype) for _ in range(2)]


def raw_write(root: Path, images: list[np.ndarray], n: int) -> float:
    path = root / "raw.bin"
    _sync_to_disk(root)  # start clean: no earlier run's dirty pages in the timed sync
    t = time.perf_counter()
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(memoryview(images[i % 2]).cast("B"))
        fh.flush()
    _sync_to_disk(root)
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def store_write(root: Path, images: list[np.ndarray], n: int, *, compute_s: float = 0.0,
                background: bool = True, max_pending: int = 2, fsync: bool = True) -> dict[str, float]:
    """Seconds for n images through the extraction's writer (and a sync of them to disk),
    the producer spending `compute_s` per image before handing it over: ``wall``, ``write``
    (the store's work: the images' writes + the shard's close), ``close`` (coordinates,
    attributes, completeness marker, rename: work that can only follow the last image),
    ``loop`` (the producer's loop: compute + its stalls) and ``drain`` (from the last
    hand-over to the shard's rename: pending writes + close)."""
    final = root / "shard-0000.zarr"
    n_tok = images[0].shape[1]
    rows, cols = np.arange(n_tok) // 24, np.arange(n_tok) % 24
    inline = 0.0
    _sync_to_disk(root)  # start clean, as the raw write does
    t = time.perf_counter()
    with atomic_directory(final) as tmp:
        writer = ShardWriter(tmp, n_images=n, layers=list(range(images[0].shape[0])), vision_layers=[],
                             dtype=str(images[0].dtype), attrs={"model": "benchmark"})
        with BackgroundWriter(writer, shard=final, max_pending=max_pending) as bw:
            for i in range(n):
                if compute_s:
                    time.sleep(compute_s)  # the GPU forward of the next image
                args = (f"img-{i}", images[i % 2], None, rows, cols, (24, 24))
                if background:
                    bw.submit(*args, checked=True)
                else:
                    t1 = time.perf_counter()
                    writer.append(*args, checked=True)
                    inline += time.perf_counter() - t1
            loop = time.perf_counter() - t
            bw.flush()  # the queued images: their time is in seconds_writing
            flushed = time.perf_counter()
            bw.close()
        if fsync:
            _sync_to_disk(tmp)
    dt = time.perf_counter() - t
    close = dt - (flushed - t)  # the shard's close: coordinates, attributes, marker, rename (and sync)
    shutil.rmtree(final)
    return {"wall": dt, "write": bw.seconds_writing + inline + close, "close": close, "loop": loop,
            "drain": dt - loop}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64,
                    help="images per run = per shard (156 MB each at the default shape; default: shard_size's default)")
    ap.add_argument("--tokens", type=int, default=576)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=33, help="hidden states stored (LLaVA-1.5-7B: 33)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--max-pending", type=int, default=2, help="images the writer's queue holds")
    ap.add_argument("--repeat", type=int, default=3, help="pairs of runs (raw, store) and overlap runs; medians reported")
    ap.add_argument("--ratios", default="0.25,1,4",
                    help="compute time per image as multiples of the store's write time per image, comma-separated")
    ap.add_argument("--dir", default=".", help="where to write (the disk under test); a temp dir is made in it")
    args = ap.parse_args(argv)

    images = _states(args)
    n = args.images
    nbytes = n * images[0].nbytes
    root = Path(tempfile.mkdtemp(prefix=".writer-bench-", dir=args.dir))
    try:
        print(f"{n} images of {images[0].shape} {args.dtype} = {images[0].nbytes / 1e6:.0f} MB each, "
              f"{nbytes / 1e9:.2f} GB per run, in {root}")
        # Side by side: each repeat times a raw write and a store write back to back, and the
        # ratio of that pair is one observation (this disk's speed drifts 2-4x between runs;
        # a pair shares the drift). Median and range over the pairs.
        pairs = [(raw_write(root, images, n), store_write(root, images, n, max_pending=args.max_pending)["wall"])
                 for _ in range(args.repeat)]
        raw = float(np.median([r for r, _ in pairs]))
        store = float(np.median([s for _, s in pairs]))
        ratios = [r / s for r, s in pairs]
        print(f"raw sequential write : {nbytes / raw / 1e6:7.0f} MB/s (median {raw:.2f} s, synced to disk)")
        print(f"store (background)   : {nbytes / store / 1e6:7.0f} MB/s (median {store:.2f} s, synced to disk)")
        print(f"store / raw, paired  : median {np.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f} "
              f"over {len(ratios)} pairs; goal >= 0.7)")
        # Overlap: without the final sync (the page cache absorbs the writes, as it does in
        # an extraction); compute per image = ratio x the writer's time per image (measured
        # first). Hidden share from each run's own numbers.
        _sync_to_disk(root)
        per_image = store_write(root, images, n, max_pending=args.max_pending, fsync=False)["write"] / n
        print(f"store write per image (page cache): {per_image * 1e3:.0f} ms = {1 / per_image:.1f} images/s")
        for ratio in [float(r) for r in args.ratios.split(",")]:
            compute = ratio * per_image * n
            for name, background in (("background writer", True), ("inline writer", False)):
                if not background and ratio != 1:
                    continue
                hidden, stall, drain, close = [], [], [], []
                for _ in range(args.repeat):
                    r = store_write(root, images, n, compute_s=ratio * per_image, background=background,
                                    max_pending=args.max_pending, fsync=False)
                    hidden.append(max(0.0, (compute + r["write"] - r["wall"]) / min(compute, r["write"])))
                    stall.append(max(0.0, r["loop"] - max(compute, r["write"])) / r["write"])
                    drain.append(r["drain"])
                    close.append(r["close"])
                print(f"overlap at compute/write {ratio:g} ({1 / (ratio * per_image):.1f} images/s computed), "
                      f"{name}: median {np.median(hidden):.2f} of the smaller hidden (range {min(hidden):.2f}-"
                      f"{max(hidden):.2f}; ceiling {(n - 1) / n:.2f})" + (" (goal >= 0.9)" if background else ""))
                print(f"  parts: producer stalls {np.median(stall):.1%} of the write time; drain at the end "
                      f"{np.median(drain):.2f} s ({np.median(drain) / per_image:.1f} images' writes incl. the close, "
                      f"{np.median(close):.2f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
