"""One GPU per job: device assignment by lock files, so that N jobs started at once on an
N-GPU machine (the local Snakemake profile runs as many GPU jobs as there are visible
devices) each compute on their own device, and no two share one.

A job that computes on CUDA (``device: auto`` on a machine with GPUs, or ``cuda``) takes the
first free device of the visible ones (`visible_devices`: ``CUDA_VISIBLE_DEVICES`` when set,
else every GPU ``nvidia-smi`` lists) by an exclusive ``flock`` on
``<lock_dir>/device-<id>.lock``, and then sets ``CUDA_VISIBLE_DEVICES`` to that device for
itself, so that ``cuda`` (and ``cuda:0``) in the process *is* that device. The kernel
releases a ``flock`` when its process ends, however it ends (SIGKILL included): no stale
lock ever blocks a device. A job that finds every device taken waits (``$EMBEDLENS_DEVICE_WAIT``
seconds, default `DEFAULT_WAIT`) and then fails naming the devices and the processes
holding them.

The locks are per machine (``$EMBEDLENS_DEVICE_LOCKS``, default ``<tmp>/embedlens-device-locks``):
every workflow run on the machine shares them, so two runs started side by side do not
stack their jobs on one GPU either. Without ``CUDA_VISIBLE_DEVICES`` the ids are
``nvidia-smi``'s indices, and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set with them so that CUDA
numbers the devices the same way (its default order, fastest first, may differ).

Imports nothing heavy (no torch): the device must be chosen before CUDA is initialized.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path

log = logging.getLogger("embedlens.devices")

ENV_LOCK_DIR = "EMBEDLENS_DEVICE_LOCKS"
ENV_WAIT = "EMBEDLENS_DEVICE_WAIT"
#: seconds a job waits for a free device before it fails (a job beyond the devices is a
#: scheduling mistake: Snakemake's ``gpu`` resource should have held it back)
DEFAULT_WAIT = 3600.0


class DeviceBusyError(RuntimeError):
    """Every device a job may use is held by another job (after waiting)."""


def visible_devices(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES``'s entries when it is set
    (indices or ``GPU-<uuid>``; empty, or an entry ``-1``, hides the rest as CUDA does), else
    the indices ``nvidia-smi -L`` lists, else []. Raises nothing."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        out = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry or entry.startswith("-"):
                break  # CUDA stops at the first invalid entry
            out.append(entry)
        return out
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        text = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", text, flags=re.M)]


def lock_dir(environ: MutableMapping[str, str] | None = None) -> Path:
    """The directory of the per-device lock files (``$EMBEDLENS_DEVICE_LOCKS``, else
    ``<tmp>/embedlens-device-locks``, created world-writable and sticky like /tmp so that
    every user's jobs on the machine share it). Raises OSError when it cannot be created."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get(ENV_LOCK_DIR) or Path(tempfile.gettempdir()) / "embedlens-device-locks")
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            path.chmod(0o1777)
    return path


def _safe(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", device)


def _try_lock(path: Path):
    """An open file holding an exclusive flock on `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    # who holds it, for the message of a job that finds every device taken
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode())
    return fd


def _holders(paths: Sequence[Path]) -> str:
    out = []
    for p in paths:
        with contextlib.suppress(OSError):
            out.append(f"{p.name}: {p.read_text().strip() or '?'}")
    return "; ".join(out)


@contextlib.contextmanager
def assigned_devices(count: int = 1, *, devices: Sequence[str] | None = None,
                     environ: MutableMapping[str, str] | None = None, wait: float | None = None,
                     poll: float = 0.2) -> Iterator[list[str]]:
    """Hold ``count`` free devices of ``devices`` (default `visible_devices`) for the block,
    and make them the only ones this process sees (``CUDA_VISIBLE_DEVICES`` in ``environ``,
    default ``os.environ``, set for the block and restored after). Yields their ids.

    ``count`` larger than the devices: all of them (a model spread by ``device_map`` takes
    every device the job may use). No devices at all: yields [] and changes nothing (the
    job computes on the CPU). ``wait``: seconds to wait for free devices (default
    ``$EMBEDLENS_DEVICE_WAIT``, else `DEFAULT_WAIT`).

    Raises
    ------
    DeviceBusyError
        no ``count`` devices became free within ``wait`` s; names the devices and who holds them.
    RuntimeError
        CUDA is already initialized in this process (too late to choose its device).
    """
    environ = os.environ if environ is None else environ
    devices = list(visible_devices(environ) if devices is None else devices)
    if not devices:
        yield []
        return
    torch = sys.modules.get("torch")
    if environ is os.environ and torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA is already initialized in this process: the device must be assigned "
                           "before any CUDA call (embedlens.devices.assigned_devices comes first)")
    count = max(1, min(int(count), len(devices)))
    wait = float(environ.get(ENV_WAIT, DEFAULT_WAIT)) if wait is None else float(wait)
    root = lock_dir(environ)
    paths = {d: root / f"device-{_safe(d)}.lock" for d in devices}
    held: dict[str, int] = {}
    deadline = time.monotonic() + wait
    told = False
    try:
        while True:
            for d in devices:
                if d not in held and len(held) < count:
                    fd = _try_lock(paths[d])
                    if fd is not None:
                        held[d] = fd
            if len(held) == count:
                break
            if time.monotonic() >= deadline:
                raise DeviceBusyError(
                    f"no {count} free device(s) among {devices} after {wait:.0f} s: held by "
                    f"{_holders(list(paths.values()))} (locks in {root}). Run fewer GPU jobs at once "
                    f"(snakemake --resources gpu=N), or raise ${ENV_WAIT}")
            if not told:
                log.warning("all of devices %s are busy: waiting up to %.0f s for one", devices, wait)
                told = True
            time.sleep(poll)
        chosen = [d for d in devices if d in held]
        saved = {k: environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
        if "CUDA_VISIBLE_DEVICES" not in environ:
            environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # nvidia-smi's indices = CUDA's
        environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        log.info("assigned device(s) %s (locks in %s)", chosen, root)
        try:
            yield chosen
        finally:
            for k, v in saved.items():
                if v is None:
                    environ.pop(k, None)
                else:
                    environ[k] = v
    finally:
        for fd in held.values():
            os.close(fd)  # closing releases the flock


def wants_cuda(device: str | None) -> bool:
    """Whether a configured device may compute on CUDA (``auto``, ``cuda``, ``cuda:N``) and so
    takes a device lock. Raises nothing."""
    return str(device or "auto").split(":")[0] in ("auto", "cuda")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m embedlens.devices [COUNT]``: the visible devices, the lock directory, and
    which devices are held (by whom); with COUNT, hold that many until killed (for tests and
    for reserving devices by hand)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    devices = visible_devices()
    root = lock_dir()
    print(f"visible devices: {devices or 'none'}; locks in {root}")
    for d in devices:
        path = root / f"device-{_safe(d)}.lock"
        fd = _try_lock(path)
        if fd is None:
            print(f"  {d}: held ({_holders([path])})")
        else:
            os.close(fd)
            print(f"  {d}: free")
    if argv:
        with assigned_devices(int(argv[0])) as got:
            print(f"holding {','.join(got)}", flush=True)
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
