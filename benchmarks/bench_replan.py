"""Re-planning a finished workflow: `snakemake -n` time and what adding a model plans.

    python benchmarks/bench_replan.py [--workdir DIR] [--cores 2] [--repeats 5]

1. Builds a completed workflow in a temp dir (or `--workdir`; an existing finished one
   there is reused): 3 tiny random LLaVA models (`embedlens.testing.tiny`, seeds 0-2)
   x 2 tiny synthetic data sets, a real `snakemake --cores N` run of the default target
   (every extraction, analysis, compression benchmark and report). This is the slow part
   (about 60 jobs, each mostly interpreter + torch start-up).
2. Times `snakemake -n` on the finished workflow, `--repeats` times, median (goal: < 5 s)
   and checks it plans nothing.
3. Adds a 4th model to config.yaml and counts the jobs `snakemake -n` plans, by rule and
   by model (goal: only the new model's jobs, plus the two aggregate jobs that depend on
   every model: `render_summary` and `all`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
BIN = Path(sys.executable).parent
AGGREGATE_RULES = {"render_summary", "all"}  # depend on every model x data set


def snakemake(work: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE), "--directory",
                           str(work), *args], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc, elapsed


def config(models: dict[str, Path]) -> dict:
    return {
        "models": {name: {"path": str(path)} for name, path in models.items()},
        "datasets": {
            "shapes": {"source": "synthetic", "n_images": 4, "seed": 3, "image_size": 64, "grid": 4},
            "shapes-b": {"source": "synthetic", "n_images": 4, "seed": 5, "image_size": 64, "grid": 4},
        },
        "extraction": {"batch_size": 4, "shard_size": 4, "device": "cpu", "store_dtype": "float32"},
        "lens": {"max_images": 2},
        "probe": {"n_bootstrap": 10, "min_tokens": 5},
        "compress": {"n_items": 4, "seeds": [0], "repeats": 1},
    }


def planned(proc: subprocess.CompletedProcess) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(rule -> count from the Job stats table, [(rule, wildcards)] per planned job)."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}, []
    stats = {}
    for line in text.split("Job stats:", 1)[-1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            stats[m.group(1)] = int(m.group(2))
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if m:
            wc = re.search(r"wildcards: (.+)", block)
            jobs.append((m.group(1), wc.group(1) if wc else ""))
    return stats, jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from embedlens.testing.tiny import build_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-replan-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir: {work}; CPU cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.2f}")
    models = {f"tiny-{c}": work / "models" / f"tiny-{c}" for c in "abcd"}
    for seed, path in enumerate(models.values()):
        if not (path / "config.json").exists():
            build_tiny_model("llava", path, seed=seed)
    first3 = dict(list(models.items())[:3])
    (work / "config.yaml").write_text(yaml.safe_dump(config(first3), sort_keys=False))

    done = work / ".bench-replan-complete"
    if not done.exists():
        proc, build_s = snakemake(work, "--cores", str(args.cores))
        n_done = len(re.findall(r"Finished job", proc.stdout + proc.stderr))
        done.write_text(f"{build_s:.0f}\n")
        print(f"built: {n_done} jobs in {build_s:.0f} s (snakemake --cores {args.cores})")
    else:
        print(f"reusing the finished workflow (built in {done.read_text().strip()} s)")

    times, plans = [], []
    for _ in range(args.repeats):
        proc, elapsed = snakemake(work, "-n")
        times.append(elapsed)
        plans.append(planned(proc)[0])
    print("\nsnakemake -n on the finished workflow (3 models x 2 data sets)")
    print(f"{'repeats':<28}{args.repeats}")
    print(f"{'median':<28}{statistics.median(times):.2f} s   (goal < 5 s)")
    print(f"{'min / max':<28}{min(times):.2f} / {max(times):.2f} s")
    print(f"{'jobs planned':<28}{sum(plans[0].values())}   (goal 0)")

    (work / "config.yaml").write_text(yaml.safe_dump(config(models), sort_keys=False))
    try:
        proc, elapsed = snakemake(work, "-n")
    finally:
        (work / "config.yaml").write_text(yaml.safe_dump(config(first3), sort_keys=False))
    stats, jobs = planned(proc)
    by_model = collections.Counter()
    for rule, wc in jobs:
        m = re.search(r"model=([^,\s]+)", wc)
        by_model[m.group(1) if m else f"(no model: {rule})"] += 1
    print(f"\nafter adding model tiny-d: snakemake -n took {elapsed:.2f} s")
    print(f"{'rule':<24}{'jobs':>6}")
    for rule, n in sorted(stats.items()):
        print(f"{rule:<24}{n:>6}")
    print(f"{'total':<24}{sum(stats.values()):>6}")
    print(f"\n{'jobs by model':<40}{'jobs':>6}")
    for key, n in sorted(by_model.items()):
        print(f"{key:<40}{n:>6}")
    others = [(r, w) for r, w in jobs
              if "model=tiny-d" not in w and r not in AGGREGATE_RULES]
    print("\nonly the new model's jobs (+ aggregates):", "yes" if not others else f"NO: {others}")


if __name__ == "__main__":
    main()
