"""Where the work runs: the device choice and progress bars, shared by every stage.

One definition so that ``device: auto`` means the same in extraction, the analyses, the
compression benchmark and embedlens-mini training.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """The device to compute on, as a string torch accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    ``"auto"`` (or None) → ``"cuda"`` when a CUDA device is visible, else ``"cpu"``; anything
    else as given.

    Raises
    ------
    RuntimeError
        ``"cuda"`` (or ``"cuda:N"``) asked for while no CUDA device is visible: the message
        says to set ``device: auto`` or ``cpu``.
    """
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device)
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA device is visible; "
                           "set device: auto or cpu")
    return name


def progress_bar(iterable=None, *, enabled: bool = True, **kw):
    """A tqdm bar over ``iterable`` (``enabled=False``: the same object, silent, so tests
    and library callers stay quiet)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, **kw)


def image_blocks(n_images: int, bytes_per_image: int, max_block_bytes: int):
    """(start, stop) image ranges whose read stays under ``max_block_bytes`` (at least one
    image per block), so a store larger than memory is streamed, never loaded whole."""
    per = max(1, int(max_block_bytes) // max(1, int(bytes_per_image)))
    for s in range(0, n_images, per):
        yield s, min(s + per, n_images)


def is_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error of any device (CUDA, MPS, XPU, or the CPU allocator): the
    one test extraction and the compression benchmark use to halve their batch."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def free_cached_memory(device) -> None:
    """Return cached blocks to the device after an out-of-memory error (no-op on CPU)."""
    kind = torch.device(device).type
    backend = getattr(torch, kind, None)
    if kind != "cpu" and backend is not None and hasattr(backend, "empty_cache"):
        backend.empty_cache()
