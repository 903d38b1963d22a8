"""Writing a shard in the background, so that the forward pass of batch n+1 runs while
batch n is encoded and written.

At GPU scale the store, not the GPU, is the limit: LLaVA-1.5-7B gives 156 MB of float16
states per image at all 33 layers, and a GPU forwards tens of images per second. Written
inside the forward loop, every write would leave the GPU idle. `BackgroundWriter` hands
each image to one worker thread through a bounded queue: the thread writes the image's
chunks (zarr writes the 33 chunks of an image concurrently itself), while the main thread
runs the next forward. The queue's bound (``max_pending`` images) caps host memory and
makes a producer faster than the disk wait rather than pile up states.

One thread is enough: the write is I/O (and a copy) that releases the GIL, and zarr already
spreads an image's chunks over its own async pool; more writer threads measured no faster
on the benchmark (benchmarks/writer_throughput.py) and would only race for the disk.

The guarantees of a shard stay: the writer writes into the temporary directory of
`embedlens.atomic.atomic_directory`, and the shard is renamed into place only after
`BackgroundWriter.close` has waited for every image and written the coordinates and the
completeness marker. Leaving the ``with`` block by an exception stops the thread *before*
the temporary directory is removed, so no write lands in a removed directory. An error in
the thread is raised in the main thread at its next `submit` / `flush` / `close`: the
store's own errors (`NonFiniteError`, `StoreOverflowError`, which the extraction retries on)
as they are, anything else as `ShardWriteError` naming the shard and the image.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from .store import NonFiniteError, ShardWriter, StoreOverflowError

#: images queued for writing beyond the one being written: two keep the disk busy while the
#: next batch is computed and bound the memory held to (2 + 1) images' states
DEFAULT_MAX_PENDING = 2


class ShardWriteError(RuntimeError):
    """Writing an image into a shard failed in the background writer (disk full, a
    permission, an array of the wrong shape): names the shard, the image and the cause."""

    def __init__(self, shard: str, image_id: str | None, cause: BaseException):
        where = f" (image {image_id!r})" if image_id is not None else ""
        super().__init__(f"writing shard {shard} failed{where}: {type(cause).__name__}: {cause}; "
                         "nothing was stored under the final name, rerun the job once the cause is fixed")
        self.shard, self.image_id, self.cause = shard, image_id, cause


_STOP = object()


class BackgroundWriter:
    """A `ShardWriter` fed from a bounded queue by one worker thread.

    Use as a context manager inside `atomic_directory`::

        with atomic_directory(out) as tmp, BackgroundWriter(ShardWriter(tmp, ...), shard=out) as bw:
            bw.submit(image_id, llm, vision, ...)   # returns once queued
            bw.close()                                # waits, writes coordinates and attrs

    ``shard``: the name errors give (the final path; the temporary one means nothing to a
    user). ``max_pending``: images that may wait in the queue (>= 1).

    The arrays given to `submit` must not be changed afterwards (the thread reads them
    later); the extraction gives fresh host copies.
    """

    def __init__(self, writer: ShardWriter, *, shard: str | Path, max_pending: int = DEFAULT_MAX_PENDING):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.writer = writer
        self.shard = str(shard)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: tuple[str | None, BaseException] | None = None
        self._abandon = threading.Event()
        #: images handed to `submit` so far
        self.n_submitted = 0
        #: seconds the thread spent writing, and the producer spent waiting for room in the
        #: queue (the part of the writes that the computation did not hide)
        self.seconds_writing = 0.0
        self.seconds_waiting = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"shard-writer:{Path(self.shard).name}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None and not self._abandon.is_set():
                    args, kw = item
                    t = time.perf_counter()
                    try:
                        self.writer.append(*args, **kw)
                    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                        self._error = (args[0], exc)
                    self.seconds_writing += time.perf_counter() - t
            finally:
                self._queue.task_done()

    # ------------------------------------------------------------------ main thread
    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        image_id, exc = self._error
        if isinstance(exc, (NonFiniteError, StoreOverflowError)):
            raise exc  # the extraction retries on these: keep their type and message
        raise ShardWriteError(self.shard, image_id, exc) from exc

    def submit(self, image_id: str, llm, vision, patch_row, patch_col, grid, **kw) -> None:
        """Queue one image for `ShardWriter.append` (same arguments); blocks while
        ``max_pending`` images wait.

        Raises:
            NonFiniteError, StoreOverflowError, ShardWriteError: an earlier image failed
                in the thread (see the module docstring).
            RuntimeError: after `close`.
        """
        if self._closed:
            raise RuntimeError(f"shard {self.shard}: submit after close")
        self._raise_if_failed()
        t = time.perf_counter()
        self._queue.put(((image_id, llm, vision, patch_row, patch_col, grid), kw))
        self.seconds_waiting += time.perf_counter() - t
        self.n_submitted += 1

    def flush(self) -> None:
        """Wait until every queued image is written. Raises as `submit`."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Wait for every image, stop the thread, then `ShardWriter.close` (coordinates,
        attributes, the completeness marker). Raises as `submit`, and as `ShardWriter.close`."""
        self.flush()
        self._stop()
        self._closed = True
        self.writer.close()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # Leaving by an error: drop what is queued and stop before the caller removes the
            # temporary directory (a write after that would recreate part of it).
            self._abandon.set()
        self._stop()
