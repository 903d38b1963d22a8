"""Greedy generation under an intervention (docs/methods.md §4), with a KV cache.

The intervention acts on the prefill, as in the reference: the captured prompt
(:func:`.sequences.capture_sequence`) planned by :func:`.plan.plan_for` runs once through the
intervened forward pass (:mod:`.hooks`: rebuilt sequence, zeroed sublayers, token subsets,
knockout masks) while filling a transformers ``DynamicCache``; then every new token is one
cached decode step.

What the cache holds, layer by layer
------------------------------------
* every layer caches the tokens of the rebuilt row (``prune``/``keep``/``random_matched``
  removed theirs before layer 0), right-padded to the batch's longest row;
* a layer where ``inject``/``exit``/``prune_inject`` leave tokens out saw only the present
  tokens (:class:`.hooks._Subset`, left-aligned, padded to the longest subset), so it
  caches only those: layers hold caches of *different lengths and layouts*.

So no single 2-D mask describes the cache. At every decode step a forward pre-hook hands
each decoder layer its own 4-D mask ``(B, 1, 1, K_layer)`` over its own cached keys (bool
for sdpa, additive float for eager): valid prefill keys of that layer's layout, minus
knocked-out visual keys where a ``text->visual`` knockout covers the layer (a generated
token is text after the image), plus every generated token. The skip hooks and token
subsets are not installed at decode: generated tokens are text, which no intervention
removes or skips, and absent visual tokens are simply not in that layer's cache.

Positions: a pruned token keeps its original position id (gaps stay) and generated tokens
continue from the *unpruned* prompt: the prompt's last position + 1, + 1 per step, on every
M-RoPE row (what the models assign to text after the last image; the same rule as
:meth:`.sequences.TokenSequence.extend`). Per-token fields (``token_type_ids``...) of
generated tokens are the architecture's values for appended text
(:func:`.sequences.answer_field_values`).

``use_cache=False`` is the reference: for every new token the intervened prefill is re-run
on prompt + tokens so far (:func:`.interventions.forward` on the
:func:`.sequences.append_text`-extended sequence, planned again by :func:`.plan.plan_for`
with the plan's own intervention and token groups). Both give the same tokens (tested).

Limits: sliding-window layers whose window is shorter than prompt + new tokens are refused
with the cache (the per-layer decode masks do not implement a window; the models' own
window counts sequence positions, which pruning shifts); packed sequences are refused.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from embedlens.models.parts import attn_implementation, decoder_layers, sliding_window

from .hooks import _Subset, intervention_hooks
from .interventions import _assemble, check_supported, forward
from .plan import Plan, plan_for
from .sequences import TokenSequence, answer_field_values, append_text


@dataclass
class Generation:
    """What :func:`generate` returns, one entry per sequence."""

    tokens: list[list[int]]  # per sequence: generated ids, stop/eos token excluded
    finished: list[bool]  # True = stopped by an eos id, False = hit max_new_tokens
    prefill_seconds: float
    decode_seconds: float
    logits: list[torch.Tensor] | None = None  # with return_logits: per sequence (n_steps, V) float32


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _limits(max_new_tokens, n: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        out = [int(max_new_tokens)] * n
    else:
        out = [int(m) for m in max_new_tokens]
        if len(out) != n:
            raise ValueError(f"max_new_tokens: {len(out)} values for {n} sequences")
    if any(m < 0 for m in out):
        raise ValueError(f"max_new_tokens must be >= 0, got {out}")
    return out


class _Steps:
    """Greedy bookkeeping: tokens, stops and logits per sequence."""

    def __init__(self, limits: list[int], eos: Collection[int], keep_logits: bool):
        self.limits = limits
        self.eos = {int(e) for e in eos}
        self.tokens: list[list[int]] = [[] for _ in limits]
        self.finished = [False] * len(limits)
        self.done = [m == 0 for m in limits]
        self.logits: list[list[torch.Tensor]] | None = [[] for _ in limits] if keep_logits else None

    def take(self, rows: Sequence[int], logits: torch.Tensor) -> None:
        """Record the next token of each sequence in `rows` from its logits (len(rows), V)."""
        nxt = logits.argmax(-1).tolist()  # ties: the first maximum, in both modes
        for r, b in enumerate(rows):
            if self.done[b]:
                continue
            if self.logits is not None:
                self.logits[b].append(logits[r].float().cpu())
            if nxt[r] in self.eos:
                self.finished[b] = self.done[b] = True
                continue
            self.tokens[b].append(int(nxt[r]))
            self.done[b] = len(self.tokens[b]) >= self.limits[b]

    def result(self, prefill: float, decode: float) -> Generation:
        logits = None
        if self.logits is not None:
            logits = [torch.stack(x) if x else torch.zeros(0) for x in self.logits]
        return Generation(self.tokens, self.finished, prefill, decode, logits)


@torch.inference_mode()
def generate(
    model,
    seqs: Sequence[TokenSequence],
    plans: Sequence[Plan],
    *,
    max_new_tokens: int | Sequence[int],
    eos_token_ids: Collection[int],
    use_cache: bool = True,
    return_logits: bool = False,
) -> Generation:
    """Greedy decoding of `seqs` (captured prompts, right-padded into one batch) under their
    `plans` (one intervention, :func:`.plan.plan_for`), for up to `max_new_tokens` new
    tokens per sequence (an int or one per sequence), stopping a sequence at the first id
    of `eos_token_ids` (not included in its tokens).

    `use_cache=True`: the intervened prefill fills a KV cache and each new token is one
    cached step (module doc); `use_cache=False`: the reference, re-running the intervened
    prefill on prompt + tokens so far for every new token. `return_logits`: also return per
    sequence the float32 logits (n_steps, V) each token was chosen from.
    Times: ``prefill_seconds`` = the first forward pass, ``decode_seconds`` = the rest.

    Raises:
        ValueError: `seqs`/`plans`/`max_new_tokens` of different lengths, packed sequences,
            plans of different layer choices, or (reference mode) a plan not built by
            :func:`.plan.plan_for`.
        NotImplementedError: (cached) a sliding window shorter than prompt + new tokens; see
            also :func:`.interventions.check_supported`.
    """
    check_supported(model)
    if len(seqs) != len(plans) or not seqs:
        raise ValueError(f"generate needs one plan per sequence, got {len(seqs)} sequences and {len(plans)} plans")
    if any(s.branch is not None for s in seqs):
        raise ValueError("generate takes plain prompts, not packed sequences (pack_choices)")
    steps = _Steps(_limits(max_new_tokens, len(seqs)), eos_token_ids, return_logits)
    if all(steps.done):
        return steps.result(0.0, 0.0)
    if use_cache:
        return _cached(model, seqs, plans, steps)
    return _reprefill(model, seqs, plans, steps)


# =========================================================================== reference
def _reprefill(model, seqs, plans, steps: _Steps) -> Generation:
    N = len(decoder_layers(model))
    device = model.device
    times = []
    while not all(steps.done):
        rows = [b for b in range(len(seqs)) if not steps.done[b]]
        ext, ext_plans = [], []
        for b in rows:
            if not steps.tokens[b]:
                ext.append(seqs[b])
                ext_plans.append(plans[b])
                continue
            if plans[b].intervention is None:
                raise ValueError("use_cache=False re-plans prompt + generated tokens: build the plans with plan_for")
            s = append_text(model, seqs[b], steps.tokens[b])
            ext.append(s)
            ext_plans.append(plan_for(s, plans[b].token_groups, plans[b].intervention, N))
        _sync(device)
        t0 = time.perf_counter()
        res = forward(model, ext, ext_plans, [torch.tensor([len(s) - 1]) for s in ext])
        logits = torch.cat(res.logits)
        _sync(device)
        times.append(time.perf_counter() - t0)
        steps.take(rows, logits)
    return steps.result(times[0], float(sum(times[1:])))


# =========================================================================== cached
def _cache_kwarg(model) -> str:
    # transformers 5 renamed past_key_values -> cache (the old name is deprecated)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _check_window(model, seqs, limits) -> None:
    window = sliding_window(model)
    need = max(len(s) for s in seqs) + max(limits)
    if window is not None and window < need:
        raise NotImplementedError(
            f"{type(model).__name__}: a sliding-window layer attends through a window of {window} "
            f"positions, shorter than prompt + new tokens ({need}); cached generation under an "
            "intervention does not implement the window (its per-layer decode masks would see "
            "further than the model). Use use_cache=False, or fewer tokens.")


class _DecodeMasks:
    """Per-layer decode masks: each layer's own prefill key layout plus one key per step."""

    def __init__(self, model, batch, num_layers: int, dtype):
        self.impl = attn_implementation(model)
        self.dtype = dtype
        am = batch.attention_mask.bool()
        knocked = batch.knock_keys if batch.knock_keys is not None else torch.zeros_like(am)
        cut_text = "text->visual" in batch.knock_edges
        subset = None
        # the same condition and the same _Subset computation as intervention_hooks, so the
        # layout here is the layout the prefill wrote into those layers' caches
        if batch.absent_layers and batch.absent.any():
            subset = _Subset(~batch.absent, self.impl)
        self.base: dict[tuple[bool, bool], torch.Tensor] = {}
        self.layer_key: list[tuple[bool, bool]] = []
        for n in range(num_layers):
            sub = subset is not None and n in batch.absent_layers
            cut = cut_text and n in batch.knock_layers
            key = (sub, cut)
            if key not in self.base:
                if sub:
                    valid = subset.valid & am.gather(1, subset.idx)
                    kn = knocked.gather(1, subset.idx) & subset.valid
                else:
                    valid, kn = am, knocked
                self.base[key] = valid & ~kn if cut else valid
            self.layer_key.append(key)
        self.current: dict[tuple[bool, bool], torch.Tensor] = {}

    def step(self, n_fed: int) -> None:
        """Masks for the decode step that feeds the `n_fed`-th generated token."""
        self.current = {}
        for key, base in self.base.items():
            new = torch.ones(base.shape[0], n_fed, dtype=torch.bool, device=base.device)
            allowed = torch.cat([base, new], dim=1)[:, None, None, :]  # (B, 1, 1, K)
            if self.impl == "eager":
                allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=base.device).masked_fill(
                    ~allowed, torch.finfo(self.dtype).min)
            self.current[key] = allowed

    def hook(self, n: int):
        def pre_hook(module, args, kwargs):
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self.current[self.layer_key[n]]
            return args, kwargs

        return pre_hook


def _cached(model, seqs, plans, steps: _Steps) -> Generation:
    from transformers import DynamicCache

    _check_window(model, seqs, steps.limits)
    device = model.device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    layers = decoder_layers(model)
    N = len(layers)
    batch = _assemble(seqs, plans, device, dtype)
    B, T = batch.attention_mask.shape
    rows = list(range(B))
    # full-attention layers everywhere (no config): the layouts are ours, not the config's
    cache = DynamicCache()
    ckw = _cache_kwarg(model)
    last = torch.tensor([int(i.shape[0]) - 1 for i in batch.index], device=device)
    want = torch.zeros(B, T, dtype=torch.bool, device=device)
    want[torch.arange(B, device=device), last] = True

    _sync(device)
    t0 = time.perf_counter()
    with intervention_hooks(model, batch, allow_cache=True):
        out = model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=True, logits_to_keep=want,
                    **{ckw: cache}, **batch.fields)
    logits = out.logits.float()
    if logits.ndim == 3:  # a model that ignored the boolean logits_to_keep
        logits = logits[want]
    steps.take(rows, logits)
    _sync(device)
    t1 = time.perf_counter()

    masks = _DecodeMasks(model, batch, N, dtype)
    # the unpruned prompt's last position, every M-RoPE row: (R, B)
    last_pos = torch.stack([s.position_ids[:, -1].to(device) for s in seqs], dim=1)
    values = answer_field_values(model)
    fields = {k: torch.full((B, 1), values.get(k, 0), dtype=v.dtype, device=device)
              for k, v in batch.fields.items()}
    embed = model.get_input_embeddings()
    handles = [layer.register_forward_pre_hook(masks.hook(n), with_kwargs=True) for n, layer in enumerate(layers)]
    fed = 0
    try:
        while not all(steps.done):
            fed += 1
            # a finished row is fed its last token again; its output is never read
            tok = torch.tensor([(t[-1] if t else 0) for t in steps.tokens], device=device)
            pos = (last_pos + fed)[:, :, None]  # (R, B, 1)
            if pos.shape[0] == 1:
                pos = pos[0]
            masks.step(fed)
            out = model(inputs_embeds=embed(tok[:, None]).to(dtype), position_ids=pos, attention_mask=None,
                        use_cache=True, **{ckw: cache}, **fields)
            steps.take(rows, out.logits[:, -1].float())
    finally:
        for h in handles:
            h.remove()
    _sync(device)
    return steps.result(t1 - t0, time.perf_counter() - t1)
