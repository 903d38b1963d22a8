"""Writing outputs so that nothing half-written ever looks complete.

Every output (hidden-state shard, data set, analysis store, table) is written under a
hidden temporary name beside its final place and renamed into place only when complete:
``rename(2)`` is atomic, so a reader (or Snakemake, or the next run) sees either the old
output, the new one, or none, never a part. A process killed midway leaves only a
temporary name that no reader looks for; the next attempt removes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; rename it to ``final`` only on success.

    Failure (any exception, or the process being killed) leaves the temporary directory
    behind under a name no reader looks for (``.{name}.tmp-*``); the next attempt removes
    it. An existing ``final`` is moved aside (``.{name}.old-*``) before the new one is
    renamed in, and only then deleted: deleting it in place would leave a half-deleted
    output that still looks complete if the process were killed meanwhile.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # rename(2) replaces only an empty directory: rename the old output aside first.
        aside = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file (``.{name}.*``, empty, with the permissions a new file
    gets); ``final`` is replaced by it only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    # mkstemp creates the file private (0600); give it what a new file gets (umask), so a
    # report or table is readable by whoever may read the results directory
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
