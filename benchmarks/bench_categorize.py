"""Benchmark the EmbedLens categorization at scale.

Categorizes N random visual tokens (default 1,000,000, as 576-token images in float16, the
store's default dtype) against a random V-row vocabulary (default 150,000 rows, dim 576)
through the full ``embedlens.analysis.categorize`` path (streamed top-k, rule, summaries,
Parquet writing), and prints wall time, tokens/s and peak memory.

    python benchmarks/bench_categorize.py                      # 1M tokens × 150k vocab, d=576
    python benchmarks/bench_categorize.py --dim 4096 --tokens 100000
    python benchmarks/bench_categorize.py --mode kernel        # streamed top-k search only

Time: wall ``seconds`` and process ``cpu_seconds`` (user + system, all threads); on a
shared machine compare ``tokens_per_cpu_s`` and the load averages printed beside them.
Memory: ``peak_rss`` is the process high-water mark (getrusage; includes the synthetic
input), ``analysis_extra`` the part above the RSS right before the analysis started, and
``tracemalloc_peak`` the Python-heap peak during the analysis (torch buffers not included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc

import numpy as np


def rss_mib() -> float:
    # current RSS from /proc (Linux); getrusage gives only the peak
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--tokens-per-image", type=int, default=576)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--vocab-block", type=int, default=8192)
    ap.add_argument("--query-block", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", choices=["full", "kernel"], default="full")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    import xarray as xr

    from embedlens.analysis.categorize import categorize
    from embedlens.analysis.vocab import Vocab, VocabIndex

    rng = np.random.default_rng(args.seed)
    n_img = -(-args.tokens // args.tokens_per_image)
    T = args.tokens_per_image
    emb = rng.standard_normal((args.vocab, args.dim), dtype=np.float32)
    special = np.zeros(args.vocab, bool)
    special[:3] = True
    voc = Vocab(emb, [f"t{i}" for i in range(args.vocab)], special)
    h = rng.standard_normal((n_img, 1, T, args.dim), dtype=np.float32).astype(np.float16)
    valid = np.zeros((n_img, T), bool)
    valid.reshape(-1)[: args.tokens] = True
    print(f"tokens={args.tokens:,} vocab={args.vocab:,} dim={args.dim} k={args.k} images={n_img} "
          f"threads={torch.get_num_threads()} mode={args.mode}", flush=True)
    base_rss = rss_mib()
    tracemalloc.start()
    load_before = os.getloadavg()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.mode == "kernel":
        idx = VocabIndex(voc.embedding, exclude=np.flatnonzero(special), device=args.device,
                         vocab_block=args.vocab_block)
        q = h[:, 0].reshape(-1, args.dim)[valid.reshape(-1)]
        ids, sims = idx.search(q, args.k, query_block=args.query_block, progress=True, desc="top-k")
        device = str(idx.device)
        n_done = len(ids)
    else:
        rows, cols = np.divmod(np.arange(T), int(np.sqrt(T)) or 1)
        ds = xr.Dataset(
            {"llm_hidden": (("image", "layer", "token", "dim"), h)},
            coords={
                "image_id": ("image", [f"img{i:06d}" for i in range(n_img)]),
                "layer": [0], "token": np.arange(T),
                "patch_row": (("image", "token"), np.broadcast_to(rows, (n_img, T))),
                "patch_col": (("image", "token"), np.broadcast_to(cols, (n_img, T))),
                "grid_rows": ("image", np.full(n_img, rows.max() + 1)),
                "grid_cols": ("image", np.full(n_img, cols.max() + 1)),
                "token_valid": (("image", "token"), valid),
            },
        )
        with tempfile.TemporaryDirectory() as out:
            summary = categorize(ds, voc, out, top_k=args.k, anchors={"vit_sink": [3], "llm_sink": [4], "dead": [5]},
                                 device=args.device, vocab_block=args.vocab_block,
                                 query_block=args.query_block, progress=True)
        device = summary["device"]
        n_done = summary["n_tokens"]
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res = {
        "mode": args.mode, "device": device, "tokens": n_done, "vocab": args.vocab, "dim": args.dim,
        "seconds": round(dt, 2), "tokens_per_s": round(n_done / dt, 1),
        "cpu_seconds": round(cpu, 1), "tokens_per_cpu_s": round(n_done / cpu, 1) if cpu else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "gflops_per_s": round(2 * n_done * args.vocab * args.dim / dt / 1e9, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_before_analysis_mib": round(base_rss, 1),
        "analysis_extra_mib": round(peak_rss_mib() - base_rss, 1),
        "tracemalloc_peak_mib": round(tm_peak / 2**20, 1),
        "input_hidden_mib": round(h.nbytes / 2**20, 1), "vocab_mib": round(emb.nbytes / 2**20, 1),
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
