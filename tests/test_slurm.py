"""End to end on Slurm: the real snakemake, the Slurm executor plugin and profiles/slurm,
against a single-node cluster started here (tests/slurm/slurm_cluster.py).

The cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd; all on localhost, all under one
scratch directory) is installed from the system packages when missing and stopped at the
end. Where that cannot be done (not root, no apt, no package, a daemon that does not
start) the tests skip and say why; EMBEDLENS_REQUIRE_SLURM=1 turns that into a failure.

One workflow (tiny LLaVA, 6 synthetic images, shard_size 2 -> 3 extraction jobs) runs
through `snakemake --workflow-profile profiles/slurm` while the same config runs through
`--workflow-profile profiles/local` beside it; the first attempt of one shard is made to
fail, which the profile's `retries` resubmits alone. The tests then read `sacct`, compare
the outputs of both runs, and delete a shard to check that only its job reruns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
SLURM_PROFILE = ROOT / "profiles" / "slurm"
LOCAL_PROFILE = ROOT / "profiles" / "local"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent / "slurm"))

from slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slow

N_IMAGES, SHARD_SIZE = 6, 2
N_SHARDS = -(-N_IMAGES // SHARD_SIZE)
FLAKY_SHARD = "0001"      # its first attempt fails (the retry is checked in sacct)
DELETED_SHARD = "0002"    # deleted after the run: only its job may rerun
TARGETS = ["results/hidden/tiny/shapes/hidden.json",
           "results/analysis/tiny/shapes/categorize",
           "results/analysis/tiny/shapes/probe"]
RULES = ("materialize_dataset", "export_vocab", "extract_hidden", "index_hidden",
         "discover_anchors", "categorize_tokens", "probe_tokens")
FAKE_GPUS = 3   # one per shard: the shards run at once


def _unavailable(reason: str):
    if os.environ.get("EMBEDLENS_REQUIRE_SLURM"):
        pytest.fail(f"slurm: {reason}")
    pytest.skip(f"slurm: {reason}")


def _profile() -> dict:
    return yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())


def _node_size(profile: dict, gpus: int) -> tuple[int, int, tuple[str, ...]]:
    """CPUs, memory (MB) and partitions a node needs to run the profile's requests:
    `gpus` GPU jobs and two CPU jobs at once (values are bookkeeping for the scheduler;
    the tiny model's jobs use a fraction of them)."""
    default = profile.get("default-resources", {})
    per_rule = [{**default, **res} for res in profile.get("set-resources", {}).values()]
    gpu_jobs = [r for r in per_rule if r.get("gpu") or "gpu" in str(r.get("gres", ""))]
    cpu_jobs = [default] + [r for r in per_rule if r not in gpu_jobs]
    cpus = max(os.cpu_count() or 1, gpus * max(int(r.get("cpus_per_task", 1)) for r in gpu_jobs)
               + 2 * max(int(r.get("cpus_per_task", 1)) for r in cpu_jobs))
    with open("/proc/meminfo") as fh:
        real_mb = int(fh.readline().split()[1]) // 1024
    mem = max(real_mb, gpus * max(int(r["mem_mb"]) for r in gpu_jobs)
              + 2 * max(int(r["mem_mb"]) for r in cpu_jobs))
    partitions = [default["slurm_partition"]] + sorted(
        {r["slurm_partition"] for r in per_rule} - {default["slurm_partition"]})
    return cpus, mem, tuple(partitions)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        _unavailable("needs Linux")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _unavailable("snakemake-executor-plugin-slurm is not installed "
                     "(pip install -e '.[cluster]')")
    cpus, mem, partitions = _node_size(_profile(), FAKE_GPUS)
    base = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    started = time.perf_counter()
    try:
        c = SlurmCluster(base, cpus=cpus, mem_mb=mem, gpus=FAKE_GPUS,
                         partitions=partitions).start()
    except SlurmUnavailable as exc:
        _unavailable(str(exc))
    print(f"slurm cluster up in {time.perf_counter() - started:.1f} s "
          f"({cpus} CPUs, {mem} MB, {FAKE_GPUS} GPUs, partitions {partitions})")
    yield c
    c.stop()


def write_config(workdir: Path, model: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "models": {"tiny": {"path": str(model)}},
        "datasets": {"shapes": {"source": "synthetic", "n_images": N_IMAGES, "seed": 3,
                                "image_size": 64, "grid": 4}},
        "extraction": {"batch_size": 2, "shard_size": SHARD_SIZE, "device": "cpu",
                       "store_dtype": "float32", "vision_layers": [-1]},
        "probe": {"n_bootstrap": 20, "min_tokens": 5},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def fail_once_wrapper(bindir: Path, marker: Path) -> Path:
    """An `embedlens` first on PATH that fails the first extraction of FLAKY_SHARD (a node
    failure, say) and otherwise runs the real one with the same arguments."""
    bindir.mkdir(parents=True, exist_ok=True)
    wrapper = bindir / "embedlens"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$1 $*" in "extract "*"shard-{FLAKY_SHARD}.zarr"*)\n'
        f'  if [ ! -e "{marker}" ]; then touch "{marker}"; '
        'echo "injected failure of the first attempt" >&2; exit 3; fi;;\n'
        "esac\n"
        f'exec "{BIN / "embedlens"}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def run_env(cluster: SlurmCluster, *front: Path) -> dict[str, str]:
    env = cluster.env
    env["PATH"] = os.pathsep.join([*map(str, front), str(BIN), env["PATH"]])
    # One thread per job: exact equality with the local run, and 2 cores are plenty.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    return env


def snakemake_cmd(profile: Path, *args: str) -> list[str]:
    return [str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE),
            "--workflow-profile", str(profile), *args]


# Poll Slurm after 5 s instead of the plugin's default 40 s (a real cluster's accounting
# database would not thank us); both are plain command-line overrides. The plugin adds
# 10 s after every poll that finds no job finished, so polls come at 5, 20, 45 s: 5 suits
# jobs of 10-20 s (the tiny model's) better than 2 (polls at 2, 14, 36 s).
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "5",
             "--seconds-between-status-checks", "5"]


def run_slurm(workdir: Path, env: dict, *targets: str) -> tuple[str, str]:
    """Run the workflow through profiles/slurm; returns (run id, output)."""
    proc = subprocess.run(snakemake_cmd(SLURM_PROFILE, *FAST_POLL, *targets), check=False,
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((workdir / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake (slurm) failed:\n{out[-6000:]}\n{logs}")
    run_id = re.search(r"SLURM run ID: (\S+)", out)
    assert run_id, out
    return run_id.group(1), out


def sacct_jobs(cluster: SlurmCluster, run_id: str) -> list[dict]:
    """The Slurm jobs of one snakemake run (job name = run id), oldest first."""
    fields = ["JobIDRaw", "Partition", "State", "ExitCode", "AllocTRES", "Start", "End",
              "Comment"]
    start = f"{datetime.now() - timedelta(days=1):%Y-%m-%dT%H:%M}"
    proc = cluster.run("sacct", "-X", "-P", "--noheader", "--name", run_id,
                       "--starttime", start, "--endtime", "now",
                       "--format", ",".join(f"{f}%300" for f in fields))
    rows = [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines() if line]
    for row in rows:
        comment = row["Comment"]
        row["Rule"] = next((r for r in RULES if comment == f"rule_{r}"
                            or comment.startswith(f"rule_{r}_wildcards_")), comment)
        row["Wildcards"] = comment.split("_wildcards_", 1)[1] if "_wildcards_" in comment else ""
    return sorted(rows, key=lambda r: int(r["JobIDRaw"]))


def format_jobs(rows: list[dict]) -> str:
    cols = ("JobIDRaw", "Rule", "Wildcards", "Partition", "State", "AllocTRES", "Start", "End")
    table = [cols] + [tuple(r[c] for c in cols) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table)


# -- output digests (values, not bytes: no creation times, no file-format metadata) ------

VOLATILE_KEYS = ("created", "time", "elapsed", "seconds", "duration")


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()
                if not any(v_ in k.lower() for v_ in VOLATILE_KEYS)}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _array_digest(values) -> str:
    a = np.asarray(values)
    data = json.dumps(a.tolist()).encode() if a.dtype == object else \
        np.ascontiguousarray(a).tobytes()
    return f"{a.dtype}{a.shape}:{_sha(data)}"


def store_digest(path: Path) -> dict:
    ds = xr.open_zarr(path)
    digest = {"attrs": _sha(json.dumps(_clean(dict(ds.attrs)), sort_keys=True,
                                       default=str).encode())}
    for name, var in {**ds.coords, **ds.data_vars}.items():
        digest[name] = _array_digest(var.values)
    return digest


def tree_digest(root: Path) -> dict:
    """path -> digest of every output under root: Zarr stores by their arrays and
    attributes, parquet by its frame, JSON by its content, less creation/timing keys."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.name == ".snakemake_timestamp" or ".zarr/" in rel:
            continue
        if p.suffix == ".zarr":
            out[rel] = store_digest(p)
        elif p.is_dir():
            continue
        elif p.suffix == ".parquet":
            df = pd.read_parquet(p)
            out[rel] = _sha(pd.util.hash_pandas_object(df, index=True).values.tobytes()
                            + repr([(c, str(t)) for c, t in df.dtypes.items()]).encode())
        elif p.suffix == ".json":
            out[rel] = _sha(json.dumps(_clean(json.loads(p.read_text())),
                                       sort_keys=True).encode())
        else:
            out[rel] = _sha(p.read_bytes())
    return out


def assert_same(local: dict, slurm: dict) -> None:
    assert set(local) == set(slurm), sorted(set(local) ^ set(slurm))
    differ = [k for k in local if local[k] != slurm[k]]
    assert not differ, {k: (local[k], slurm[k]) for k in differ}


# -- the runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    from embedlens.testing.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("wf-slurm")
    model = build_tiny_model("llava", base / "tiny-llava", seed=0)
    local, slurm = base / "local", base / "slurm"
    write_config(local, model)
    write_config(slurm, model)
    fail_once_wrapper(base / "faults", base / "faults" / "failed-once")

    started = time.perf_counter()
    # The local reference runs beside the Slurm run: the latter mostly waits on polls.
    local_proc = subprocess.Popen(
        snakemake_cmd(LOCAL_PROFILE, "--cores", "1", *TARGETS), cwd=local,
        env=run_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_id, out = run_slurm(slurm, run_env(cluster, base / "faults"), *TARGETS)
    finally:
        local_out, _ = local_proc.communicate(timeout=900)
    assert local_proc.returncode == 0, local_out[-6000:]
    elapsed = time.perf_counter() - started
    jobs = sacct_jobs(cluster, run_id)
    print(f"\nslurm run {run_id}: {elapsed:.0f} s (local run beside it)\n{format_jobs(jobs)}")
    return {"local": local, "slurm": slurm, "run_id": run_id, "jobs": jobs, "output": out,
            "env": run_env(cluster)}


def test_sacct_lists_every_job_with_its_resources(runs):
    jobs = runs["jobs"]
    by_rule: dict[str, list[dict]] = {}
    for job in jobs:
        by_rule.setdefault(job["Rule"], []).append(job)
    assert set(by_rule) == set(RULES), format_jobs(jobs)
    for rule in RULES:
        if rule != "extract_hidden":
            assert [j["State"] for j in by_rule[rule]] == ["COMPLETED"], format_jobs(jobs)
    profile = _profile()
    default = profile["default-resources"]
    for job in jobs:
        wanted = {**default, **profile["set-resources"].get(job["Rule"], {})}
        gpus = re.search(r"gres/gpu=(\d+)", job["AllocTRES"])
        assert job["Partition"] == wanted["slurm_partition"], format_jobs(jobs)
        assert (int(gpus.group(1)) if gpus else 0) == int(wanted.get("gpu", 0)), format_jobs(jobs)
        assert f"cpu={wanted['cpus_per_task']}," in job["AllocTRES"], format_jobs(jobs)
        assert f"mem={wanted['mem_mb']}M" in job["AllocTRES"], format_jobs(jobs)
    assert any(j["Partition"] != default["slurm_partition"] for j in jobs)  # GPU jobs


def test_one_job_per_shard_and_a_failed_shard_is_retried_alone(runs):
    extract = [j for j in runs["jobs"] if j["Rule"] == "extract_hidden"]
    shards = {}
    for job in extract:
        shards.setdefault(job["Wildcards"].rsplit("_", 1)[-1], []).append(job["State"])
    expected = {f"{i:04d}" for i in range(N_SHARDS)}
    assert set(shards) == expected, format_jobs(runs["jobs"])
    assert shards.pop(FLAKY_SHARD) == ["FAILED", "COMPLETED"], format_jobs(runs["jobs"])
    assert all(states == ["COMPLETED"] for states in shards.values()), format_jobs(runs["jobs"])
    index = json.loads((runs["slurm"] / TARGETS[0]).read_text())
    assert len(index["shards"]) == N_SHARDS and index["n_images"] == N_IMAGES


def test_slurm_outputs_equal_local_run(runs):
    local = tree_digest(runs["local"] / "results")
    slurm = tree_digest(runs["slurm"] / "results")
    stores = [k for k in local if k.endswith(".zarr")]
    assert len(stores) == N_SHARDS + 1, sorted(local)  # shards + vocab
    assert any(k.endswith("categorize/categories.parquet") for k in local)
    assert any(k.endswith("probe/probe.parquet") for k in local)
    assert_same(local, slurm)


def test_deleted_shard_reruns_alone(runs, cluster):
    """What a run whose shard failed on every attempt leaves: the other shards, no shard
    store and no index (Snakemake does not redo a deleted intermediate file whose
    downstream outputs are up to date, so the index goes too)."""
    slurm = runs["slurm"]
    hidden = slurm / "results/hidden/tiny/shapes"
    shutil.rmtree(hidden / f"shard-{DELETED_SHARD}.zarr")
    (hidden / "hidden.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in hidden.glob("shard-*.zarr")}
    run_id, _ = run_slurm(slurm, runs["env"], TARGETS[0])
    jobs = sacct_jobs(cluster, run_id)
    print(f"\nrerun {run_id}:\n{format_jobs(jobs)}")
    assert [(j["Rule"], j["Wildcards"].rsplit("_", 1)[-1], j["State"]) for j in jobs] == [
        ("extract_hidden", DELETED_SHARD, "COMPLETED"),
        ("index_hidden", "shapes", "COMPLETED")], format_jobs(jobs)
    assert {p.name: p.stat().st_mtime_ns for p in hidden.glob("shard-*.zarr")
            if p.name in kept} == kept  # finished shards untouched
    assert_same(tree_digest(runs["local"] / "results/hidden"),
                tree_digest(slurm / "results/hidden"))
