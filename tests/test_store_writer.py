"""The background shard writer (embedlens.store_writer): same store as a direct write,
writes that overlap the producer, bounded memory, errors named in the main thread, and no
write after an error has removed the temporary directory."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from embedlens.store import (NonFiniteError, ShardWriter, StoreOverflowError, atomic_directory,
                             check_states, open_shard)
from embedlens.store_writer import BackgroundWriter, ShardWriteError

LAYERS = [0, 1, 2]


def _images(n, seed=0, n_tok=4):
    rng = np.random.default_rng(seed)
    return [(f"img-{i}", rng.normal(size=(3, n_tok + i % 2, 8)).astype(np.float16),
             rng.normal(size=(1, 5, 4)).astype(np.float16)) for i in range(n)]


def _args(image_id, llm, vision):
    n = llm.shape[1]
    return (image_id, llm, vision, np.arange(n) // 2, np.arange(n) % 2, (n // 2, 2))


def _writer(tmp, n):
    return ShardWriter(tmp, n_images=n, layers=LAYERS, vision_layers=[-1], dtype="float16",
                       attrs={"model": "m"})


class _GatedWriter(ShardWriter):
    """A real ShardWriter whose appends wait for a gate: stands for a slow disk, so the test
    can see what the producer does while a write is under way."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.started = threading.Event()

    def append(self, *a, **kw):
        self.started.set()
        self.gate.wait(timeout=30)
        super().append(*a, **kw)


def test_background_store_equals_the_direct_one(tmp_path):
    images = _images(5)
    with atomic_directory(tmp_path / "direct.zarr") as tmp:
        w = _writer(tmp, 5)
        for im in images:
            w.append(*_args(*im))
        w.close()
    with atomic_directory(tmp_path / "bg.zarr") as tmp:
        with BackgroundWriter(_writer(tmp, 5), shard=tmp_path / "bg.zarr", max_pending=1) as bw:
            for im in images:
                bw.submit(*_args(*im))
            bw.close()
    a, b = open_shard(tmp_path / "direct.zarr"), open_shard(tmp_path / "bg.zarr")
    for name in ("llm_hidden", "vision_hidden", "patch_row", "token_valid"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert list(a.image_id.values) == list(b.image_id.values)


def test_submit_returns_while_writing_and_the_queue_is_bounded(tmp_path):
    images = _images(4)
    final = tmp_path / "s.zarr"
    with atomic_directory(final) as tmp:
        writer = _GatedWriter(tmp, n_images=4, layers=LAYERS, vision_layers=[-1], dtype="float16", attrs={})
        with BackgroundWriter(writer, shard=final, max_pending=2) as bw:
            bw.submit(*_args(*images[0]))  # taken by the thread, which waits at the gate
            assert writer.started.wait(10)
            bw.submit(*_args(*images[1]))  # queued
            bw.submit(*_args(*images[2]))  # queued: the queue (2) is now full
            blocked = threading.Thread(target=bw.submit, args=_args(*images[3]))
            blocked.start()
            blocked.join(0.3)
            assert blocked.is_alive(), "a full queue must make the producer wait (bounded memory)"
            assert writer.n_written == 0  # nothing written yet: the producer ran ahead
            writer.gate.set()
            blocked.join(10)
            bw.close()
    assert open_shard(final).sizes["image"] == 4


def test_writer_error_surfaces_in_the_main_thread_naming_shard_and_image(tmp_path):
    images = _images(3)
    final = tmp_path / "shard-0007.zarr"
    wrong = ("img-bad", np.zeros((2, 4, 8), np.float16), images[1][2])  # 2 layers, the array has 3
    with pytest.raises(ShardWriteError) as err:
        with atomic_directory(final) as tmp:
            with BackgroundWriter(_writer(tmp, 3), shard=final) as bw:
                bw.submit(*_args(*images[0]))
                bw.submit(*_args(*wrong))
                bw.close()
    assert "shard-0007.zarr" in str(err.value) and "img-bad" in str(err.value)
    assert not final.exists() and list(tmp_path.iterdir()) == []  # nothing left, nothing visible


def test_store_errors_keep_their_type(tmp_path):
    """The extraction retries on NonFiniteError (float16 compute) and StoreOverflowError
    (float32 store): raised from the thread, they arrive unwrapped."""
    llm = np.ones((3, 4, 8), np.float32)
    for bad, exc in ((np.where(np.arange(8) == 3, np.nan, llm), NonFiniteError), (llm * 1e6, StoreOverflowError)):
        with pytest.raises(exc):
            with atomic_directory(tmp_path / "s.zarr") as tmp:
                with BackgroundWriter(_writer(tmp, 1), shard="s") as bw:
                    bw.submit("x", bad, None, np.arange(4), np.arange(4), (2, 2))
                    bw.close()


def test_leaving_by_an_error_stops_the_thread_before_the_directory_goes(tmp_path):
    images = _images(3)
    final = tmp_path / "s.zarr"
    with pytest.raises(KeyError, match="producer"):
        with atomic_directory(final) as tmp:
            writer = _GatedWriter(tmp, n_images=3, layers=LAYERS, vision_layers=[-1], dtype="float16", attrs={})
            with BackgroundWriter(writer, shard=final) as bw:
                for im in images:
                    bw.submit(*_args(*im))
                threading.Timer(0.2, writer.gate.set).start()
                raise KeyError("producer failed")
    assert not bw._thread.is_alive()
    assert list(tmp_path.iterdir()) == []  # no write recreated the removed temporary directory


def test_check_states_on_tensors_as_on_arrays():
    """The extraction checks a tensor where it is (the GPU) before moving it: same verdicts."""
    llm = np.ones((3, 4, 8), np.float32)
    llm[1, 2, 3] = np.inf
    for values in (llm, torch.from_numpy(llm)):
        with pytest.raises(NonFiniteError, match=r"LLM layers \[1\]"):
            check_states("a", values, None, LAYERS, [], "float16")
    for values in (llm[:1] * 0 + 7e4, torch.full((1, 4, 8), 7e4)):
        with pytest.raises(StoreOverflowError):
            check_states("a", values, None, [0], [], "float16")
        check_states("a", values, None, [0], [], "float32")
