"""Device assignment (embedlens.devices): on a machine with N visible GPUs, N jobs started
at once each take a device of their own; one more waits, then fails naming the holders.
Tested on the CPU with a faked device list (CUDA_VISIBLE_DEVICES=0,1,2,3): the locks are
real files held by real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedlens.devices import DeviceBusyError, assigned_devices, visible_devices, wants_cuda

# A job: take a device, report it, hold it until killed (as an extraction holds its GPU).
JOB = """
import os, sys, time
from embedlens.devices import assigned_devices
with assigned_devices(int(sys.argv[1]), wait=float(sys.argv[2])) as got:
    print("got", ",".join(got), "sees", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
    time.sleep(120)
"""


def _env(locks: Path, visible: str) -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "EMBEDLENS_DEVICE_LOCKS": str(locks)}


def _start(locks, visible="0,1,2,3", count=1, wait=60.0):
    return subprocess.Popen([sys.executable, "-c", JOB, str(count), str(wait)], env=_env(locks, visible),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc, timeout=60) -> str:
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    assert time.monotonic() < deadline and line, proc.stderr.read() if proc.poll() is not None else "no output"
    return line.split()


def test_visible_devices_honours_cuda_visible_devices():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == ["0", "1", "2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, GPU-abc"}) == ["2", "GPU-abc"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at -1
    assert wants_cuda("auto") and wants_cuda("cuda:1") and not wants_cuda("cpu")


def test_four_concurrent_jobs_get_four_distinct_devices_and_a_fifth_waits_then_fails(tmp_path):
    locks = tmp_path / "locks"
    jobs = [_start(locks) for _ in range(4)]
    try:
        lines = [_first_line(p) for p in jobs]
        got = [line[1] for line in lines]
        assert sorted(got) == ["0", "1", "2", "3"], lines  # four distinct devices
        assert all(line[3] == line[1] for line in lines)  # each job sees only its own device
        # a fifth job finds them all taken: it waits, then fails naming the devices' holders
        fifth = subprocess.run([sys.executable, "-c", JOB, "1", "1.5"], env=_env(locks, "0,1,2,3"),
                               capture_output=True, text=True, timeout=60)
        assert fifth.returncode != 0
        assert "DeviceBusyError" in fifth.stderr and "device-0.lock: pid" in fifth.stderr, fifth.stderr
        # a job that ends (killed) frees its device at once: no stale lock
        freed = got[2]
        jobs[2].send_signal(signal.SIGKILL)
        jobs[2].wait(30)
        sixth = _start(locks, wait=30)
        jobs.append(sixth)
        assert _first_line(sixth)[1] == freed
    finally:
        for p in jobs:
            p.kill()
            p.wait(30)


def test_a_model_spread_over_gpus_takes_every_device_and_no_gpu_means_no_lock(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "4,5", "EMBEDLENS_DEVICE_LOCKS": str(tmp_path)}
    with assigned_devices(10, environ=env, wait=0) as got:
        assert got == ["4", "5"] and env["CUDA_VISIBLE_DEVICES"] == "4,5"
        with pytest.raises(DeviceBusyError, match="no 1 free device"):
            with assigned_devices(1, environ=dict(env), wait=0.3):
                pass
    with assigned_devices(1, environ=env, wait=0) as got:  # released on leaving the block
        assert got == ["4"] and env["CUDA_VISIBLE_DEVICES"] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"  # restored
    cpu = {"CUDA_VISIBLE_DEVICES": "", "EMBEDLENS_DEVICE_LOCKS": str(tmp_path)}
    with assigned_devices(1, environ=cpu) as got:
        assert got == [] and cpu["CUDA_VISIBLE_DEVICES"] == ""
