"""Cost of a condition: theoretical prefill FLOPs, measured prefill latency and peak memory.

Theoretical FLOPs (decoder only)
--------------------------------
From the text config: d = hidden_size, H = attention heads, K = key/value heads,
h = head_dim (config ``head_dim``, else d / H), f = intermediate_size, m = MLP matrices
(3 for the gated SwiGLU/GeGLU MLPs of every supported decoder — gate, up, down; 2 for a
plain MLP). A multiply-add counts 2 FLOPs. For decoder layer l with

* ``n_kv``  tokens present (they provide keys/values),
* ``n_q``   tokens whose attention output is computed (present and not attention-skipped),
* ``n_mlp`` tokens through the MLP (present and not MLP-skipped),

    FLOPs_l = 2·d·h·2K·n_kv            K and V projections
            + 2·d·h·H·n_q              Q projection
            + 2·2·h·H·n_q·n_kv         scores QKᵀ and the weighted sum of values
                                       (dense: what an sdpa/eager kernel computes; no causal halving)
            + 2·h·H·d·n_q              output projection
            + 2·m·d·f·n_mlp            MLP

and the prefill costs Σ_l FLOPs_l over the prompt (image + question; the answer tokens are
scored, not prefilled). Excluded, because every condition pays them equally: the vision
tower and projector, embeddings, norms, rotary tables, the LM head. So ``prune``/``keep``/
``random_matched`` lower n everywhere, ``inject(L)`` lowers it in layers < L and ``exit(L)``
from L on, and ``skip`` lowers n_q / n_mlp of the skipped sublayers while the skipped tokens
still count as keys/values. ``skip`` is implemented by zeroing outputs, so its *measured*
latency does not drop: its FLOPs column is what an implementation that skips the work needs.

Measured latency
----------------
The decoder prefill of one prompt (batch 1, from the captured merged embeddings: the
vision tower is identical across conditions and excluded), logits of the last position
only, as in generation. One warm-up, then ``repeats`` timed runs; per prompt the median,
reported as the mean over the timed prompts. CUDA is synchronised around each run.

Peak memory
-----------
CUDA: ``torch.cuda.max_memory_allocated`` over one prefill after
``reset_peak_memory_stats`` (``peak_mem_mb``, weights included) and the rise over the
memory allocated before it (``peak_mem_delta_mb``: activations + workspace).
CPU: ``tracemalloc`` cannot see torch's C++ allocations and ``ru_maxrss`` only ever rises
(a process-lifetime maximum), so a sampler thread polls every 0.5 ms during one prefill:
``peak_mem_mb`` is the peak resident set size (``/proc/self/statm``, weights included) and
``peak_mem_delta_mb`` the peak rise of the bytes malloc has handed out (glibc
``mallinfo2``: ``uordblks + hblkhd``, which sees torch's CPU tensors, including freed-and-
reused ones that RSS cannot show). Without glibc the RSS rise is used (coarse: freed pages
are reused, so small models can show ~0), without /proc the ``ru_maxrss`` rise (NaN when it
did not move). Sampling can miss peaks shorter than the interval.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from embedlens.models.parts import text_config

from .interventions import Plan, TokenSequence, forward


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    mlp_matrices: int = 3

    @classmethod
    def from_config(cls, config, mlp_matrices: int | None = None) -> DecoderShape:
        tc = text_config(config)
        d = int(tc.hidden_size)
        H = int(tc.num_attention_heads)
        K = int(getattr(tc, "num_key_value_heads", None) or H)
        h = int(getattr(tc, "head_dim", None) or d // H)
        return cls(int(tc.num_hidden_layers), d, H, K, h, int(tc.intermediate_size),
                   3 if mlp_matrices is None else int(mlp_matrices))

    @classmethod
    def from_model(cls, model) -> DecoderShape:
        """From the config; the MLP matrix count is read off the first layer's MLP."""
        from embedlens.models.parts import decoder_layers, mlp_of

        mlp = mlp_of(decoder_layers(model)[0])
        n_lin = sum(isinstance(m, torch.nn.Linear) for m in mlp.modules())
        return cls.from_config(model.config, mlp_matrices=n_lin or 3)

    def layer_flops(self, n_kv: int, n_q: int, n_mlp: int) -> float:
        d, H, K, h, f, m = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate, self.mlp_matrices
        return float(
            2 * d * h * 2 * K * n_kv
            + 2 * d * h * H * n_q
            + 2 * 2 * h * H * n_q * n_kv
            + 2 * h * H * d * n_q
            + 2 * m * d * f * n_mlp
        )


def layer_token_counts(plan: Plan, num_layers: int) -> list[tuple[int, int, int]]:
    """Per decoder layer: (n_kv, n_q, n_mlp) of one sequence under `plan` (see module doc)."""
    keep = plan.keep
    absent = plan.absent if plan.absent is not None else torch.zeros_like(keep)
    skip = plan.skip & keep
    attn_layers = {int(s) for s in plan.sublayers if float(s).is_integer()}
    mlp_layers = {int(math.floor(s)) for s in plan.sublayers if not float(s).is_integer()}
    out = []
    for layer in range(num_layers):
        present = keep & ~absent if layer in plan.absent_layers else keep
        n = int(present.sum())
        n_skip = int((skip & present).sum())
        n_q = n - n_skip if layer in attn_layers else n
        n_mlp = n - n_skip if layer in mlp_layers else n
        out.append((n, n_q, n_mlp))
    return out


def prefill_flops(shape: DecoderShape, plan: Plan) -> float:
    """Theoretical decoder FLOPs of the prefill of the sequence `plan` was made for."""
    return sum(shape.layer_flops(*c) for c in layer_token_counts(plan, shape.num_layers))


# --------------------------------------------------------------------------- measurement
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _mallinfo2():
    """glibc's mallinfo2 as a function returning bytes in use, or None."""
    import ctypes
    import ctypes.util

    class _MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MI2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)

    return in_use


_HEAP = _mallinfo2() if os.name == "posix" else None


class _Sampler:
    """Peaks of RSS and of malloc's bytes in use while the context is open (thread)."""

    def __init__(self, interval: float = 5e-4):
        self.interval = interval
        self._stop = threading.Event()

    def _read(self):
        return _rss_bytes(), (_HEAP() if _HEAP is not None else None)

    def _update(self):
        rss, heap = self._read()
        if rss is not None:
            self.rss_peak = max(self.rss_peak, rss)
        if heap is not None:
            self.heap_peak = max(self.heap_peak, heap)

    def __enter__(self):
        rss, heap = self._read()
        self.rss_start, self.heap_start = rss or 0, heap
        self.rss_peak, self.heap_peak = self.rss_start, heap or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()

    @property
    def delta(self) -> int:
        if self.heap_start is not None:
            return self.heap_peak - self.heap_start
        return self.rss_peak - self.rss_start


def _last_position(seq: TokenSequence) -> list[torch.Tensor]:
    return [torch.tensor([len(seq) - 1])]


def measure_prefill(model, seqs: Sequence[TokenSequence], plans: Sequence[Plan], *, repeats: int = 3,
                    warmup: int = 1) -> dict:
    """Latency (ms, mean over prompts of the per-prompt median) and peak memory (MB) of the
    batch-1 decoder prefill of each prompt under its plan. See the module doc."""
    if not seqs:
        return {"latency_ms": float("nan"), "peak_mem_mb": float("nan"), "peak_mem_delta_mb": float("nan")}
    device = model.device
    medians = []
    for seq, plan in zip(seqs, plans):
        for _ in range(max(0, warmup)):
            forward(model, [seq], [plan], _last_position(seq))
        times = []
        for _ in range(max(1, repeats)):
            _sync(device)
            t0 = time.perf_counter()
            forward(model, [seq], [plan], _last_position(seq))
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        medians.append(statistics.median(times))
    peak, delta = _peak_memory(model, seqs[0], plans[0])
    return {"latency_ms": float(statistics.fmean(medians)), "peak_mem_mb": peak, "peak_mem_delta_mb": delta}


def _peak_memory(model, seq: TokenSequence, plan: Plan) -> tuple[float, float]:
    device = torch.device(model.device)
    mb = 1024.0 ** 2
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward(model, [seq], [plan], _last_position(seq))
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / mb, (peak - before) / mb
    if _rss_bytes() is not None or _HEAP is not None:
        with _Sampler() as s:
            forward(model, [seq], [plan], _last_position(seq))
        return (s.rss_peak / mb if s.rss_peak else float("nan")), s.delta / mb
    # no /proc: ru_maxrss (KiB on Linux, bytes on macOS) only shows rises of the lifetime peak
    scale = 1.0 if os.uname().sysname == "Darwin" else 1024.0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    forward(model, [seq], [plan], _last_position(seq))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return after / mb, (after - before) / mb if after > before else float("nan")
